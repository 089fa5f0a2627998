"""The two halves of the bench's step, each alone, with our code and config: one rollout of the engine
(timed_rollout), and one optimizer step over a rollout's completions (train_step). The floor arm, gen_speed,
train_speed and engine_process_cpu are made of these."""

from __future__ import annotations

import time
from pathlib import Path

from bench.settings import Settings


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


def consecutive_micro_batches(
    prompts, completions, size: int, pad_id: int, device, sampler_logprobs=None
) -> list:
    """Rows i, i + 1, ... as packed micro-batches of `size` rows on `device`, each with its row indices, as
    the loop's training passes take them."""
    from online_rl.logprobs import micro_batch_rows, pack

    micro_batches = []
    rows = list(range(len(prompts)))
    for index in micro_batch_rows(rows, [0] * len(rows), size, by_length=False):  # (lengths: unused)
        batch = pack(
            [prompts[i] for i in index],
            [completions[i] for i in index],
            pad_id,
            [sampler_logprobs[i] for i in index] if sampler_logprobs else None,
        )
        micro_batches.append((batch.to(device), index, None))
    return micro_batches


def engine_and_prompts(cfg, settings: Settings, model, model_dir: Path, tokenizer) -> tuple:
    """cfg's engine on the bench's model, holding `model`'s weights at the first sync; and the token ids of one
    step's prompts."""
    import torch

    from online_rl.data import load_prompts, tokenize_prompts
    from online_rl.engines import make_engine, resolve_mode
    from online_rl.models import torch_dtype

    device = torch.device(cfg.hardware.device)
    engine = make_engine(
        resolve_mode(cfg.vllm.mode.value, device),
        cfg.vllm,
        model,
        str(model_dir),
        tokenizer,
        device=device,
        autocast_dtype=torch_dtype(cfg.hardware.autocast_dtype),
        seed=settings.seed,
        max_model_len=settings.prompt_tokens + settings.completion_tokens,
        trust_remote_code=False,
    )
    rows = load_prompts(cfg.data).select(range(settings.prompts_per_step))
    return engine, tokenize_prompts(tokenizer, rows["prompt"], None, settings.prompt_tokens)


def train_step(model, micro_batches, advantages, tokens, cfg, autocast_dtype, trainable, optimizer) -> None:
    """One optimizer step as the loop makes it: the policy-gradient pass, clipping, AdamW; returns when the
    device has finished it. The package's one call of the loop's training pass."""
    import torch

    from online_rl.loop import policy_gradient_pass

    policy_gradient_pass(
        model,
        micro_batches,
        advantages,
        None,
        None,
        cfg.algo,
        cfg.vllm,
        check_gap=True,
        rollout_tokens=tokens,
        sampling=cfg.sampling,
        autocast_dtype=autocast_dtype,
    )
    torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(torch.device(cfg.hardware.device))


def trainer(cfg, model_dir: Path, lr: float):
    """The loop's trainer for cfg on the bench's model: (model in train mode, what the training passes call
    (compiled with model.compile), the trainable parameters, fused AdamW on a GPU)."""
    import torch

    from online_rl.models import compiled_for_training, load_policy, torch_dtype

    device = torch.device(cfg.hardware.device)
    model = load_policy(str(model_dir), cfg.model, torch_dtype(cfg.hardware.param_dtype), device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, fused=device.type == "cuda")
    return model, compiled_for_training(model, cfg.model), trainable, optimizer


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
