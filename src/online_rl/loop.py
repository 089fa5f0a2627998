"""The training loop. One rollout per iteration, read top to bottom:

    prompts -> token ids -> engine.sync_weights + engine.generate -> rewards
    -> what the algorithm learns from: advantages (GRPO, RLOO) or ranked pairs (online DPO, Nash-MD, XPO)
    -> optimizer step(s) over the rollout in micro-batches (checking the engine's log-probs against
       the trainer's) -> log, checkpoint

Two families share everything but steps 5-6:
- policy gradient (`algo=grpo`, `algo=rloo`): G samples per prompt, an advantage per sample, a clipped
  ratio and num_iterations passes (`policy_gradient_pass`);
- preference (`algo=dpo`, `algo=nash_md`, `algo=xpo`): a pair per prompt, a loss against the frozen
  reference (`preference_pass`). Online DPO samples both from the policy; Nash-MD and XPO sample the
  second from a geometric mixture of policy and reference (XPO: the reference alone).

This is the only module that knows the data, the model, the engine, the rewards and the algorithm.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_scheduler, set_seed

from online_rl import distributed, grpo, preference, rloo
from online_rl.checkpoint import prepare_output_dir, save_checkpoint
from online_rl.cpu_clock import CpuUse
from online_rl.data import PromptSampler, check_prompt_budget, load_prompts, tokenize_prompts
from online_rl.engines import Rollout, SaveWhenUnavailable, make_engine, resolve_mode
from online_rl.engines.mixture import sample_geometric_mixture
from online_rl.engines.mps import share_gpu_with_engines
from online_rl.engines.transformers_engine import eos_token_ids
from online_rl.evaluation import Evaluator, check_eval_config, run_eval_only
from online_rl.export import check_export_config, export_final_model
from online_rl.gc_clock import CollectorClock, FrozenHeap
from online_rl.guards import NonFiniteGuard
from online_rl.interrupts import StopOnSignal
from online_rl.logprobs import completion_logprobs, micro_batch_rows, pack
from online_rl.models import (
    DTYPES,
    compiled_for_training,
    frozen_copy,
    is_lora,
    load_policy,
    load_tokenizer,
    resolve_model_path,
    torch_dtype,
)
from online_rl.redaction import redact_hydra_outputs, redact_override, redacted_container, save_config
from online_rl.resume import check_checkpoint_schedule, find_checkpoint, load_weights, resume_training
from online_rl.reward_model import RewardModel
from online_rl.rewarding import (
    load_reward_functions,
    reward_error_metrics,
    reward_metrics,
    score_completions,
    total_reward,
)
from online_rl.rollout_ahead import RolloutAhead
from online_rl.sampler_correction import logp_gap, truncated_importance_weights
from online_rl.tracking import ConsoleOnlyTracker, append_metrics, make_tracker
from online_rl.watchdog import Watchdog

log = logging.getLogger(__name__)

POLICY_GRADIENT = ("grpo", "rloo")  # G samples per prompt, an advantage each, a clipped ratio
PREFERENCE = ("dpo", "nash_md", "xpo")  # a pair per prompt, a preference loss against the reference


@dataclass
class RunSummary:
    output_dir: Path
    final_checkpoint: Path | None  # None for eval_only
    history: list[dict[str, float]] = field(default_factory=list)  # the logged metrics of every step
    seconds: float = 0.0
    evals: list[dict[str, float]] = field(default_factory=list)  # the eval/ metrics of every evaluation
    model_dir: Path | None = None  # the exported final model (<output_dir>/model)

    @property
    def reward_means(self) -> list[float]:
        return [metrics["reward/total_mean"] for metrics in self.history]


def validate(cfg: DictConfig) -> None:
    """Checks that need several fields at once; single fields are typed by the schema."""
    algo = cfg.algo
    if algo.name in POLICY_GRADIENT:
        if algo.num_generations < 2:
            raise ValueError(
                f"algo.num_generations={algo.num_generations}: {algo.name.upper()} compares samples of one prompt, use >= 2"
            )
        rollout_size = cfg.prompts_per_step * algo.num_generations // cfg.hardware.num_processes  # per rank
        if cfg.micro_batch_size < 1 or rollout_size % cfg.micro_batch_size:
            raise ValueError(
                f"micro_batch_size={cfg.micro_batch_size} must divide each rank's rollout of prompts_per_step x "
                f"num_generations / hardware.num_processes = {rollout_size} completions, "
                f"e.g. micro_batch_size={math.gcd(rollout_size, max(cfg.micro_batch_size, 1))}"
            )
    elif algo.name in PREFERENCE:
        if cfg.micro_batch_size < 2:
            raise ValueError(
                f"micro_batch_size={cfg.micro_batch_size}: {algo.name} trains on pairs, use micro_batch_size >= 2"
            )
        if algo.beta <= 0 or (algo.beta_final is not None and algo.beta_final <= 0):
            raise ValueError(
                f"algo.beta must be > 0 for {algo.name}: it weighs the reference model in the loss"
            )
        if algo.name == "nash_md" and not 0 <= algo.mixture_coef <= 1:
            raise ValueError(f"algo.mixture_coef={algo.mixture_coef} must be in [0, 1]")
    else:
        raise ValueError(
            f"algo.name={algo.name!r} is not an algorithm of this loop: use one of {POLICY_GRADIENT + PREFERENCE}"
        )
    if cfg.sampling.temperature <= 0:
        raise ValueError(
            "sampling.temperature must be > 0: RL needs samples, and log-probs are taken at this temperature"
        )
    if cfg.model.lora.base_dtype is not None:
        if not cfg.model.lora.enabled:
            raise ValueError(
                f"model.lora.base_dtype={cfg.model.lora.base_dtype} is the frozen base's dtype under LoRA: set "
                "model.lora.enabled=true, or leave it null (the weights are then in hardware.param_dtype)"
            )
        if cfg.model.lora.base_dtype not in DTYPES:
            *others, last = DTYPES
            raise ValueError(
                f"model.lora.base_dtype={cfg.model.lora.base_dtype}: use {', '.join(others)} or {last}"
            )
    check_checkpoint_schedule(cfg.checkpoint_every, algo.get("num_iterations", 1))
    check_off_policy(cfg)
    distributed.check_config(cfg)
    if cfg.hardware.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "hardware.device=cuda but torch sees no CUDA GPU: use hardware=cpu, or install the CUDA build"
        )
    check_eval_config(cfg)
    check_export_config(cfg)


def run_directory(cfg: DictConfig) -> tuple[Path, str, Path]:
    """(output dir, run name, trackio dir). A Hydra sweep shares one trackio dir so its runs sit side by side."""
    output_dir = Path(cfg.output_dir)
    run_name, tracking_dir = output_dir.name, output_dir / "trackio"
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        run_name = redact_override(hydra_cfg.job.override_dirname) or run_name
        if hydra_cfg.mode == RunMode.MULTIRUN:
            tracking_dir = Path(hydra_cfg.sweep.dir) / "trackio"
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        pass
    return output_dir, run_name, tracking_dir


def run(cfg: DictConfig) -> RunSummary:
    """Train as `cfg` says. However the run ends (done, interrupted, failed), the signal handlers and the
    watchdog are undone and the engine and tracker closed."""
    with ExitStack() as closing:
        return train(cfg, closing)


def train(cfg: DictConfig, closing: ExitStack) -> RunSummary:
    started = time.perf_counter()
    validate(cfg)
    share_gpu_with_engines(cfg.vllm)  # (vllm.trainer_sm_percent, ..._priority) before the first CUDA call
    ranks = distributed.setup(cfg.hardware)  # one process: rank 0 of 1, and every distributed.* is a no-op
    closing.callback(distributed.teardown)
    output_dir, run_name, tracking_dir = distributed.from_main(run_directory(cfg))  # rank 0's directory
    if ranks.is_main:
        prepare_output_dir(output_dir)
        redact_hydra_outputs(output_dir)
        save_config(cfg, output_dir / "config_resolved.yaml")  # secrets redacted
    distributed.barrier()
    metrics_path = output_dir / "metrics.jsonl" if ranks.is_main else Path(os.devnull)
    # SIGINT/SIGTERM: finish the step, checkpoint, exit; a phase past its limit fails with every stack
    stop = closing.enter_context(StopOnSignal(output_dir))
    watchdog = closing.enter_context(Watchdog(cfg.watchdog_seconds))
    collector = closing.enter_context(CollectorClock())  # time/gc_s: each step's seconds in Python's gc
    nonfinite = NonFiniteGuard(cfg.max_consecutive_nonfinite)
    checkpoint = find_checkpoint(cfg.resume, output_dir)  # resume=auto|<path>|null
    set_seed(cfg.seed)  # python, numpy, torch and CUDA
    if cfg.eval_only:  # score a model on eval.split and stop: no optimizer, no training
        return RunSummary(output_dir, None, evals=[run_eval_only(cfg, output_dir, run_name, tracking_dir)])
    device = ranks.device
    param_dtype, autocast_dtype = (
        torch_dtype(cfg.hardware.param_dtype),
        torch_dtype(cfg.hardware.autocast_dtype),
    )
    algo, sampling = cfg.algo, cfg.sampling
    is_preference = algo.name in PREFERENCE
    # Completions per prompt: G for the policy-gradient family, a pair for the preference family.
    G = 2 if is_preference else algo.num_generations
    # Nash-MD and XPO draw the second sample of each pair themselves (mixture coefficient c).
    second_sample_coef = {"nash_md": algo.get("mixture_coef"), "xpo": 1.0}.get(algo.name)
    # Online DPO and XPO train on both samples of a pair, in one micro-batch.
    rows_per_unit = 2 if algo.name in ("dpo", "xpo") else 1

    # Data, model, reference, optimizer, engine, rewards, tracker.
    dataset = load_prompts(cfg.data)
    corpus = tokenizer_corpus(dataset, cfg.data.system_prompt)
    model_path = distributed.on_main(lambda: resolve_model_path(cfg.model, corpus, output_dir))
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    check_prompt_budget(tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_length)
    sampler = PromptSampler(dataset, cfg.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle)
    model = load_policy(model_path, cfg.model, param_dtype, device)
    model.train()
    # beta = 0 needs no reference; under LoRA the reference is the same model with its adapters off.
    reference = frozen_copy(model) if algo.beta > 0 and not is_lora(model) else None
    if checkpoint is not None:  # resume: the checkpoint's weights; a reference model stays the initial one
        load_weights(model, checkpoint)
    # The training forwards run through `policy` (DDP: a wrapper of model; FSDP2: model itself, sharded),
    # compiled with model.compile.
    policy = compiled_for_training(
        distributed.wrap_policy(model, cfg.hardware.strategy.value, ranks), cfg.model
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.optim.lr,
        betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
        weight_decay=cfg.optim.weight_decay,
        fused=device.type == "cuda",  # one kernel over all parameters instead of a loop of them
    )
    scheduler = get_scheduler(
        # transformers' "constant" ignores num_warmup_steps; its warmup twin honours them
        "constant_with_warmup"
        if cfg.optim.lr_scheduler.value == "constant"
        else cfg.optim.lr_scheduler.value,
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
        seed=cfg.seed + ranks.rank,
        max_model_len=cfg.data.max_prompt_length + sampling.max_completion_length,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    # an engine lost mid-run (a server down) stops the run with a checkpoint
    engine = SaveWhenUnavailable(engine, lambda: checkpoint_now())
    closing.callback(engine.close)
    reward_functions = load_reward_functions(cfg.rewards, cfg.on_reward_error.value)
    reward_model = (
        RewardModel(
            algo.reward_model,
            device,
            autocast_dtype,
            cfg.model.trust_remote_code,
            algo.reward_model_batch_size,
        )
        if is_preference and algo.reward_model
        else None
    )
    if reward_model is not None:
        closing.callback(reward_model.close)
    tracker = (
        make_tracker(cfg.logger, run_name, tracking_dir, redacted_container(cfg))
        if ranks.is_main
        else ConsoleOnlyTracker()
    )
    closing.callback(tracker.close)
    if tracker.dashboard_command():
        log.info("Dashboard: %s", tracker.dashboard_command())
    # off_policy_steps=1: the next rollout generates while this one trains (rollout_ahead.py)
    # The thread calls the engine itself: a lost engine is handled (checkpoint, then stop) where the loop
    # takes the rollout, on this thread, never in the middle of an update.
    ahead = RolloutAhead(engine.engine, device) if cfg.off_policy_steps else None
    if ahead is not None:
        closing.callback(ahead.close)  # before the engine closes (callbacks run last-in, first-out)
    evaluator = (
        Evaluator(cfg, engine, tokenizer, reward_functions, tracker, metrics_path, device)
        if cfg.eval_every
        else None
    )
    log.info(
        "%s on %s: %d trainable parameters, %d prompts x %d samples per rollout, %d steps; outputs in %s",
        algo.name,
        model_path,
        sum(p.numel() for p in trainable),
        cfg.prompts_per_step,
        G,
        cfg.max_steps,
        output_dir,
    )

    def checkpoint_now() -> Path:
        with watchdog.phase("checkpoint"):
            # a rollout in flight has drawn its prompts; a resume draws them again
            sampler_state = ahead.pending.sampler_state if ahead and ahead.pending else sampler.state_dict()
            state = trainer_state(optimizer, scheduler, sampler_state)
            weights = distributed.full_state_dict(model)  # FSDP2: gathered on rank 0; else None
            return distributed.on_main(
                lambda: save_checkpoint(output_dir / "checkpoints", step, model, tokenizer, state, weights)
            )

    def draw_prompts() -> tuple[list[dict], list[list[int]]]:
        """The next batch's rows (this rank's share of the same global batch on every rank) and token ids."""
        rows = distributed.my_share(sampler.next_batch())
        questions = [row["prompt"] for row in rows]
        return rows, tokenize_prompts(
            tokenizer, questions, cfg.data.system_prompt, cfg.data.max_prompt_length
        )

    summary = RunSummary(output_dir=output_dir, final_checkpoint=output_dir)
    # Last before the first step: a resume restores the RNG states here, after setup's random draws.
    step = (
        resume_training(checkpoint, optimizer, scheduler, sampler, cfg.max_steps, output_dir)
        if checkpoint
        else 0
    )
    distributed.seed_ranks(cfg.seed, step)  # several ranks: each samples with a seed of its own
    first_step = step  # (a resumed run's)
    progress = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc=algo.name,
        unit="step",
        dynamic_ncols=True,
        disable=not ranks.is_main,
    )
    with logging_redirect_tqdm():
        while step < cfg.max_steps:
            step_started = time.perf_counter()

            # 1-3. A batch of prompts as token ids; the engine takes the trainer's current weights, then samples
            #    G completions per prompt (Nash-MD, XPO: one; the pair's second comes from the policy/reference
            #    mixture). One step off-policy, this step's rollout was generated while the last step trained.
            engine_samples = 1 if second_sample_coef is not None else G
            if ahead is not None and ahead.pending is not None:
                watchdog.start("generate")
                t = time.perf_counter()
                pending, rollout, generate_s = engine.guarded(ahead.take)
                rows, prompt_ids = pending.rows, pending.prompt_ids
                rollout.stats["time/wait_generate_s"] = time.perf_counter() - t
                sync_s, on_policy = 0.0, False  # its weights were pushed (and timed) in the step before
            else:
                rows, prompt_ids = draw_prompts()
                t = time.perf_counter()
                watchdog.start("sync")
                engine.sync_weights(model)
                sync_s = time.perf_counter() - t
                watchdog.start("generate")
                with CpuUse() as cpu:
                    rollout = engine.generate(prompt_ids, engine_samples, sampling)
                generate_s, on_policy = time.perf_counter() - t - sync_s, True
                # Against generate_s: this thread's CPU seconds in it (all but waits for the interpreter or for
                # a CPU), and what the host's other tenants took from the machine's CPUs meanwhile.
                rollout.stats["time/generate_cpu_s"] = cpu.thread_s
                if cpu.steal_s is not None:
                    rollout.stats["time/generate_steal_s"] = cpu.steal_s
            questions = [row["prompt"] for row in rows]
            memory = gpu_memory_metrics(device)  # after generate: a sleeping engine is asleep again
            if ahead is not None and step + 1 < cfg.max_steps:  # the next rollout, with the current weights
                sampler_state = sampler.state_dict()
                next_rows, next_prompt_ids = draw_prompts()
                if not on_policy:  # (an on-policy rollout was just sampled with the current weights)
                    t = time.perf_counter()
                    watchdog.start("sync")
                    engine.sync_weights(model)
                    sync_s += time.perf_counter() - t
                ahead.start(next_rows, next_prompt_ids, engine_samples, sampling, sampler_state)
            if second_sample_coef is not None:
                t = time.perf_counter()
                second = sample_geometric_mixture(
                    model,
                    reference,
                    prompt_ids,
                    second_sample_coef,
                    sampling,
                    pad_id=tokenizer.pad_token_id,
                    eos_ids=eos_token_ids(model, tokenizer),
                    device=device,
                    autocast_dtype=autocast_dtype,
                )
                rollout = interleave_pairs(rollout, second)
                rollout.stats["time/second_sample_s"] = time.perf_counter() - t
            # Rows the engine sampled (all, except the mixture samples of Nash-MD and XPO at odd rows).
            from_engine = [second_sample_coef is None or i % 2 == 0 for i in range(len(rollout.finished))]
            completion_ids = rollout.completion_ids  # N = len(rows) * G rows
            completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)

            # 4. Rewards: every function sees the dataset's columns, one value per completion.
            t = time.perf_counter()
            columns = {
                key: [row[key] for row in rows for _ in range(G)] for key in rows[0] if key != "prompt"
            }
            columns["completion_lengths"] = [len(c) for c in completion_ids]
            prompts_per_completion = [q for q in questions for _ in range(G)]
            watchdog.start("reward")
            scores = score_completions(reward_functions, prompts_per_completion, completions, columns)
            rewards = total_reward(reward_functions, scores)  # (N,)
            if reward_model is not None:
                ranking_scores = reward_model.score(prompts_per_completion, completions)
            else:
                ranking_scores = rewards
            reward_s = time.perf_counter() - t

            # 5. What the algorithm learns from: an advantage per sample, or a ranked pair per prompt.
            finished = torch.tensor(rollout.finished)
            # Over every rank's rewards (whole groups per rank; batch statistics see the whole rollout).
            if algo.name == "grpo":
                advantages = grpo.group_advantages(
                    distributed.gather_rows(rewards), G, algo.scale_rewards.value
                )  # (N x ranks,)
            elif algo.name == "rloo":
                advantages = rloo.leave_one_out_advantages(
                    distributed.gather_rows(rewards), G, algo.normalize_advantages
                )  # (N x ranks,)
            if not is_preference:
                advantages = distributed.my_rows(advantages)  # (N,)
            else:
                pair_scores = preference.penalize_missing_eos(
                    ranking_scores, finished, algo.missing_eos_penalty
                ).view(-1, 2)  # (P, 2): [first, second] of each prompt
                first_is_chosen, tie = preference.rank_pairs(pair_scores[:, 0], pair_scores[:, 1])
                first_preferred = preference.bradley_terry_preference(pair_scores[:, 0], pair_scores[:, 1])
                beta = preference.scheduled_beta(algo.beta, algo.beta_final, step, cfg.max_steps)

            # 6. Optimizer step(s) over the rollout, in micro-batches of rows of similar length (less padding).
            #    Nash-MD trains on its own samples only.
            t = time.perf_counter()
            watchdog.start("train")
            full_prompts = [p for p in prompt_ids for _ in range(G)]
            trained_rows = [i for i in range(len(completion_ids)) if algo.name != "nash_md" or from_engine[i]]
            row_lengths = [len(full_prompts[i]) + len(completion_ids[i]) for i in range(len(completion_ids))]
            trained_tokens = sum(row_lengths[i] for i in trained_rows)  # prompts and completions, no padding
            micro_batches, padded_tokens = [], 0
            for index in micro_batch_rows(
                trained_rows, row_lengths, cfg.micro_batch_size, cfg.micro_batch_by_length, rows_per_unit
            ):
                sampler_rows = (
                    [rollout.sampler_logprobs[i] if from_engine[i] else [] for i in index]
                    if rollout.sampler_logprobs is not None
                    else None
                )
                batch = pack(
                    [full_prompts[i] for i in index],
                    [completion_ids[i] for i in index],
                    tokenizer.pad_token_id,
                    sampler_rows,
                )
                padded_tokens += batch.attention_mask.numel()
                batch = batch.to(device)
                if not is_preference and algo.mask_truncated_completions:
                    batch.completion_mask = batch.completion_mask * finished[index].to(device).unsqueeze(1)
                engine_rows = torch.tensor([from_engine[i] for i in index], device=device)
                micro_batches.append((batch, index, engine_rows))
            rollout_tokens = int(sum(b.completion_mask.sum() for b, _, _ in micro_batches))
            # DAPO's token mean over the whole rollout: DDP/FSDP2 average over ranks, so divide per rank
            rank_share_tokens = distributed.mean_over_ranks(rollout_tokens)

            logprobs_started = time.perf_counter()
            with torch.no_grad():
                # Old log-probs are only needed when later passes must measure how far the policy moved.
                old_logps = (
                    [
                        completion_logprobs(model, b, sampling.temperature, autocast_dtype)[0]
                        for b, _, _ in micro_batches
                    ]
                    if not is_preference and algo.num_iterations > 1
                    else None
                )
                ref_logps = (
                    [
                        reference_logprobs(model, reference, b, sampling.temperature, autocast_dtype)
                        for b, _, _ in micro_batches
                    ]
                    if algo.beta > 0
                    else None
                )
            logprob_passes = old_logps is not None or ref_logps is not None
            if logprob_passes and device.type == "cuda":
                torch.cuda.synchronize(device)  # their kernels are this phase's, not the training pass's
            logprobs_s = time.perf_counter() - logprobs_started if logprob_passes else 0.0

            for iteration in range(1 if is_preference else algo.num_iterations):
                if is_preference:
                    totals = preference_pass(
                        policy,
                        micro_batches,
                        ref_logps,
                        algo,
                        beta,
                        first_is_chosen=first_is_chosen,
                        tie=tie,
                        first_preferred=first_preferred,
                        temperature=sampling.temperature,
                        autocast_dtype=autocast_dtype,
                    )
                else:
                    totals = policy_gradient_pass(
                        policy,
                        micro_batches,
                        advantages,
                        old_logps,
                        ref_logps,
                        algo,
                        cfg.vllm,
                        check_gap=iteration == 0,
                        rollout_tokens=rank_share_tokens,
                        sampling=sampling,
                        autocast_dtype=autocast_dtype,
                    )
                token_count = max(rollout_tokens, 1)
                engine_tokens = max(totals["engine_tokens"], 1)
                # One step off-policy, the trainer is an update ahead of the sampler: the gap is logged, not checked.
                if iteration == 0 and rollout.sampler_logprobs is not None and on_policy:
                    check_sync(totals["gap"] / engine_tokens, totals["gap_max"], cfg.vllm.max_logp_gap, step)
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
                grad_norm = distributed.clip_grad_norm(trainable, max_norm)
                if nonfinite.allows_update(totals["loss"], grad_norm, step + 1):  # else the update is dropped
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                train_s = time.perf_counter() - t
                if step == first_step + 1:  # what lives from now on is in memory: keep it out of collections
                    closing.enter_context(FrozenHeap())  # (one full collection, in this step's time/gc_s)

                # 7. Log, checkpoint. (The next rollout starts by pushing these weights to the engine.)
                step_s = time.perf_counter() - step_started
                collected = collector.lap()  # what Python's garbage collector took during the step
                lengths = torch.tensor(columns["completion_lengths"], dtype=torch.float)
                # Reward curves follow the policy's own samples, not the mixture / reference ones.
                policy_rewards = rewards[torch.tensor(from_engine)]
                metrics = {
                    "reward/total_mean": float(policy_rewards.mean()),
                    "reward/total_std": float(policy_rewards.std()) if len(policy_rewards) > 1 else 0.0,
                    **reward_metrics(
                        {
                            name: [v for v, e in zip(values, from_engine) if e]
                            for name, values in scores.items()
                        }
                    ),
                    "rollout/len_mean": float(lengths.mean()),
                    "rollout/len_max": float(lengths.max()),
                    "rollout/truncated_frac": 1 - sum(rollout.finished) / len(rollout.finished),
                    "train/loss": totals["loss"],
                    "train/kl": totals["kl"] / token_count,
                    "train/entropy": totals["entropy"] / token_count,
                    "train/grad_norm": grad_norm,
                    "train/lr": scheduler.get_last_lr()[0],
                    # share of the micro-batches' token positions that are padding (compute spent on nothing)
                    "train/padding_frac": 1 - trained_tokens / max(padded_tokens, 1),
                    "time/generate_s": generate_s,
                    "time/reward_s": reward_s,
                    "time/train_s": train_s,
                    # (inside train_s) the no-grad passes for the old (num_iterations > 1) and the reference
                    # (beta > 0) log-probs; with neither, the training pass's own log-probs are the old ones
                    "time/logprobs_s": logprobs_s,
                    "time/sync_s": sync_s,
                    # (inside the phases above) every collection's seconds, and of them the full collections'
                    "time/gc_s": collected.seconds,
                    "time/gc_full_s": collected.full_seconds,
                    "gc/full_collections": collected.full_collections,
                    "gc/full_collected": collected.full_collected,
                    **memory,
                    **rollout.stats,
                    "time/step_s": step_s,
                    "perf/completion_tokens_per_s": float(lengths.sum()) / step_s,
                }
                if is_preference:
                    decisive = int((~tie).sum())
                    metrics.update(
                        {
                            "pairs/tie_frac": float(tie.float().mean()),
                            "pairs/score_gap_mean": float(
                                (pair_scores[:, 0] - pair_scores[:, 1]).abs().mean()
                            ),
                            "pairs/second_reward_mean": float(rewards.view(-1, 2)[:, 1].mean()),
                            "train/beta": beta,
                        }
                    )
                    if algo.name == "nash_md":
                        metrics["pairs/preference_mean"] = float(first_preferred.mean())
                    else:
                        metrics["train/margin_mean"] = totals["margin"] / max(decisive, 1)
                        metrics["train/accuracy"] = totals["accuracy"] / max(decisive, 1)
                    if algo.name == "xpo":
                        metrics["train/exploration_loss"] = totals["exploration"]
                else:
                    metrics.update(
                        {
                            "adv/mean": float(advantages.mean()),
                            "adv/std": float(advantages.std()),
                            "adv/abs_max": float(advantages.abs().max()),
                            "rollout/zero_std_group_frac": float(
                                (rewards.view(-1, G).std(dim=1) == 0).float().mean()
                            ),
                            "train/clip_low_frac": totals["clip_low"] / token_count,
                            "train/clip_high_frac": totals["clip_high"] / token_count,
                            "train/clip_region_frac": totals["clip_region"] / token_count,
                        }
                    )
                if rollout.sampler_logprobs is not None:
                    metrics["sync/logp_gap_mean"] = totals["gap"] / engine_tokens
                    metrics["sync/logp_gap_max"] = totals["gap_max"]
                    if not is_preference and cfg.vllm.importance_sampling_correction:
                        metrics["sync/is_weight_mean"] = totals["is_weight"] / token_count
                        # how much the correction reweights: the mean weight stays near 1 whatever the gap
                        # (its expectation under the sampler is 1), this does not
                        metrics["sync/is_weight_deviation_mean"] = totals["is_weight_deviation"] / token_count
                metrics.update(nonfinite.metrics())
                metrics.update(reward_error_metrics(reward_functions))
                metrics = distributed.reduce_metrics(  # several ranks: one set of metrics for the run
                    metrics,
                    samples=sum(from_engine),
                    tokens=token_count,
                    engine_tokens=engine_tokens,
                    decisive_pairs=int((~tie).sum()) if is_preference else 0,
                )
                summary.history.append(metrics)
                tracker.log(metrics, step)
                append_metrics(metrics_path, step, metrics)
                progress.update(1)
                progress.set_postfix(
                    reward=f"{metrics['reward/total_mean']:.3f}",
                    len=f"{metrics['rollout/len_mean']:.0f}",
                    tok_s=f"{metrics['perf/completion_tokens_per_s']:.0f}",
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
                    checkpoint_now()
                if nonfinite.must_stop:
                    raise nonfinite.error(checkpoint_now())
                if evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    if ahead is not None:
                        ahead.wait()  # one user of the engine at a time
                    summary.evals.append(evaluator.run(model, step))
                if step >= cfg.max_steps:
                    break
            if distributed.any_rank(stop.requested):  # SIGINT/SIGTERM: this step is done; checkpoint, exit
                break
    progress.close()

    summary.final_checkpoint = checkpoint_now()
    if stop.requested and step < cfg.max_steps:
        raise stop.interrupted(summary.final_checkpoint)
    final_eval = summary.evals[-1] if summary.evals else None
    weights = distributed.full_state_dict(model)
    summary.model_dir = distributed.on_main(
        lambda: export_final_model(cfg, model, tokenizer, output_dir, step, final_eval, weights)
    )
    summary.seconds = time.perf_counter() - started
    report(summary, tracker)
    return summary


def policy_gradient_pass(
    model,
    micro_batches,
    advantages: torch.Tensor,
    old_logps,
    ref_logps,
    algo,
    vllm_cfg,
    *,
    check_gap: bool,
    rollout_tokens: int,
    sampling,
    autocast_dtype,
) -> dict[str, float]:
    """One pass of the clipped policy-gradient loss (GRPO, RLOO) over the rollout; gradients accumulate.

    old_logps: per micro-batch (B, T) log-probs of the rollout policy, or None when this is the only
    pass (then they are the current ones, detached). ref_logps: per micro-batch, or None when beta = 0.
    Returns sums over tokens; the caller divides.
    """
    epsilon_high = algo.epsilon_high if algo.epsilon_high is not None else algo.epsilon
    totals = DeviceSums(
        "loss",
        "kl",
        "entropy",
        "clip_low",
        "clip_high",
        "clip_region",
        "gap",
        "gap_max",
        "engine_tokens",
        "is_weight",
        "is_weight_deviation",
    )
    device = micro_batches[0][0].input_ids.device
    per_micro_batch = on_device([advantages[index] for _, index, _ in micro_batches], device)
    for i, ((batch, _, _), adv) in enumerate(zip(micro_batches, per_micro_batch)):  # adv: (B,)
        logp, entropy = completion_logprobs(
            model, batch, sampling.temperature, autocast_dtype, with_entropy=True
        )
        old = old_logps[i] if old_logps is not None else logp.detach()
        token_loss, ratio = grpo.clipped_token_loss(logp, old, adv, algo.epsilon, epsilon_high)
        mask = batch.completion_mask
        if batch.sampler_logp is not None:
            if check_gap:  # the rollout policy vs the engine that sampled it
                gap_sum, gap_peak = logp_gap(old, batch.sampler_logp, mask)
                totals.add("gap", gap_sum)
                totals.peak("gap_max", gap_peak)
                totals.add("engine_tokens", mask.sum())
            if vllm_cfg.importance_sampling_correction:
                weights = truncated_importance_weights(
                    old, batch.sampler_logp, vllm_cfg.importance_sampling_cap
                )
                token_loss = token_loss * weights
                totals.add("is_weight", (weights * mask).sum())
                totals.add("is_weight_deviation", ((weights - 1).abs() * mask).sum())
        if ref_logps is not None:
            kl = grpo.k3_kl(logp, ref_logps[i])
            token_loss = token_loss + algo.beta * kl
            totals.add("kl", (kl * mask).sum())
        loss = grpo.aggregate_loss(
            token_loss,
            mask,
            algo.loss_type.value,
            len(micro_batches),
            rollout_tokens,
            sampling.max_completion_length,
        )
        loss.backward()
        totals.add("loss", loss)
        totals.add("entropy", (entropy * mask).sum())
        for key, value in grpo.clip_fractions(ratio, adv, mask, algo.epsilon, epsilon_high).items():
            totals.add(key, value * mask.sum())
    return totals.read()


def preference_pass(
    model,
    micro_batches,
    ref_logps,
    algo,
    beta: float,
    *,
    first_is_chosen: torch.Tensor,
    tie: torch.Tensor,
    first_preferred: torch.Tensor,
    temperature: float,
    autocast_dtype,
) -> dict[str, float]:
    """One pass of the preference loss (online DPO, Nash-MD, XPO) over the rollout's P pairs; gradients accumulate.

    Rows are prompt-major pairs: row 2p is the policy's sample of prompt p, row 2p + 1 the second one.
    Online DPO and XPO train on both rows of each pair (micro-batches hold whole pairs), Nash-MD only on
    the policy's rows. The loss is a mean over pairs (online DPO: over the pairs that are not ties).
    first_is_chosen, tie, first_preferred: (P,) from the ranking. Returns sums; the caller divides.
    """
    totals = DeviceSums(
        "loss", "kl", "entropy", "margin", "accuracy", "exploration", "gap", "gap_max", "engine_tokens"
    )
    pairs, decisive_pairs = len(tie), max(int((~tie).sum()), 1)
    device = micro_batches[0][0].input_ids.device
    # each micro-batch's pairs: Nash-MD has the policy's row of each, the others both rows
    pair_index = [
        torch.tensor(index if algo.name == "nash_md" else index[0::2]) // 2 for _, index, _ in micro_batches
    ]
    preferred = on_device([first_preferred[pair] for pair in pair_index], device)
    first_chosen = on_device([first_is_chosen[pair] for pair in pair_index], device)
    decisive = on_device([~tie[pair] for pair in pair_index], device)
    for i, (batch, _, engine_rows) in enumerate(micro_batches):
        logp, entropy = completion_logprobs(model, batch, temperature, autocast_dtype, with_entropy=True)
        mask = batch.completion_mask
        sequence_logp = (logp * mask).sum(dim=1)  # (B,)
        ref_sequence_logp = (ref_logps[i] * mask).sum(dim=1)  # (B,)
        if algo.name == "nash_md":  # one row per pair: the policy's sample
            pair_loss = preference.nash_md_loss(sequence_logp, ref_sequence_logp, preferred[i], beta)
            loss = pair_loss.sum() / pairs
        else:  # two rows per pair: [first, second]
            first, keep = first_chosen[i], decisive[i]
            policy_pair, ref_pair = sequence_logp.view(-1, 2), ref_sequence_logp.view(-1, 2)  # (B/2, 2)
            pair_loss, margin = preference.dpo_loss(
                torch.where(first, policy_pair[:, 0], policy_pair[:, 1]),
                torch.where(first, policy_pair[:, 1], policy_pair[:, 0]),
                torch.where(first, ref_pair[:, 0], ref_pair[:, 1]),
                torch.where(first, ref_pair[:, 1], ref_pair[:, 0]),
                beta,
                algo.loss_type.value,
            )
            loss = (pair_loss * keep).sum() / decisive_pairs
            totals.add("margin", (margin * keep).sum())
            totals.add("accuracy", ((margin > 0) & keep).sum())
            if algo.name == "xpo":  # the second row is the reference's sample
                exploration = preference.xpo_exploration_loss(policy_pair[:, 1], algo.alpha).sum() / pairs
                loss = loss + exploration
                totals.add("exploration", exploration)
        loss.backward()
        totals.add("loss", loss)
        totals.add("kl", (grpo.k3_kl(logp.detach(), ref_logps[i]) * mask).sum())
        totals.add("entropy", (entropy * mask).sum())
        if batch.sampler_logp is not None:  # the policy's samples vs the engine that sampled them
            engine_mask = mask * engine_rows.unsqueeze(1)
            gap_sum, gap_peak = logp_gap(logp, batch.sampler_logp, engine_mask)
            totals.add("gap", gap_sum)
            totals.peak("gap_max", gap_peak)
            totals.add("engine_tokens", engine_mask.sum())
    return totals.read()


def on_device(parts: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Each micro-batch's part of a CPU tensor, moved to the device in one copy. A copy from pageable memory
    waits for the GPU to finish its queued work, so a copy per micro-batch would leave it idle while the
    CPU queues the next micro-batch's forward."""
    return torch.cat(parts).to(device).split([len(part) for part in parts])


class DeviceSums:
    """A pass's running sums and maxima, kept on the device and read once at the end of the pass: a read per
    micro-batch would stall the GPU while the CPU queues the next forward. Keys never added read as 0."""

    def __init__(self, *keys: str):
        self.keys, self.sums, self.peaks = keys, {}, {}

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def peak(self, key: str, value: torch.Tensor) -> None:
        self.peaks.setdefault(key, []).append(value.detach().float())

    def read(self) -> dict[str, float]:
        totals = dict.fromkeys(self.keys, 0.0)
        totals.update({key: float(value) for key, value in self.sums.items()})
        totals.update({key: float(torch.stack(values).max()) for key, values in self.peaks.items()})
        return totals


def interleave_pairs(first: Rollout, second: Rollout) -> Rollout:
    """One rollout of pairs, prompt-major: [first of prompt 0, second of prompt 0, first of prompt 1, ...].

    `first` is the engine's (one sample per prompt), `second` the mixture's, which has no engine
    log-probs: its rows get empty lists, and the sync check skips them.
    """
    completion_ids, finished, sampler_logprobs = [], [], []
    for i in range(len(first.completion_ids)):
        completion_ids += [first.completion_ids[i], second.completion_ids[i]]
        finished += [first.finished[i], second.finished[i]]
        if first.sampler_logprobs is not None:
            sampler_logprobs += [first.sampler_logprobs[i], []]
    return Rollout(
        completion_ids=completion_ids,
        finished=finished,
        sampler_logprobs=sampler_logprobs if first.sampler_logprobs is not None else None,
        stats={**second.stats, **first.stats},
    )


def check_off_policy(cfg: DictConfig) -> None:
    """off_policy_steps=1 needs an engine that generates apart from the trainer's model, and the correction."""
    if cfg.off_policy_steps not in (0, 1):
        raise ValueError(
            f"off_policy_steps={cfg.off_policy_steps}: use 0 (on-policy) or 1 (the next rollout generates while this one trains)"
        )
    if not cfg.off_policy_steps:
        return
    if cfg.algo.name not in POLICY_GRADIENT:
        raise ValueError(
            f"off_policy_steps=1 is for {' and '.join(POLICY_GRADIENT)}: algo={cfg.algo.name} samples with the policy itself"
        )
    if cfg.vllm.mode.value not in ("colocate", "server"):
        raise ValueError(
            f"off_policy_steps=1 needs vllm=colocate or vllm=server (vllm={cfg.vllm.mode.value} generates with the "
            "model being trained, so the two cannot overlap)"
        )
    if cfg.vllm.mode.value == "colocate" and cfg.vllm.sleep_level:
        # The engine generates while the trainer trains, so sleeping frees nothing for training. On the H200
        # (2026-11-30) the second rollout generated beside training with sleep mode on never finished.
        raise ValueError(
            f"off_policy_steps=1 with vllm=colocate needs vllm.sleep_level=0 (not {cfg.vllm.sleep_level}): the "
            "engine generates while the trainer trains, so it stays awake; size its memory with "
            "vllm.kv_cache_memory_gib"
        )
    if not cfg.vllm.importance_sampling_correction:
        raise ValueError(
            "off_policy_steps=1 trains on samples one update old: set vllm.importance_sampling_correction=true to correct for it"
        )
    if cfg.hardware.num_processes > 1:
        raise ValueError("off_policy_steps=1 runs on one process for now: use hardware with num_processes: 1")


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


def trainer_state(optimizer, scheduler, sampler_state: dict[str, Any]) -> dict[str, Any]:
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler_state,
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
    log.info(
        "Outputs: %s (config_resolved.yaml, train.log, metrics.jsonl, checkpoints/, model/)",
        summary.output_dir,
    )
    log.info("Final checkpoint: %s", summary.final_checkpoint)
    command = tracker.dashboard_command()
    if command:
        log.info("Dashboard: %s", command)
