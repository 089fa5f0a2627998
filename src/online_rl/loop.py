"""The training loop: one step per rollout, read top to bottom.

    prompts -> token ids -> weights pushed to the engine -> N = prompts x G completions (samples)
    -> rewards -> micro-batches, their no-grad log-prob passes (rollout policy, reference)
    -> the algorithm's learning signal (advantages, or ranked pairs; RLOO's reward needs the passes' KL)
    -> update: num_iterations passes over the micro-batches, an optimizer step each
    -> sync check (the engine's log-probs against the trainer's) -> log, checkpoint, evaluate

Everything the loop touches is built before the first step by `setup.build_run`; the algorithms are a
table (algorithms/__init__.py): the loop asks its entry how many samples to draw, what the rollout teaches,
and what loss each micro-batch gives. Shapes: N rows in the rollout, B rows in a micro-batch, C completion
tokens (padded).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from online_rl import distributed
from online_rl.checks import check_config
from online_rl.config import register_configs
from online_rl.export import export_final_model
from online_rl.reporting import RunSummary, console_line, report, sample_rows, step_metrics
from online_rl.rewarding import (
    complete_reward_specs,
    reward_error_metrics,
    score_completions,
    total_reward,
)
from online_rl.rollout import Samples
from online_rl.setup import Run, build_eval_only, build_run
from online_rl.tracking import append_metrics
from online_rl.update import (
    check_sync,
    fewer_rows_after_oom,
    logprob_passes,
    reference_log_ratios,
    train_pass,
)

log = logging.getLogger(__name__)
register_configs()  # the config groups' schemas, in Hydra's store before train.py's @hydra.main composes


def run(cfg: DictConfig) -> RunSummary:
    """Train as `cfg` says (or only evaluate, with eval_only=true). However the run ends (done, interrupted,
    failed), the signal handlers and the watchdog are undone and the engine and tracker closed."""
    check_config(cfg)  # every cross-field rule, before anything loads
    complete_reward_specs(cfg)  # rewards.<name> with RewardConfig's defaults, as the run records them
    started = time.perf_counter()
    with ExitStack() as closing:
        if cfg.eval_only:  # score a model on eval.split and stop: no optimizer, no training
            scoring = build_eval_only(cfg, closing)
            return RunSummary(scoring.output_dir, None, evals=[scoring.run()])
        return train(build_run(cfg, closing), cfg, started)


def train(run: Run, cfg: DictConfig, started: float) -> RunSummary:
    algorithm, sampling = run.algorithm, cfg.sampling
    summary = RunSummary(output_dir=run.output_dir, final_checkpoint=run.output_dir)
    progress = tqdm(
        total=cfg.max_steps,
        initial=run.step,
        desc=cfg.algo.name,
        unit="step",
        dynamic_ncols=True,
        disable=not run.is_main,
    )
    with logging_redirect_tqdm():
        while run.step < cfg.max_steps:
            step_started = time.perf_counter()

            # 1-3. Prompts -> token ids -> the trainer's weights pushed -> G completions per prompt (off-policy:
            #      the oldest rollout the engine generated while the trainer trained).
            generated = run.rollouts.next(run.step, cfg.max_steps)
            samples = Samples.from_rollout(  # N = prompts x G rows
                generated.rows, generated.prompt_ids, generated.rollout, generated.from_engine, run.tokenizer
            )

            # 4. Rewards, called by keyword: the dataset's columns and the completions, one value per completion.
            phase_started = time.perf_counter()
            run.watchdog.start("reward")
            samples.scores = score_completions(
                run.reward_functions,
                samples.prompts,
                samples.completions,
                samples.columns,
                samples.completion_ids,
            )
            run.unscored.observe(samples.scores, run.step + 1)  # a reward that scored nothing: warned
            if run.unscored.must_stop:  # no trained reward scored anything for max_unscored_steps steps
                raise run.unscored.error(run.checkpoint())
            samples.rewards = total_reward(run.reward_functions, samples.scores)  # (N,)
            samples.ranking_scores = (  # (N,) what ranks a preference pair
                run.reward_model.score(samples.prompts, samples.completions)
                if run.reward_model
                else samples.rewards
            )
            reward_s = time.perf_counter() - phase_started

            # 5. Micro-batches of rows of similar length (less padding), then the no-grad passes: the rollout
            #    policy's log-probs (num_iterations > 1; RLOO's KL) and the reference's (beta > 0).
            #    Out of GPU memory before the first optimizer step: 5-6 again with half as many rows in each
            #    micro-batch, and every later step so (run.micro_batch_rows; one rank).
            phase_started = time.perf_counter()
            run.watchdog.start("train")
            while True:
                try:
                    micro_batches = samples.micro_batches(
                        algorithm.trains_on(samples.from_engine),
                        run.micro_batch_rows,
                        cfg.micro_batch_by_length,
                        algorithm.rows_per_unit,
                        pad_id=run.tokenizer.pad_token_id,
                        device=run.device,
                        mask_truncated=algorithm.masks_truncated,
                    )
                    logprobs_s = logprob_passes(run, micro_batches, sampling.temperature)
                    samples.ref_log_ratio = reference_log_ratios(micro_batches, len(samples))  # (N,) or None

                    # 6. What the algorithm learns from (an advantage per row, or each pair's ranking), then
                    #    num_iterations passes over the micro-batches.
                    signal = algorithm.learning_signal(samples, run.step, cfg.max_steps)
                    samples.share_signal(signal.per_row, micro_batches)  # (N,) each, (B,) to each micro-batch
                    tokens = int(sum(mb.packed.completion_mask.sum() for mb in micro_batches))  # in the loss
                    # DAPO's token mean over the whole rollout: DDP/FSDP2 average over ranks, so divide per rank
                    signal.scalars.update(
                        micro_batches=len(micro_batches),
                        tokens=tokens,
                        rollout_tokens=distributed.mean_over_ranks(tokens),
                    )
                    first_pass = train_pass(
                        run.policy, micro_batches, algorithm, signal, sampling.temperature, run.autocast_dtype
                    )
                    break
                except torch.OutOfMemoryError:  # (its traceback, which holds the pass's tensors, ends here)
                    pass
                micro_batches = []
                run.optimizer.zero_grad(set_to_none=True)  # the failed pass's partial gradients
                torch.cuda.empty_cache()
                run.micro_batch_rows = fewer_rows_after_oom(
                    run.micro_batch_rows,
                    len(samples),
                    algorithm.rows_per_unit,
                    distributed.world_size(),
                    samples.longest_row(),
                    run.step + 1,
                )
            updates, totals = [], first_pass
            for iteration in range(algorithm.passes):
                if iteration > 0:
                    totals = train_pass(
                        run.policy, micro_batches, algorithm, signal, sampling.temperature, run.autocast_dtype
                    )
                # 7. The sync check: the engine sampled with the weights the trainer had (off-policy: logged)
                if iteration == 0 and generated.on_policy and "engine_tokens" in totals:
                    check_sync(
                        totals["gap"] / max(totals["engine_tokens"], 1),
                        totals["gap_max"],
                        cfg.vllm.max_logp_gap,
                        run.step,
                        int(totals.get("gap_nonfinite", 0)),
                    )
                update = optimizer_step(run, totals, cfg.optim.max_grad_norm)
                update["time/train_s"] = time.perf_counter() - phase_started
                updates.append({**update, "time/step_s": time.perf_counter() - step_started})
                if run.step >= cfg.max_steps or run.nonfinite.must_stop:
                    break

            # 8. Log each optimizer step, then checkpoint and evaluate on schedule.
            for offset, update in enumerate(updates):
                step = run.step - len(updates) + offset + 1
                seconds = {"time/generate_s": generated.generate_s, "time/reward_s": reward_s}
                seconds.update({"time/logprobs_s": logprobs_s, "time/sync_s": generated.sync_s})
                metrics = log_step(run, cfg, step, samples, generated, micro_batches, signal, update, seconds)
                summary.history.append(metrics)
            progress.update(len(updates))
            progress.set_postfix(
                reward=f"{metrics['reward/total_mean']:.3f}",
                len=f"{metrics['rollout/len_mean']:.0f}",
                tok_s=f"{metrics['perf/completion_tokens_per_s']:.0f}",
            )
            if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.max_steps:
                run.checkpoint()
            if run.nonfinite.must_stop:
                raise run.nonfinite.error(run.checkpoint())
            if run.evaluator is not None and (run.step % cfg.eval_every == 0 or run.step == cfg.max_steps):
                run.rollouts.wait()  # one user of the engine at a time
                summary.evals.append(run.evaluator.run(run.model, run.step))
            if distributed.any_rank(run.stop.requested):  # SIGINT/SIGTERM: step done; checkpoint, exit
                break
    progress.close()

    summary.final_checkpoint = run.checkpoint()
    if run.stop.requested and run.step < cfg.max_steps:
        raise run.stop.interrupted(summary.final_checkpoint)
    final_eval = summary.evals[-1] if summary.evals else None
    weights = distributed.full_state_dict(run.model)  # FSDP2: gathered on rank 0
    summary.model_dir = distributed.on_main(
        lambda: export_final_model(
            run.model,
            run.tokenizer,
            run.output_dir,
            run.step,
            final_eval,
            run.config,
            cfg.save_merged,
            cfg.push_to_hub,
            weights,
        )
    )
    summary.seconds = time.perf_counter() - started
    report(summary, run.tracker)
    return summary


def optimizer_step(run: Run, totals: dict[str, float], max_grad_norm: float) -> dict:
    """Clip the accumulated gradients, step (unless the loss or the norm is not finite), schedule the LR."""
    grad_norm = distributed.clip_grad_norm(run.trainable, max_grad_norm if max_grad_norm > 0 else math.inf)
    # off-policy: the engine's thread pushes the weights between its rollouts, never while they are written
    with run.rollouts.updating_weights(run.step + 1):
        if run.nonfinite.allows_update(totals["loss"], grad_norm, run.step + 1):  # else the update is dropped
            run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return {"totals": totals, "train/grad_norm": grad_norm, "train/lr": run.scheduler.get_last_lr()[0]}


def log_step(run: Run, cfg, step: int, samples, generated, micro_batches, signal, update, seconds) -> dict:
    """One optimizer step's metrics, the same on every rank: to the tracker, metrics.jsonl and the console."""
    totals, tokens = update["totals"], max(int(signal.scalars["tokens"]), 1)
    seconds = {**seconds, "time/train_s": update["time/train_s"], "time/step_s": update["time/step_s"]}
    metrics = step_metrics(samples, generated, totals, tokens, seconds)
    metrics.update({"train/grad_norm": update["train/grad_norm"], "train/lr": update["train/lr"]})
    # share of the micro-batches' token positions that are padding (compute spent on nothing)
    positions = sum(mb.positions for mb in micro_batches)
    metrics["train/padding_frac"] = 1 - sum(mb.tokens for mb in micro_batches) / max(positions, 1)
    metrics["train/micro_batch_rows"] = run.micro_batch_rows  # micro_batch_size, or fewer (out of memory)
    metrics.update(signal.metrics)
    metrics.update(run.algorithm.metrics(totals, signal, tokens))
    if run.collector is not None:  # logger.lab_metrics: Python's garbage collector during the step
        collected = run.collector.lap()
        metrics.update({"time/gc_s": collected.seconds, "time/gc_full_s": collected.full_seconds,
                        "gc/full_collections": collected.full_collections,
                        "gc/full_collected": collected.full_collected})  # fmt: skip
    metrics.update(run.nonfinite.metrics())
    metrics.update(reward_error_metrics(run.reward_functions))
    metrics.update(run.unscored.metrics())
    metrics = distributed.reduce_metrics(  # several ranks: one set of metrics for the run
        metrics,
        samples=int(samples.from_engine.sum()),
        tokens=tokens,
        engine_tokens=max(totals.get("engine_tokens", 0.0), 1),
        decisive_pairs=int(signal.scalars.get("decisive_pairs", 0)),
    )
    run.tracker.log(metrics, step)
    append_metrics(run.metrics_path, step, metrics)
    if step % cfg.logger.log_every == 0 or step in (run.first_step, cfg.max_steps):
        log.info(console_line(step, cfg.max_steps, metrics, [r.name for r in run.reward_functions]))
    if cfg.logger.backend != "none" and step % cfg.logger.sample_table_every == 0:
        run.tracker.log_table("samples", sample_rows(samples, cfg.logger.sample_table_rows), step)
    return metrics
