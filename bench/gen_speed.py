"""The bench's generation half alone, under engine variants: where the on-policy floor's generation time goes.

    python -m bench.gen_speed                                  # every variant, on one CUDA GPU
    python -m bench.gen_speed --variants default,two_engines --profile default
    python -m bench.gen_speed --smoke                          # tiny model on the CPU, no vLLM: checks the harness

One rollout is the bench's (python -m bench): 16 prompts of 128 tokens x 8 samples of 512 tokens, with our
engine, config and code, after pushing the trainer's weights as the loop does. Every variant runs in a process
of its own (vLLM allows one sleep-mode engine per process): the engine's start, the bench's warm-up rollouts,
then its measured rollouts, each timed without the KV cache's wake-up and the sleep after it (as the bench's
floor). Results: <out>/gen-speed-<date>-<commit>.json. With --profile, one more rollout of that variant runs
under torch.profiler (<...>-<variant>-kernels.txt: the kernels' table, and in the JSON the seconds the device
spent in kernels against the rollout's wall time, which tells a GPU-bound rollout from a CPU-bound one) and
one under cProfile (<...>-<variant>-python.txt: the Python functions by their own time, this thread only).
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench import speed_variants
from bench.arms import compose_config, our_overrides
from bench.halves import step_prompts, timed_rollout
from bench.host import cpu_speeds, speeds_summary
from bench.settings import SMOKE, Settings
from online_rl.engines.hosted.mps import trainer_mps_settings  # (the loop's options -> MPS's settings)

MODULE = "bench.gen_speed"  # what `python -m` runs: each variant's process
PREFIX = "gen-speed"

# variant -> (config overrides on top of the bench's floor, bench settings changed)
VARIANTS = {
    "default": ([], lambda settings: {}),
    "separate_process": (["vllm.separate_process=true"], lambda settings: {}),
    # two engine processes on the GPU, half the prompts each: vLLM's Python per sequence on two CPU cores
    "two_engines": (["vllm.separate_process=true", "vllm.engine_processes=2"], lambda settings: {}),
    "four_engines": (["vllm.separate_process=true", "vllm.engine_processes=4"], lambda settings: {}),
    "sync_scheduling": (["vllm.async_scheduling=false"], lambda settings: {}),
    "no_sleep": (["vllm.sleep_level=0"], lambda settings: {}),
    # the prompt's blocks hashed and cached for every sequence at every step, against 8x the prefill
    "no_prefix_cache": (["vllm.enable_prefix_caching=false"], lambda settings: {}),
    # half the requests over the same number of decoding steps: what each sequence costs against each step
    "half_batch": ([], lambda settings: {"prompts_per_step": max(1, settings.prompts_per_step // 2)}),
    # the off-policy arm's engine (a process of its own, awake), alone and then beside a training process
    "beside_training": (["vllm.separate_process=true", "vllm.sleep_level=0"], lambda settings: {}),
}
# variant -> the train_speed variant whose steps run beside its second set of rollouts, in a process of its own
TRAINING_BESIDE = {"beside_training": "compiled"}
# Under MPS, the loop's vllm options for the training process in each round beside training, set as the loop
# sets them (engines/hosted/mps.py): none, then its kernels capped at a share of the multiprocessors. Without MPS, only
# the first round (the others would do nothing).
MPS_ROUNDS = ({}, {"trainer_sm_percent": 50}, {"trainer_sm_percent": 25})
READY_TIMEOUT_S = 600  # the training process's model load and compilation


def measure(variant: str, settings: Settings, workdir: Path, profile: bool) -> dict:
    from contextlib import ExitStack

    import torch

    from online_rl.setup import build_run

    overrides, changes = VARIANTS[variant]
    settings = replace(settings, **changes(settings))
    # --smoke generates with transformers, which takes none of vLLM's options
    overrides = [each for each in overrides if settings.use_vllm or not each.startswith("vllm.")]
    model_dir = workdir / "model"
    cfg = compose_config(
        our_overrides(settings, "floor", model_dir, workdir / "prompts.jsonl", workdir) + overrides
    )
    device = torch.device(cfg.hardware.device)
    closing = ExitStack()
    started = time.perf_counter()
    run = build_run(cfg, closing)  # the library's setup: model, engine, ...
    engine, model = run.rollouts.engine, run.model
    _, prompt_ids = step_prompts(run)
    engine_start_s = time.perf_counter() - started  # (with the model's load: ~1 s of it)

    def rollout() -> dict:
        """One rollout after a weight push: halves.timed_rollout's seconds (generate_s without waking the KV
        cache and sleeping; its gc, main-thread CPU and steal seconds), its completion tokens, and each CPU's
        probe seconds just before."""
        speeds = cpu_speeds()
        result, timings = timed_rollout(engine, model, prompt_ids, settings.num_generations, cfg.sampling)
        return {
            **timings,
            "tokens": sum(len(ids) for ids in result.completion_ids),
            "cpu_probe_ms": {cpu: round(1000 * s, 2) for cpu, s in speeds.items()},
            "cpu_probe_summary_ms": speeds_summary(speeds),
        }

    timed = []
    for _ in range(settings.steps):
        timed.append(rollout())
        probe = timed[-1]["cpu_probe_summary_ms"]
        print(  # (progress, for a run cut short: see beside_training)
            f"{variant}: rollout {timed[-1]['generate_s']:.2f} s; CPUs' probe ms: fastest {probe['fastest']:.2f}, "
            f"median {probe['median']:.2f}, slowest {probe['slowest']:.2f}",
            flush=True,
        )
    measured = timed[settings.warmup_steps :]
    generate_s = statistics.median(t["generate_s"] for t in measured)
    result = {
        "variant": variant,
        "overrides": overrides,
        "prompts": settings.prompts_per_step,
        "completions": settings.prompts_per_step * settings.num_generations,
        "engine_start_s": engine_start_s,
        "warmup_s": [t["generate_s"] for t in timed[: settings.warmup_steps]],
        "generate_steps_s": [t["generate_s"] for t in measured],
        "generate_s": generate_s,
        "completion_tokens_per_s": statistics.median(t["tokens"] / t["generate_s"] for t in measured),
        # per decoding step of the longest completion: what the engine spends on each token position
        "ms_per_decoding_step": 1000 * generate_s / settings.completion_tokens,
        # per measured rollout: a slow one with CPU seconds equal to its wall time did not wait for a CPU
        **{
            f"{key}_steps": [t[key] for t in measured]
            for key in ("generate_gc_s", "generate_cpu_s", "generate_steal_s", "cpu_probe_ms")
        },
    }
    if variant in TRAINING_BESIDE:
        rounds = MPS_ROUNDS if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") else MPS_ROUNDS[:1]
        result["beside_training"] = [
            beside_training(
                TRAINING_BESIDE[variant], trainer_mps_settings(options), rollout, settings, workdir
            )
            for options in rounds
        ]
    if profile:
        tables = {
            kind: speed_variants.written(workdir, PREFIX, variant, kind) for kind in ("kernels", "python")
        }
        result.update(profile_rollout(rollout, device, tables))
    closing.close()
    return result


def beside_training(train_variant: str, mps_env: dict, rollout, settings, workdir: Path) -> dict:
    """The measured rollouts again, each beside a training process (bench.train_speed's `train_variant`, steps
    back to back): what the trainer's kernels cost generation when neither shares the other's interpreter,
    as in the off-policy arm's two processes. Returns the rollouts' seconds and the training steps'."""
    directory = Path(tempfile.mkdtemp(prefix="beside-", dir=workdir))
    command = [sys.executable, "-m", "bench.train_speed", "--run-variant", train_variant]
    command += ["--workdir", str(workdir), "--train-beside", str(directory)]
    command += ["--smoke"] if settings == SMOKE else []
    log_path = directory / "trainer.log"

    def log_tail() -> str:
        return log_path.read_text()[-1500:]

    with log_path.open("w") as log:
        trainer = subprocess.Popen(
            command, env={**os.environ, **mps_env}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not (directory / "ready").exists():
                if trainer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the training process beside generation did not start training ({mps_env}), "
                        f"exit code {trainer.poll()}; its log: {log_tail()}"
                    )
                time.sleep(0.1)
            timed = []
            for _ in range(settings.measured_steps):
                timed.append(rollout())
                # (progress, for a run cut short: the driver shows a variant's output only when it fails)
                print(f"beside training {mps_env}: rollout {timed[-1]['generate_s']:.2f} s", flush=True)
        finally:
            (directory / "stop").touch()
            trainer.wait(timeout=300)
    if trainer.returncode != 0:
        raise RuntimeError(f"the training process failed: {log_tail()}")
    training = json.loads((directory / "result.json").read_text())
    return {
        "trainer_mps_env": mps_env,
        "train_variant": train_variant,
        "generate_steps_s": [t["generate_s"] for t in timed],
        "generate_s": statistics.median(t["generate_s"] for t in timed),
        "train_steps_s": training["step_s"],
        "trainer_process_mps_env": training["mps_env"],
    }


def profile_rollout(rollout, device, tables: dict[str, Path]) -> dict:
    """One rollout under torch.profiler and one under cProfile: the kernels' table and the Python functions'."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        wall_s = rollout()["generate_s"]
    averages = profiler.key_averages()
    sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    tables["kernels"].write_text(averages.table(sort_by=sort, row_limit=40))
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
    tables["python"].write_text(text.getvalue())
    return {"profiled_wall_s": wall_s, "profiled_kernel_s": kernel_s if on_gpu else None}


def main() -> None:
    parser = speed_variants.parser(MODULE, __doc__, VARIANTS, "a variant to profile over two more rollouts")
    options = parser.parse_args()
    settings = SMOKE if options.smoke else Settings()

    if options.run_variant:
        result = measure(options.run_variant, settings, options.workdir, bool(options.profile))
        speed_variants.written(options.workdir, PREFIX, options.run_variant).write_text(json.dumps(result))
        return

    results, failures = speed_variants.run(
        MODULE, PREFIX, parser, options, settings, VARIANTS, ("kernels", "python")
    )
    print(
        "\n| variant | completions | generate s (median) | ms per decoding step | rollouts s (main thread's CPU s)"
        " | engine start s |\n|---|---|---|---|---|---|"
    )
    for r in results:
        rollouts = ", ".join(
            f"{wall:.2f} ({cpu:.2f})" for wall, cpu in zip(r["generate_steps_s"], r["generate_cpu_s_steps"])
        )
        print(
            f"| {r['variant']} | {r['completions']} | {r['generate_s']:.3f} | {r['ms_per_decoding_step']:.2f}"
            f" | {rollouts} | {r['engine_start_s']:.1f} |"
        )
        for round_ in r.get("beside_training", []):
            mps_env = " ".join(f"{key}={value}" for key, value in round_["trainer_mps_env"].items())
            steps = ", ".join(f"{seconds:.2f}" for seconds in round_["train_steps_s"])
            print(
                f"| {r['variant']}, beside {round_['train_variant']} training {mps_env}"
                f" | {r['completions']} | {round_['generate_s']:.3f} | | "
                f"{', '.join(f'{s:.2f}' for s in round_['generate_steps_s'])} (training steps: {steps}) | |"
            )
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
