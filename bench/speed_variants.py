"""What bench.train_speed and bench.gen_speed share: each variant of one half of the bench's step runs in a
process of its own (`python -m bench.<module> --run-variant VARIANT`), which writes
<workdir>/<prefix>-<variant>.json and, for the profiled variant, <workdir>/<prefix>-<variant>-<kind>.txt; the
driver gathers them into <out>/<prefix>-<date>-<commit>.json (then -2, -3, ... for later commands of that
commit and UTC day) after every variant, so that a command cut short still leaves what it measured, and copies
the profile tables beside it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from bench.arms import prepare
from bench.host import git_commit, machine
from bench.processes import MultiProcessService, child_env, sigterm_exits
from bench.settings import RESULTS, Settings


def parser(module: str, description: str, variants: dict, profile_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(variants), help=f"from {','.join(variants)}")
    parser.add_argument("--profile", help=profile_help)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on the CPU: checks, measures nothing"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument(
        "--mps",
        action="store_true",
        help="run every variant with CUDA's Multi-Process Service (as the bench's --set mps=true): engines in "
        "processes of their own then run kernels at once instead of in turns",
    )
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)  # internal: one variant in this process
    return parser


def written(workdir: Path, prefix: str, variant: str, kind: str | None = None) -> Path:
    """What a variant's process writes: its results (.json), or one of its profile tables (kind)."""
    return workdir / (f"{prefix}-{variant}-{kind}.txt" if kind else f"{prefix}-{variant}.json")


def unused_stem(out: Path, stem: str) -> str:
    """stem, or stem-2, stem-3, ...: the first with no results file in out. A second command of one commit on
    one day gets files of its own (repeating a command is how these scripts show their noise)."""
    number, candidate = 1, stem
    while (out / f"{candidate}.json").exists():
        number += 1
        candidate = f"{stem}-{number}"
    return candidate


def run(
    module: str,
    prefix: str,
    parser: argparse.ArgumentParser,
    options: argparse.Namespace,
    settings: Settings,
    known: dict,
    kinds: tuple[str, ...],
) -> tuple[list[dict], dict[str, str]]:
    """Every variant of --variants in a process of its own (`python -m <module>`): (their results, why each
    failed one failed)."""
    variants = [v for v in options.variants.split(",") if v]
    unknown = [v for v in variants if v not in known]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {','.join(known)}")
    if options.profile and options.profile not in variants:
        parser.error(f"--profile {options.profile}: not one of --variants {','.join(variants)}")
    commit = os.environ.get("BENCH_COMMIT") or git_commit()
    options.out.mkdir(parents=True, exist_ok=True)
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")  # UTC, as the bench's files
    stem = unused_stem(options.out, f"{prefix}-{today}-{commit}" + ("-smoke" if options.smoke else ""))
    options.workdir.mkdir(parents=True, exist_ok=True)
    if not (options.workdir / "prompts.jsonl").exists():
        prepare(settings, options.workdir)
    results, failures, host = [], {}, machine()
    with sigterm_exits(), MultiProcessService(options.mps, options.workdir / "mps") as mps:
        env = child_env(mps)
        for variant in variants:  # each in a process of its own: a fresh CUDA context and compile cache
            run_variant(module, prefix, options, variant, env, kinds, stem, results, failures)
            summary = {
                "commit": commit,
                "machine": host,
                "settings": asdict(settings),
                "mps": options.mps,
                "variants": results,
                "failures": failures,
            }
            (options.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    return results, failures


def run_variant(
    module: str,
    prefix: str,
    options,
    variant: str,
    env: dict,
    kinds,
    stem: str,
    results: list,
    failures: dict,
) -> None:
    """One variant in a process of its own: its results appended to `results` (and its profile tables copied
    beside the command's results), or why it failed put in `failures`."""
    command = [sys.executable, "-m", module, "--run-variant", variant, "--workdir", str(options.workdir)]
    command += (["--smoke"] if options.smoke else []) + (
        ["--profile", variant] if variant == options.profile else []
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        failures[variant] = done.stderr[-1500:]
        print(f"{variant} FAILED:\n{failures[variant]}", flush=True)
        return
    results.append(json.loads(written(options.workdir, prefix, variant).read_text()))
    print(json.dumps(results[-1]), flush=True)
    for kind in kinds if variant == options.profile else ():
        table = written(options.workdir, prefix, variant, kind)
        if table.exists():  # (some only on a GPU)
            shutil.copy(table, options.out / f"{stem}-{variant}-{kind}.txt")
