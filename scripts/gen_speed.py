"""The bench's generation half alone, under engine variants: where the on-policy floor's generation time goes.

    python scripts/gen_speed.py                                  # every variant, on one CUDA GPU
    python scripts/gen_speed.py --variants default,two_engines --profile default
    python scripts/gen_speed.py --smoke                          # tiny model on the CPU, no vLLM: checks the harness

One rollout is the bench's (scripts/bench.py): 16 prompts of 128 tokens x 8 samples of 512 tokens, with our
engine, config and code, after pushing the trainer's weights as the loop does. Every variant runs in a process
of its own (vLLM allows one sleep-mode engine per process): the engine's start, the bench's warm-up rollouts,
then its measured rollouts, each timed without the KV cache's wake-up and the sleep after it (as the bench's
floor). Results: <out>/gen-speed-<date>-<commit>.json. With --profile, one more rollout of that variant runs
under torch.profiler (<...>-<variant>-kernels.txt: the kernels' table, and in the JSON the seconds the device
spent in kernels against the rollout's wall time, which tells a GPU-bound rollout from a CPU-bound one) and
one under cProfile (<...>-<variant>-python.txt: the Python functions by their own time, this thread only).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: the same rollout, settings and model)

# variant -> (config overrides on top of the bench's floor, bench settings changed)
VARIANTS = {
    "default": ([], lambda settings: {}),
    "separate_process": (["vllm.separate_process=true"], lambda settings: {}),
    # two engine processes on the GPU, half the prompts each: vLLM's Python per sequence on two CPU cores
    "two_engines": (["vllm.separate_process=true", "vllm.engine_processes=2"], lambda settings: {}),
    "sync_scheduling": (["vllm.async_scheduling=false"], lambda settings: {}),
    "no_sleep": (["vllm.sleep_level=0"], lambda settings: {}),
    # the prompt's blocks hashed and cached for every sequence at every step, against 8x the prefill
    "no_prefix_cache": (["vllm.enable_prefix_caching=false"], lambda settings: {}),
    # half the requests over the same number of decoding steps: what each sequence costs against each step
    "half_batch": ([], lambda settings: {"prompts_per_step": max(1, settings.prompts_per_step // 2)}),
}


def measure(variant: str, settings: bench.Settings, workdir: Path, profile_stem: Path | None) -> dict:
    import torch

    from online_rl.data import load_prompts, tokenize_prompts
    from online_rl.engines import make_engine, resolve_mode
    from online_rl.models import load_policy, load_tokenizer, torch_dtype

    overrides, changes = VARIANTS[variant]
    settings = replace(settings, **changes(settings))
    model_dir = workdir / "model"
    cfg = bench.compose_config(
        bench.our_overrides(settings, "floor", model_dir, workdir / "prompts.jsonl", workdir) + overrides
    )
    device = torch.device(cfg.hardware.device)
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code=False)
    model = load_policy(str(model_dir), cfg.model, torch_dtype(cfg.hardware.param_dtype), device)
    started = time.perf_counter()
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
    engine_start_s = time.perf_counter() - started
    rows = load_prompts(cfg.data).select(range(settings.prompts_per_step))
    prompt_ids = tokenize_prompts(tokenizer, rows["prompt"], None, settings.prompt_tokens)

    def rollout() -> tuple[float, int]:
        """One rollout after a weight push: (its seconds without waking the KV cache and sleeping, tokens)."""
        engine.sync_weights(model)
        started = time.perf_counter()
        result = engine.generate(prompt_ids, settings.num_generations, cfg.sampling)
        seconds = time.perf_counter() - started
        seconds -= result.stats.get("time/wake_kv_cache_s", 0.0) + result.stats.get("time/sleep_s", 0.0)
        return seconds, sum(len(ids) for ids in result.completion_ids)

    timed = [rollout() for _ in range(settings.steps)]
    measured = timed[settings.warmup_steps :]
    generate_s = statistics.median(seconds for seconds, _ in measured)
    result = {
        "variant": variant,
        "overrides": overrides,
        "prompts": settings.prompts_per_step,
        "completions": settings.prompts_per_step * settings.num_generations,
        "engine_start_s": engine_start_s,
        "warmup_s": [seconds for seconds, _ in timed[: settings.warmup_steps]],
        "generate_steps_s": [seconds for seconds, _ in measured],
        "generate_s": generate_s,
        "completion_tokens_per_s": statistics.median(tokens / seconds for seconds, tokens in measured),
        # per decoding step of the longest completion: what the engine spends on each token position
        "ms_per_decoding_step": 1000 * generate_s / settings.completion_tokens,
    }
    if profile_stem is not None:
        result.update(profile_rollout(rollout, device, profile_stem))
    engine.close()
    return result


def profile_rollout(rollout, device, stem: Path) -> dict:
    """One rollout under torch.profiler and one under cProfile: the kernels' table and the Python functions'."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        wall_s, _ = rollout()
    averages = profiler.key_averages()
    sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    stem.with_name(stem.name + "-kernels.txt").write_text(averages.table(sort_by=sort, row_limit=40))
    # kernels only (device time of the CPU-side ops would count them twice)
    kernel_s = (
        sum(event.self_device_time_total for event in averages if event.device_type.name == "CUDA") / 1e6
    )
    python = cProfile.Profile()
    python.enable()
    rollout()
    python.disable()
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(45)
    stem.with_name(stem.name + "-python.txt").write_text(text.getvalue())
    return {"profiled_wall_s": wall_s, "profiled_kernel_s": kernel_s if on_gpu else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"from {','.join(VARIANTS)}")
    parser.add_argument("--profile", help="a variant to profile over two more rollouts")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, no vLLM")
    parser.add_argument("--out", type=Path, default=bench.REPO / "bench" / "results")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)  # internal: one variant in this process
    options = parser.parse_args()
    settings = bench.SMOKE if options.smoke else bench.Settings()

    if options.run_variant:
        stem = options.workdir / f"gen-speed-{options.run_variant}" if options.profile else None
        result = measure(options.run_variant, settings, options.workdir, stem)
        (options.workdir / f"gen-speed-{options.run_variant}.json").write_text(json.dumps(result))
        return

    variants = [v for v in options.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {','.join(VARIANTS)}")
    if options.profile and options.profile not in variants:
        parser.error(f"--profile {options.profile}: not one of --variants {','.join(variants)}")
    commit = os.environ.get("BENCH_COMMIT") or bench.git_commit()
    stem = f"gen-speed-{dt.date.today()}-{commit}" + ("-smoke" if options.smoke else "")
    options.out.mkdir(parents=True, exist_ok=True)
    options.workdir.mkdir(parents=True, exist_ok=True)
    if not (options.workdir / "prompts.jsonl").exists():
        bench.prepare(settings, options.workdir)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(bench.REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    results, failures = [], {}
    for variant in variants:
        command = [sys.executable, __file__, "--run-variant", variant, "--workdir", str(options.workdir)]
        command += (["--smoke"] if options.smoke else []) + (
            ["--profile", variant] if variant == options.profile else []
        )
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            results.append(json.loads((options.workdir / f"gen-speed-{variant}.json").read_text()))
            print(json.dumps(results[-1]), flush=True)
            for kind in ("kernels", "python"):
                written = options.workdir / f"gen-speed-{variant}-{kind}.txt"
                if variant == options.profile and written.exists():
                    shutil.copy(written, options.out / f"{stem}-{variant}-{kind}.txt")
        else:
            failures[variant] = done.stderr[-1500:]
            print(f"{variant} FAILED:\n{failures[variant]}", flush=True)
        # after every variant, so that a command cut short still leaves what it measured
        summary = {"commit": commit, "settings": asdict(settings), "variants": results, "failures": failures}
        (options.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    print("\n| variant | completions | generate s (median) | ms per decoding step | engine start s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['completions']} | {r['generate_s']:.3f} | {r['ms_per_decoding_step']:.2f}"
            f" | {r['engine_start_s']:.1f} |"
        )
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
