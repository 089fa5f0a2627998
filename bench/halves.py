"""The two halves of the bench's step, each alone, with our code and config: one rollout of the engine
(timed_rollout), and one optimizer step over a rollout's completions (train_step). Both work on a run built by
the library's own setup (online_rl.setup.build_run). The floor arm, gen_speed, train_speed and
engine_process_cpu are made of these."""

from __future__ import annotations

import time
from pathlib import Path


def timed_rollout(engine, model, prompt_ids, num_generations: int, sampling) -> tuple:
    """A weight push, then one rollout, timed alone: (the rollout, {generate_s: its seconds without waking the KV
    cache and going back to sleep, and of them generate_gc_s in Python's garbage collector, generate_cpu_s of
    the main thread's CPU; generate_steal_s: the host's steal from all CPUs meanwhile})."""
    from online_rl.cpu_clock import CpuUse
    from online_rl.gc_clock import CollectorClock

    engine.sync_weights(model)
    started = time.perf_counter()  # (the wall time holds the CPU's and the collector's windows)
    with CollectorClock() as collector, CpuUse() as cpu:
        rollout = engine.generate(prompt_ids, num_generations, sampling)
    seconds = time.perf_counter() - started
    asleep_and_awake = rollout.stats.get("time/wake_kv_cache_s", 0.0) + rollout.stats.get("time/sleep_s", 0.0)
    return rollout, {
        "generate_s": seconds - asleep_and_awake,
        "generate_gc_s": collector.lap().seconds,
        "generate_cpu_s": cpu.thread_s,
        "generate_steal_s": cpu.steal_s,
    }


def step_prompts(run) -> tuple[list[dict], list[list[int]]]:
    """One step's prompts (dataset rows, token ids), drawn once: every rollout of a lab run samples these."""
    return run.rollouts.draw_prompts()


def rollout_micro_batches(run, rows, prompt_ids, rollout, size: int) -> list:
    """The rollout's rows in consecutive micro-batches of `size` on the run's device, as the loop's training
    passes take them (the loop's record, rollout.Samples), with random advantages."""
    import torch

    from online_rl.rollout import Samples

    samples = Samples.from_rollout(
        rows, prompt_ids, rollout, [True] * len(rollout.completion_ids), run.tokenizer
    )
    samples.signal = {"advantages": torch.randn(len(samples))}
    every_row = torch.ones(len(samples), dtype=torch.bool)
    return samples.micro_batches(
        every_row, size, False, 1, pad_id=run.tokenizer.pad_token_id, device=run.device
    )


def train_step(run, micro_batches, temperature: float, max_grad_norm: float) -> None:
    """One optimizer step as the loop makes it: the loop's training pass (update.train_pass) with the run's
    algorithm, clipping, AdamW; returns when the device has finished it."""
    import torch

    from online_rl.algorithms import Signal
    from online_rl.update import train_pass

    tokens = int(sum(mb.packed.completion_mask.sum() for mb in micro_batches))
    signal = Signal({}, scalars={"micro_batches": len(micro_batches), "rollout_tokens": tokens})
    train_pass(run.policy, micro_batches, run.algorithm, signal, temperature, run.autocast_dtype)
    torch.nn.utils.clip_grad_norm_(run.trainable, max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    synchronize(run.device)


def profile_step(step, device, path: Path) -> None:
    """step() once under torch.profiler (CPU ops, and CUDA kernels on a GPU): where its time goes, as a table
    of the top 40 ops by self time in path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(profiler.key_averages().table(sort_by=sort, row_limit=40))


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
