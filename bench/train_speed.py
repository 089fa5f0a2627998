"""The bench's training half alone, under variants: where the on-policy floor's training time goes.

    python -m bench.train_speed                               # every variant, on one CUDA GPU
    python -m bench.train_speed --variants eager,compiled --profile eager
    python -m bench.train_speed --smoke                       # tiny model on the CPU: checks, measures nothing

One optimizer step is the bench's (python -m bench): the policy-gradient pass over 16 x 8 completions of
512 tokens after prompts of 128, clipping and AdamW, with our config and code. No vLLM: the rows are random
token ids, which cost the trainer the same as sampled ones. Every variant runs in a process of its own: a
fresh model, the bench's warm-up steps (compilation included, and reported apart), then its measured steps.
Results: <out>/train-speed-<date>-<commit>.json, and with --profile the variant's kernel table
(<out>/train-speed-<date>-<commit>-<variant>-profile.txt) and, on a GPU, the Python stacks of the calls
that made the CPU wait for the GPU in one more step (...-<variant>-syncs.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench import speed_variants
from bench.arms import compose_config, our_overrides
from bench.halves import profile_step, rollout_micro_batches, step_prompts, train_step
from bench.settings import SMOKE, Settings
from bench.shapes import peak_bf16_flops
from bench.summary import flops_per_token, train_mfu

MODULE = "bench.train_speed"  # what `python -m` runs: each variant's process
PREFIX = "train-speed"

# variant -> (config overrides on top of the bench's floor, bench settings changed)
VARIANTS = {
    "eager": ([], {}),
    "compiled": (["model.compile=true"], {}),
    "compiled_mb32": (["model.compile=true"], {"our_micro_batch_size": 32}),
    "eager_bf16_weights": (["hardware.param_dtype=bfloat16", "hardware.autocast_dtype=null"], {}),
    "eager_checkpointing": (["model.gradient_checkpointing=true"], {}),
    "lora_eager": (["model.lora.enabled=true"], {}),
    "lora_compiled": (["model.lora.enabled=true", "model.compile=true"], {}),
    # half the micro-batches: the LoRA step's GPU waited for the CPU ~30% of the time (e9ba0ff profile)
    "lora_compiled_mb32": (["model.lora.enabled=true", "model.compile=true"], {"our_micro_batch_size": 32}),
    "lora_compiled_bf16_base": (
        ["model.lora.enabled=true", "model.compile=true", "model.lora.base_dtype=bfloat16"],
        {},
    ),
}


def peak_of_this_gpu() -> float | None:
    """This machine's GPU's dense bf16 peak (None without CUDA, or for a GPU bench.shapes does not know)."""
    import torch

    return peak_bf16_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def measure(
    variant: str,
    settings: Settings,
    workdir: Path,
    profile_path: Path | None,
    beside: Path | None = None,
) -> dict:
    """Seconds of each training step of one variant (the first ones: warm-up), and its peak memory. With
    `beside` (a directory), it trains beside another process instead: see train_beside."""
    from contextlib import ExitStack

    import torch

    from online_rl.engines import Rollout
    from online_rl.setup import build_run

    overrides, changes = VARIANTS[variant]
    settings = replace(settings, **changes, use_vllm=False)  # training alone: no engine to start
    lora = "model.lora.enabled=true" in overrides
    arm = "floor_lora" if lora else "floor"
    cfg = compose_config(
        our_overrides(settings, arm, workdir / "model", workdir / "prompts.jsonl", workdir) + overrides
    )
    closing = ExitStack()  # closed when the process ends: a variant runs in a process of its own
    run = build_run(cfg, closing)
    device = run.device

    rows = settings.prompts_per_step * settings.num_generations
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = run.model.get_input_embeddings().num_embeddings

    def random_rows(count: int, width: int) -> list[list[int]]:
        return torch.randint(0, vocab, (count, width), generator=generator).tolist()

    # the step's prompts (each prompt_tokens long) and random completions of completion_tokens each
    prompt_rows, _ = step_prompts(run)
    prompt_ids = random_rows(len(prompt_rows), settings.prompt_tokens)
    completions = Rollout(random_rows(rows, settings.completion_tokens), [False] * rows, None)

    def fresh_micro_batches() -> list:  # the rollout packed again, with new random advantages
        return rollout_micro_batches(run, prompt_rows, prompt_ids, completions, settings.our_micro_batch_size)

    def timed_step() -> float:
        micro_batches = fresh_micro_batches()  # (packed before the clock starts)
        started = time.perf_counter()
        train_step(run, micro_batches, cfg.sampling.temperature, cfg.optim.max_grad_norm)
        return time.perf_counter() - started

    profiled_micro_batches = fresh_micro_batches()

    def step_once():  # the step the profiler and the sync debugger watch
        train_step(run, profiled_micro_batches, cfg.sampling.temperature, cfg.optim.max_grad_norm)

    if beside is not None:
        return {"variant": variant, **train_beside(timed_step, settings.warmup_steps, beside)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed_step() for _ in range(settings.steps)]
    if profile_path is not None:
        syncs_path = profile_path.with_name(profile_path.name.replace("-profile", "-syncs"))
        syncs_path.unlink(missing_ok=True)  # an earlier command's
        profile_step(step_once, device, profile_path)
        if device.type == "cuda":  # and where the CPU waits for the GPU: the GPU idles while it catches up
            try:
                sites = synchronizing_calls(step_once)
                report = "".join(f"--- {count} times:\n{stack}\n" for stack, count in sites)
            except Exception as error:  # a diagnosis that fails must not lose the timings measured above
                report = f"the sync debug step failed: {error!r}\n"
            syncs_path.write_text(report or "no synchronizing CUDA call\n")
    measured = seconds[settings.warmup_steps :]
    train_s = statistics.median(measured)
    return {
        "variant": variant,
        "overrides": overrides,
        "micro_batch_size": settings.our_micro_batch_size,
        "warmup_s": seconds[: settings.warmup_steps],
        "step_s": measured,
        "train_s": train_s,
        "mfu": train_mfu(train_s, settings, flops_per_token(workdir / "model", lora), peak_of_this_gpu()),
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }


def train_beside(timed_step, warmup_steps: int, directory: Path) -> dict:
    """Training steps back to back while another process measures itself beside them (gen_speed's
    beside_training variants): the warm-up steps, then <directory>/ready, then steps until <directory>/stop
    appears. Returns the seconds of the steps after `ready`."""
    warmup_s = [timed_step() for _ in range(warmup_steps)]
    (directory / "ready").touch()
    seconds = []
    while not (directory / "stop").exists():
        seconds.append(timed_step())
    # (the MPS settings this process started with, which its CUDA context took)
    mps_env = {key: value for key, value in os.environ.items() if key.startswith("CUDA_MPS_")}
    return {"warmup_s": warmup_s, "step_s": seconds, "mps_env": mps_env}


def synchronizing_calls(step) -> list[tuple[str, int]]:
    """Run step() under CUDA's sync debug mode: the Python stacks of the calls that made the CPU wait for the
    GPU, most frequent first, each with how often it waited."""
    import collections
    import traceback
    import warnings

    import torch

    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            sites["".join(traceback.format_stack(limit=12)[:-1])] += 1

    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sites.most_common()


def main() -> None:
    parser = speed_variants.parser(
        MODULE, __doc__, VARIANTS, "a variant to profile over one more step (torch.profiler)"
    )
    parser.add_argument("--train-beside", type=Path, help=argparse.SUPPRESS)  # internal: see train_beside
    options = parser.parse_args()
    # each variant says itself whether it compiles
    settings = replace(SMOKE if options.smoke else Settings(), compile_model=False)

    if options.run_variant:
        profile = speed_variants.written(options.workdir, PREFIX, options.run_variant, "profile")
        result = measure(
            options.run_variant,
            settings,
            options.workdir,
            profile if options.profile else None,
            options.train_beside,
        )
        if options.train_beside:
            (options.train_beside / "result.json").write_text(json.dumps(result))
            return
        speed_variants.written(options.workdir, PREFIX, options.run_variant).write_text(json.dumps(result))
        return

    results, failures = speed_variants.run(
        MODULE, PREFIX, parser, options, settings, VARIANTS, ("profile", "syncs")
    )
    print(
        "\n| variant | micro-batch | train s (median) | warm-up s | MFU | peak allocated GiB |\n|---|---|---|---|---|---|"
    )
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else ""
        peak = f"{r['peak_allocated_gib']:.1f}" if r["peak_allocated_gib"] is not None else ""
        warmup = " + ".join(f"{s:.1f}" for s in r["warmup_s"])
        print(
            f"| {r['variant']} | {r['micro_batch_size']} | {r['train_s']:.3f} | {warmup} | {mfu} | {peak} |"
        )
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
