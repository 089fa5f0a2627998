"""make bench: this repo's GRPO loop against TRL's GRPOTrainer on the same run, side by side in one command.

    python -m bench                       # the anchor, on one CUDA GPU (the H200 numbers of issue 6)
    python -m bench --arms ours_full,trl_full --set measured_steps=5
    python -m bench --smoke               # the harness on a CPU: tiny model, no vLLM; checks, measures nothing
    python -m bench --shape 1.5b          # issue 27: our default command against TRL's anchor and TRL tuned

The anchor: a Qwen2-0.5B-shaped random model, 16 prompts x 8 samples = 128 completions of 512 tokens per
step, prompts of 128 tokens, fp32 master weights with bf16 autocast, lr 1e-5, TRL's GRPO defaults (beta 0,
one iteration, DAPO token-level loss, group-scaled rewards), vLLM colocate at gpu_memory_utilization 0.3.
Random weights never emit EOS, so every completion runs to 512 tokens: the same work for both.

Run it from the repository root (`make bench` does). Every arm runs in its own process (`python -m bench
--run-arm ARM`: vLLM allows one sleep-mode engine per process, and a fresh CUDA context makes peak memory
comparable), after the same setup: one model directory and one prompt file that both frameworks load. Each
arm writes <workdir>/<arm>.json; this driver then writes bench/results/<date>-<commit>.{json,md,png}.

What is measured, per arm, over the steps after the warm-up:
- s/step: wall time between the ends of consecutive optimizer steps (median, min, max);
- completion tokens/s: completion tokens of the step / its seconds;
- peak GPU memory: the device's used memory over the arm's whole process, polled every 50 ms by nvidia-smi
  from outside it, so vLLM's pool counts for both frameworks;
- ours_server, ours_server_k1, ours_server_k2 (named with --arms only): our loop against a stock vLLM server
  on the same GPU (weights over CUDA IPC), on-policy and k = 1, 2 updates behind; each arm starts its server
  before its run and stops it after (its start is no part of the steps), e.g.
  `python -m bench --shape 0.5b --arms ours_server_k1,trl_tuned` (bench.server);
- ours_offpolicy: our loop with off_policy_steps=1 (the next rollout generates while this one trains),
  reported as its own row and compared with TRL's on-policy run, never as our on-policy result;
- ours only: the phases (generate, reward, train, sync, sleep/wake) from the loop's own metrics, the train
  phase's MFU, and the floor (`floor`, and `floor_lora` for LoRA): vLLM generation alone plus training
  alone, each timed by itself with our code and settings. The floor is what an on-policy step cannot go
  below without overlapping generation and training; our distance to it is everything else (sync,
  sleep/wake, rewards, packing, Python), and TRL's step over it is the most a step that generates, then
  trains, can gain.
--shape NAME (0.5b, 0.5b_lora, 1.5b, 7b_lora; settings.SHAPES) runs a shape's arms (ours_default: train.py as a
user types it; trl_tuned: TRL's anchor and its candidates in one process, the fastest kept) and also writes
the shape's objects into bench/results/<date>-shapes.json (bench.shapes); bench/shapes.sh runs every shape.

Each command also records its machine: the CPU (generation is bound by it) and its load at the start, and
the GPU with its driver. Machines of one kind have differed by 20-40% from one lease to the next.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.arms import prepare, run_arm
from bench.host import PeakDeviceMemory, cpu_speeds, git_commit, machine, speeds_summary
from bench.processes import MultiProcessService, child_env, sigterm_exits, stop_gently
from bench.report import rewrite, write_results
from bench.settings import (
    ANCHOR_ARMS,
    ARMS,
    FLOOR_OF,
    RESULTS,
    SHAPE_ARMS,
    SHAPES,
    SMOKE,
    Settings,
    parse_settings,
    settings_from_json,
    shape_settings,
)
from bench.shapes import peak_bf16_flops, shape_entries, write_shapes
from bench.summary import flops_per_token, summarize
from bench.trl_sweep import sweep_path, tuned_result


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arms", help=f"comma-separated, from {','.join(ARMS)} (default: all; --smoke: those without vLLM)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on the CPU, no vLLM: checks the harness"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="change a setting, e.g. sleep_level=0"
    )
    parser.add_argument(
        "--shape",
        choices=list(SHAPES),
        help="issue 27's shape: its model, LoRA, lengths and arms (settings.SHAPES)",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="build the model and prompts in --workdir and stop (a later command with the same settings uses them)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument(
        "--arm-timeout-s", type=float, default=900.0, help="an arm running longer is stopped and reported"
    )
    parser.add_argument(
        "--time-limit-s",
        type=float,
        help="the whole command's limit: each arm is stopped 20 s before it (TRL's sweep keeps what it measured)",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these arms to the results of an earlier command of the same commit and settings",
    )
    parser.add_argument("--report", type=Path, help="rewrite the .md and .png of a results .json, and stop")
    parser.add_argument("--run-arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    return parser


def default_arms(shape: str | None) -> list[str]:
    """The arms of a command without --arms: a shape's (with the off-policy row at the 0.5B anchor; TRL's sweep
    last, as a sweep stopped by --time-limit-s keeps what it measured), or the anchor's."""
    if shape is None:
        return list(ANCHOR_ARMS)
    ours, trl = SHAPE_ARMS[SHAPES[shape][1]]
    return [ours, *(["ours_offpolicy"] if shape == "0.5b" else []), trl]


def prepare_process(settings: Settings, workdir: Path) -> None:
    """The model and prompts (arms.prepare; or those an earlier command left for these settings), made in a
    process of its own: on a GPU the model's random weights are drawn there (seconds; a CPU draws a 7B model's
    in minutes), and this process opens no CUDA context (it would count in every arm's peak memory)."""
    command = [sys.executable, "-m", "bench", "--prepare-only", "--settings", json.dumps(asdict(settings))]
    subprocess.run(
        [*command, "--workdir", str(workdir)], env=child_env(MultiProcessService(False, workdir)), check=True
    )


def run_arm_process(arm: str, settings: Settings, workdir: Path, timeout_s: float, env: dict) -> dict | str:
    """One arm in a process of its own: its raw measurements, or why it failed (with its log's tail)."""
    log_path = workdir / f"{arm}.log"
    sweep_path(workdir / arm).unlink(missing_ok=True)  # (an earlier command's: not this arm's candidates)
    command = [sys.executable, "-m", "bench", "--run-arm", arm, "--settings", json.dumps(asdict(settings))]
    command += ["--workdir", str(workdir)]
    with open(log_path, "w") as log_file, PeakDeviceMemory(settings.device) as memory:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout_s:.0f} s"
            stop_gently(process)
        except BaseException:  # this command stopped (sigterm_exits, Ctrl-C): the arm with it
            stop_gently(process)
            raise
    if code != 0:
        tail = log_path.read_text()[-1500:]
        print(f"bench: {arm} FAILED ({code}); log: {log_path}\n{tail}", flush=True)
        partial = sweep_path(workdir / arm)
        tuned = tuned_result(json.loads(partial.read_text())) if partial.exists() else None
        if tuned is None:
            return f"exit {code}; log tail:\n```\n{tail}\n```"
        # TRL's sweep stopped (out of time, say): the candidates it measured, the fastest of them kept
        tuned["stopped"] = f"exit {code}"
        return {**tuned, "peak_gpu_gib": memory.gib}
    # the whole process's peak, engine start included (both frameworks start theirs the same way)
    return {**json.loads((workdir / f"{arm}.json").read_text()), "peak_gpu_gib": memory.gib}


def earlier_results(options: argparse.Namespace, settings: Settings, commit: str, run_name: str, path: Path):
    """(the results file this command writes, the earlier command's results it adds its arms to, or None).
    --append: this command's arms join those of an earlier command's results (same commit and settings),
    found by the commit (that command may have started on another date)."""
    if not options.append:
        if path.exists():  # a second command must not erase the first's results
            raise SystemExit(
                f"{path} exists: add these arms to it with --append, or write elsewhere with --out DIR"
            )
        return path, None
    found = sorted(options.out.glob(f"????-??-??-{run_name}.json"))  # <date>-<commit>.json
    if not found:  # else its arms would land in a file of their own, their ratios silently apart
        raise SystemExit(
            f"--append: no results of commit {commit} in {options.out}: point --out at the directory of "
            "the first command's results, or leave out --append"
        )
    earlier = json.loads(found[-1].read_text())
    if earlier["settings"] != json.loads(json.dumps(asdict(settings))) or earlier["commit"] != commit:
        raise SystemExit(f"--append: {found[-1]} has other settings or another commit; leave out --append")
    return found[-1], earlier


def main() -> None:
    parser = arguments()
    options = parser.parse_args()

    if options.run_arm:
        with (
            sigterm_exits()
        ):  # the driver's SIGTERM (the arm's time is up) unwinds it: a server arm stops its server
            run_arm(options.run_arm, settings_from_json(json.loads(options.settings)), options.workdir)
        return
    if options.report:
        print(rewrite(options.report))
        return

    base = (
        shape_settings(SMOKE, options.shape, resize=False)
        if options.smoke
        else shape_settings(Settings(), options.shape)
    )
    settings = parse_settings(base, options.set)
    command_started = time.monotonic()
    if options.prepare_only:
        if options.settings:  # (the driver's own settings, from prepare_process)
            settings = settings_from_json(json.loads(options.settings))
        options.workdir.mkdir(parents=True, exist_ok=True)
        prepare(settings, options.workdir)
        return
    defaults = [arm for arm in default_arms(options.shape) if settings.use_vllm or not ARMS[arm][2]]  # (vLLM)
    arms = [arm for arm in (options.arms or ",".join(defaults)).split(",") if arm]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}: choose from {','.join(ARMS)}")
    if options.shape:
        lora = SHAPES[options.shape][1]
        other = [arm for arm in arms if ARMS[arm][1] != lora]
        if other:
            parser.error(
                f"--shape {options.shape} trains {'LoRA' if lora else 'all weights'}; {other} do not"
            )
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = os.environ.get("BENCH_COMMIT") or git_commit()  # a copied tree without .git: say which commit
    run_name = commit + ("-smoke" if options.smoke else "") + (f"-{options.shape}" if options.shape else "")
    stem = f"{started[:10]}-{run_name}"
    options.out.mkdir(parents=True, exist_ok=True)
    options.workdir.mkdir(parents=True, exist_ok=True)
    results_path, earlier = earlier_results(options, settings, commit, run_name, options.out / f"{stem}.json")
    print(f"bench: setup in {options.workdir}", flush=True)
    prepare_process(settings, options.workdir)

    rows = [row for row in earlier["arms"] if row["arm"] not in arms] if earlier else []
    failures = {arm: why for arm, why in earlier["failures"].items() if arm not in arms} if earlier else {}
    commands = (earlier["commands"] if earlier else []) + [
        {
            "started": started,
            "arms": arms,
            "machine": machine(),
            "argv": ["python", "-m", "bench", *sys.argv[1:]],
        }
    ]
    gpu = (commands[-1]["machine"]["gpus"] or [None])[0] if settings.device == "cuda" else None
    with (
        sigterm_exits(),
        MultiProcessService(settings.mps, options.workdir / "mps") as mps,  # (--set mps=true only)
    ):
        env = child_env(mps)
        for arm in arms:
            print(f"bench: {arm}", flush=True)
            # how fast the host's CPUs run Python around the arm (other tenants: see report.host_cpu_lines)
            cpus_before = speeds_summary(cpu_speeds())
            t = time.perf_counter()
            timeout_s = options.arm_timeout_s
            if options.time_limit_s:  # leave the command's last arm time to stop and to write what it has
                timeout_s = min(timeout_s, options.time_limit_s - (time.monotonic() - command_started) - 20)
            outcome = run_arm_process(arm, settings, options.workdir, max(timeout_s, 1.0), env)
            if isinstance(outcome, str):
                failures[arm] = outcome
            else:
                flops = flops_per_token(options.workdir / "model", ARMS[arm][1])
                row = summarize(arm, outcome, settings, flops, peak_bf16_flops(gpu))
                row["process_s"] = time.perf_counter() - t
                row["host_cpus_ms"] = {"before": cpus_before, "after": speeds_summary(cpu_speeds())}
                row["command"] = len(commands)  # which command of `commands` measured it
                rows.append(row)
                print(f"bench: {arm}: {json.dumps(row)}", flush=True)
                profile = options.workdir / f"{arm}-train-profile.txt"
                if arm in FLOOR_OF and settings.profile and profile.exists():
                    shutil.copy(profile, options.out / f"{stem}-{arm}-train-profile.txt")
            # after every arm, so that a run cut short still leaves what it measured
            rows.sort(key=lambda row: list(ARMS).index(row["arm"]))
            table = write_results(results_path, rows, settings, commit, commands, failures)
            if options.shape:  # its rows of <date>-shapes.json, the date of its first command
                context = {
                    "commit": commit,
                    "gpu": gpu,
                    "results_file": results_path.name,
                    "bench_commands": [" ".join(command.get("argv", [])) for command in commands],
                }
                shapes_path = options.out / f"{results_path.name[:10]}-shapes.json"
                write_shapes(shapes_path, options.shape, shape_entries(rows, options.shape, context))
    print(table)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
