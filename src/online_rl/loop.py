"""The training loop. One rollout per iteration, read top to bottom:

    prompts -> token ids -> engine.sync_weights + engine.generate (G per prompt) -> rewards
    -> group advantages -> num_iterations optimizer steps over the rollout in micro-batches
       (checking the engine's log-probs against the trainer's) -> log, checkpoint

This is the only module that knows the data, the model, the engine, the rewards and the algorithm.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_scheduler, set_seed

from online_rl import grpo
from online_rl.checkpoint import save_checkpoint
from online_rl.data import PromptSampler, check_prompt_budget, load_prompts, tokenize_prompts
from online_rl.engines import make_engine, resolve_mode
from online_rl.logprobs import completion_logprobs, pack
from online_rl.models import (
    frozen_copy,
    is_lora,
    load_policy,
    load_tokenizer,
    resolve_model_path,
    torch_dtype,
)
from online_rl.rewarding import load_reward_functions, reward_metrics, score_completions, total_reward
from online_rl.sampler_correction import logp_gap, truncated_importance_weights
from online_rl.tracking import append_metrics, make_tracker

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output_dir: Path
    final_checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)  # the logged metrics of every step
    seconds: float = 0.0

    @property
    def reward_means(self) -> list[float]:
        return [metrics["reward/total_mean"] for metrics in self.history]


def validate(cfg: DictConfig) -> None:
    """Checks that need several fields at once; single fields are typed by the schema."""
    algo = cfg.algo
    if algo.num_generations < 2:
        raise ValueError(
            f"algo.num_generations={algo.num_generations}: GRPO compares samples of one prompt, use >= 2"
        )
    rollout_size = cfg.prompts_per_step * algo.num_generations
    if cfg.micro_batch_size < 1 or rollout_size % cfg.micro_batch_size:
        raise ValueError(
            f"micro_batch_size={cfg.micro_batch_size} must divide the rollout of prompts_per_step x num_generations = "
            f"{rollout_size} completions, e.g. micro_batch_size={math.gcd(rollout_size, max(cfg.micro_batch_size, 1))}"
        )
    if cfg.sampling.temperature <= 0:
        raise ValueError(
            "sampling.temperature must be > 0: RL needs samples, and log-probs are taken at this temperature"
        )
    if cfg.hardware.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "hardware.device=cuda but torch sees no CUDA GPU: use hardware=cpu, or install the CUDA build"
        )


def run_directory(cfg: DictConfig) -> tuple[Path, str, Path]:
    """(output dir, run name, trackio dir). A Hydra sweep shares one trackio dir so its runs sit side by side."""
    output_dir = Path(cfg.output_dir)
    run_name, tracking_dir = output_dir.name, output_dir / "trackio"
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        run_name = hydra_cfg.job.override_dirname or run_name
        if hydra_cfg.mode == RunMode.MULTIRUN:
            tracking_dir = Path(hydra_cfg.sweep.dir) / "trackio"
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        pass
    return output_dir, run_name, tracking_dir


def run(cfg: DictConfig) -> RunSummary:
    started = time.perf_counter()
    validate(cfg)
    output_dir, run_name, tracking_dir = run_directory(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config_resolved.yaml", resolve=True)
    set_seed(cfg.seed)  # python, numpy, torch and CUDA
    device = torch.device(cfg.hardware.device)
    param_dtype, autocast_dtype = (
        torch_dtype(cfg.hardware.param_dtype),
        torch_dtype(cfg.hardware.autocast_dtype),
    )
    algo, sampling, G = cfg.algo, cfg.sampling, cfg.algo.num_generations
    epsilon_high = algo.epsilon_high if algo.epsilon_high is not None else algo.epsilon

    # Data, model, reference, optimizer, engine, rewards, tracker.
    dataset = load_prompts(cfg.data)
    corpus = tokenizer_corpus(dataset, cfg.data.system_prompt)
    model_path = resolve_model_path(cfg.model, corpus, output_dir)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    check_prompt_budget(tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_length)
    sampler = PromptSampler(dataset, cfg.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle)
    model = load_policy(model_path, cfg.model, param_dtype, device)
    model.train()
    # beta = 0 needs no reference; under LoRA the reference is the same model with its adapters off.
    reference = frozen_copy(model) if algo.beta > 0 and not is_lora(model) else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.optim.lr,
        betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = get_scheduler(
        cfg.optim.lr_scheduler.value,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.max_steps,
    )
    engine_mode = resolve_mode(cfg.vllm.mode.value, device)
    engine = make_engine(
        engine_mode,
        cfg.vllm,
        model,
        model_path,
        tokenizer,
        device=device,
        autocast_dtype=autocast_dtype,
        seed=cfg.seed,
        max_model_len=cfg.data.max_prompt_length + sampling.max_completion_length,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    reward_functions = load_reward_functions(cfg.rewards)
    tracker = make_tracker(cfg.logger, run_name, tracking_dir, OmegaConf.to_container(cfg, resolve=True))
    log.info(
        "GRPO on %s: %d trainable parameters, %d prompts x %d samples per rollout, %d steps; outputs in %s",
        model_path,
        sum(p.numel() for p in trainable),
        cfg.prompts_per_step,
        G,
        cfg.max_steps,
        output_dir,
    )

    summary = RunSummary(output_dir=output_dir, final_checkpoint=output_dir)
    step = 0
    progress = tqdm(total=cfg.max_steps, desc="GRPO", unit="step", dynamic_ncols=True)
    with logging_redirect_tqdm():
        while step < cfg.max_steps:
            step_started = time.perf_counter()

            # 1-2. A batch of prompts, as token ids.
            rows = sampler.next_batch()
            questions = [row["prompt"] for row in rows]
            prompt_ids = tokenize_prompts(
                tokenizer, questions, cfg.data.system_prompt, cfg.data.max_prompt_length
            )

            # 3. The engine takes the trainer's current weights, then samples G completions per prompt.
            t = time.perf_counter()
            engine.sync_weights(model)
            sync_s = time.perf_counter() - t
            rollout = engine.generate(prompt_ids, G, sampling)
            generate_s = time.perf_counter() - t - sync_s
            memory = gpu_memory_metrics(device)  # after generate: a sleeping engine is asleep again
            completion_ids = rollout.completion_ids  # N = len(rows) * G rows
            completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)

            # 4. Rewards: every function sees the dataset's columns, one value per completion.
            t = time.perf_counter()
            columns = {
                key: [row[key] for row in rows for _ in range(G)] for key in rows[0] if key != "prompt"
            }
            columns["completion_lengths"] = [len(c) for c in completion_ids]
            prompts_per_completion = [q for q in questions for _ in range(G)]
            scores = score_completions(reward_functions, prompts_per_completion, completions, columns)
            rewards = total_reward(reward_functions, scores)  # (N,)
            reward_s = time.perf_counter() - t

            # 5. Advantages, normalised within each prompt's group.
            advantages = grpo.group_advantages(rewards, G, algo.scale_rewards.value)  # (N,)

            # 6. num_iterations optimizer steps over the rollout, in micro-batches.
            t = time.perf_counter()
            full_prompts = [p for p in prompt_ids for _ in range(G)]
            micro_batches = []
            for start in range(0, len(completion_ids), cfg.micro_batch_size):
                index = slice(start, start + cfg.micro_batch_size)
                sampler_rows = (
                    rollout.sampler_logprobs[index] if rollout.sampler_logprobs is not None else None
                )
                batch = pack(full_prompts[index], completion_ids[index], tokenizer.pad_token_id, sampler_rows)
                batch = batch.to(device)
                if algo.mask_truncated_completions:
                    finished = torch.tensor(rollout.finished[index], device=device).unsqueeze(1)
                    batch.completion_mask = batch.completion_mask * finished
                micro_batches.append((batch, advantages[index].to(device)))
            rollout_tokens = int(sum(b.completion_mask.sum() for b, _ in micro_batches))

            with torch.no_grad():
                # Old log-probs are only needed when later passes must measure how far the policy moved.
                old_logps = (
                    [
                        completion_logprobs(model, b, sampling.temperature, autocast_dtype)[0]
                        for b, _ in micro_batches
                    ]
                    if algo.num_iterations > 1
                    else None
                )
                ref_logps = (
                    [
                        reference_logprobs(model, reference, b, sampling.temperature, autocast_dtype)
                        for b, _ in micro_batches
                    ]
                    if algo.beta > 0
                    else None
                )

            for iteration in range(algo.num_iterations):
                totals = dict.fromkeys(
                    ("loss", "kl", "entropy", "clip_low", "clip_high", "clip_region", "gap", "is_weight"), 0.0
                )
                gap_max = 0.0
                for i, (batch, adv) in enumerate(micro_batches):
                    logp, entropy = completion_logprobs(
                        model, batch, sampling.temperature, autocast_dtype, with_entropy=True
                    )
                    old = old_logps[i] if old_logps is not None else logp.detach()
                    token_loss, ratio = grpo.clipped_token_loss(logp, old, adv, algo.epsilon, epsilon_high)
                    mask = batch.completion_mask
                    if batch.sampler_logp is not None:
                        if iteration == 0:  # the rollout policy vs the engine that sampled it
                            gap_sum, gap_peak = logp_gap(old, batch.sampler_logp, mask)
                            totals["gap"] += gap_sum
                            gap_max = max(gap_max, gap_peak)
                        if cfg.vllm.importance_sampling_correction:
                            weights = truncated_importance_weights(
                                old, batch.sampler_logp, cfg.vllm.importance_sampling_cap
                            )
                            token_loss = token_loss * weights
                            totals["is_weight"] += float((weights * mask).sum())
                    if ref_logps is not None:
                        kl = grpo.k3_kl(logp, ref_logps[i])
                        token_loss = token_loss + algo.beta * kl
                        totals["kl"] += float((kl.detach() * mask).sum())
                    loss = grpo.aggregate_loss(
                        token_loss,
                        mask,
                        algo.loss_type.value,
                        len(micro_batches),
                        rollout_tokens,
                        sampling.max_completion_length,
                    )
                    loss.backward()
                    totals["loss"] += float(loss.detach())
                    totals["entropy"] += float((entropy * mask).sum())
                    for key, value in grpo.clip_fractions(
                        ratio, adv, mask, algo.epsilon, epsilon_high
                    ).items():
                        totals[key] += float(value) * float(mask.sum())
                token_count = max(rollout_tokens, 1)
                if iteration == 0 and rollout.sampler_logprobs is not None:
                    check_sync(totals["gap"] / token_count, gap_max, cfg.vllm.max_logp_gap, step)
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                train_s = time.perf_counter() - t

                # 7. Log, checkpoint. (The next rollout starts by pushing these weights to the engine.)
                step_s = time.perf_counter() - step_started
                lengths = torch.tensor(columns["completion_lengths"], dtype=torch.float)
                metrics = {
                    "reward/total_mean": float(rewards.mean()),
                    "reward/total_std": float(rewards.std()),
                    **reward_metrics(scores),
                    "adv/mean": float(advantages.mean()),
                    "adv/std": float(advantages.std()),
                    "adv/abs_max": float(advantages.abs().max()),
                    "rollout/zero_std_group_frac": float(
                        (rewards.view(-1, G).std(dim=1) == 0).float().mean()
                    ),
                    "rollout/len_mean": float(lengths.mean()),
                    "rollout/len_max": float(lengths.max()),
                    "rollout/truncated_frac": 1 - sum(rollout.finished) / len(rollout.finished),
                    "train/loss": totals["loss"],
                    "train/kl": totals["kl"] / token_count,
                    "train/entropy": totals["entropy"] / token_count,
                    "train/clip_low_frac": totals["clip_low"] / token_count,
                    "train/clip_high_frac": totals["clip_high"] / token_count,
                    "train/clip_region_frac": totals["clip_region"] / token_count,
                    "train/grad_norm": grad_norm,
                    "train/lr": scheduler.get_last_lr()[0],
                    "time/generate_s": generate_s,
                    "time/reward_s": reward_s,
                    "time/train_s": train_s,
                    "time/sync_s": sync_s,
                    **memory,
                    **rollout.stats,
                    "time/step_s": step_s,
                    "perf/completion_tokens_per_s": float(lengths.sum()) / step_s,
                }
                if rollout.sampler_logprobs is not None:
                    metrics["sync/logp_gap_mean"] = totals["gap"] / token_count
                    metrics["sync/logp_gap_max"] = gap_max
                    if cfg.vllm.importance_sampling_correction:
                        metrics["sync/is_weight_mean"] = totals["is_weight"] / token_count
                summary.history.append(metrics)
                tracker.log(metrics, step)
                append_metrics(output_dir / "metrics.jsonl", step, metrics)
                progress.update(1)
                progress.set_postfix(
                    reward=f"{metrics['reward/total_mean']:.3f}", len=f"{metrics['rollout/len_mean']:.0f}"
                )
                if step % cfg.logger.log_every == 0 or step == cfg.max_steps:
                    log.info(console_line(step, cfg.max_steps, metrics, [r.name for r in reward_functions]))
                if cfg.logger.backend == "trackio" and step % cfg.logger.sample_table_every == 0:
                    tracker.log_table(
                        "samples",
                        sample_rows(
                            prompts_per_completion, completions, scores, rewards, cfg.logger.sample_table_rows
                        ),
                        step,
                    )
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    save_checkpoint(
                        output_dir / "checkpoints",
                        step,
                        model,
                        tokenizer,
                        trainer_state(optimizer, scheduler, sampler),
                    )
                if step >= cfg.max_steps:
                    break
    progress.close()

    summary.final_checkpoint = save_checkpoint(
        output_dir / "checkpoints", step, model, tokenizer, trainer_state(optimizer, scheduler, sampler)
    )
    engine.close()
    tracker.close()
    summary.seconds = time.perf_counter() - started
    report(summary, tracker)
    return summary


class SyncError(RuntimeError):
    """The engine's log-probs say it is not generating with the trainer's weights."""


def check_sync(gap_mean: float, gap_max: float, threshold: float, step: int) -> None:
    if gap_mean > threshold:
        raise SyncError(
            f"before step {step + 1}, vLLM's log-probs of its own samples differ from the trainer's by "
            f"{gap_mean:.4f} nats per token on average (max {gap_max:.3f}; threshold vllm.max_logp_gap={threshold}): "
            "the engine is not generating with the trainer's current weights. Check the weight sync "
            "(names, dtype, LoRA merge); raise vllm.max_logp_gap only if the gap is numerical noise."
        )


def gpu_memory_metrics(device: torch.device) -> dict[str, float]:
    """GPU memory in use on the whole device (vLLM's sleep-mode pool included) while the engine sleeps, in GiB."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "memory/device_used_asleep_gib": (total - free) / 2**30,
        "memory/torch_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
    }


def tokenizer_corpus(dataset, system_prompt: str | None):
    """The text a random model's tokenizer learns from: the system prompt, questions and answers."""
    yield system_prompt or ""
    for row in dataset:
        yield str(row["prompt"])
        yield str(row.get("solution", ""))


def reference_logprobs(model, reference, batch, temperature, autocast_dtype) -> torch.Tensor:
    """Log-probs under the reference policy: the frozen copy, or the LoRA model with its adapters off."""
    if reference is not None:
        return completion_logprobs(reference, batch, temperature, autocast_dtype)[0]
    with model.disable_adapter():
        return completion_logprobs(model, batch, temperature, autocast_dtype)[0]


def trainer_state(optimizer, scheduler, sampler) -> dict[str, Any]:
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
    }


def console_line(step: int, max_steps: int, metrics: dict[str, float], reward_names: list[str]) -> str:
    per_reward = " ".join(f"{name} {metrics[f'reward/{name}_mean']:.3f}" for name in reward_names)
    return (
        f"step {step}/{max_steps} | reward {metrics['reward/total_mean']:.3f} ({per_reward}) | "
        f"loss {metrics['train/loss']:+.4f} | kl {metrics['train/kl']:.4f} | entropy {metrics['train/entropy']:.2f} | "
        f"len {metrics['rollout/len_mean']:.1f} | grad {metrics['train/grad_norm']:.3f} | {metrics['time/step_s']:.2f} s"
    )


def sample_rows(prompts, completions, scores, rewards, count) -> list[dict[str, Any]]:
    rows = []
    for i in range(min(count, len(completions))):
        row = {"prompt": prompts[i], "completion": completions[i], "reward": float(rewards[i])}
        row.update({name: values[i] for name, values in scores.items()})
        rows.append(row)
    return rows


def report(summary: RunSummary, tracker) -> None:
    rewards = summary.reward_means
    window = max(1, len(rewards) // 10)
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    log.info(
        "Done in %.0f s. Mean reward, first %d steps: %.3f -> last %d steps: %.3f",
        summary.seconds,
        window,
        first,
        window,
        last,
    )
    log.info("Outputs: %s (config_resolved.yaml, train.log, metrics.jsonl, checkpoints/)", summary.output_dir)
    log.info("Final checkpoint: %s", summary.final_checkpoint)
    command = tracker.dashboard_command()
    if command:
        log.info("Dashboard: %s", command)
