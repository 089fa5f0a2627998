"""Summarise a Hydra sweep (`python train.py -m ...`): one row per job in summary.md, curves in summary.png.

    python scripts/summarize_sweep.py multirun/2026-11-23/10-00-00
    python scripts/summarize_sweep.py            # the newest sweep under multirun/

Each job directory holds metrics.jsonl (train lines and eval/ lines) and .hydra/overrides.yaml. The table
shows the overrides that differ between jobs, the final and best mean reward, the last evaluation's
scores and the mean seconds per step; the plot shows the reward per step and the eval scores per job.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml
from summarize_metrics import read_metrics

REWARD = "reward/total_mean"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job directories (those with metrics), in job-number order."""
    jobs = [path.parent for path in sweep_dir.glob("*/metrics.jsonl")]
    return sorted(
        jobs,
        key=lambda path: (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name),
    )


def job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.exists() else []


def summarise_job(job_dir: Path) -> dict:
    rows = read_metrics(job_dir / "metrics.jsonl")
    train = [row for row in rows if REWARD in row]
    evals = [row for row in rows if any(key.startswith("eval/") for key in row)]
    rewards = [row[REWARD] for row in train]
    step_seconds = [row["time/step_s"] for row in train if "time/step_s" in row]
    return {
        "name": job_dir.name,
        "overrides": job_overrides(job_dir),
        "train": train,
        "evals": evals,
        "final_reward": rewards[-1] if rewards else math.nan,
        "best_reward": max(rewards) if rewards else math.nan,
        "final_eval": {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {},
        "s_per_step": sum(step_seconds) / len(step_seconds) if step_seconds else math.nan,
    }


def varying_overrides(jobs: list[dict]) -> tuple[list[str], list[str]]:
    """(the overrides every job shares, the keys whose values differ between jobs)."""
    shared = set.intersection(*(set(job["overrides"]) for job in jobs)) if jobs else set()
    keys = []
    for job in jobs:
        for override in job["overrides"]:
            key = override.split("=", 1)[0]
            if override not in shared and key not in keys:
                keys.append(key)
    return sorted(shared), keys


def override_value(job: dict, key: str) -> str:
    for override in job["overrides"]:
        name, _, value = override.partition("=")
        if name == key:
            return value
    return "(default)"


def markdown_table(jobs: list[dict], sweep_dir: Path) -> str:
    shared, keys = varying_overrides(jobs)
    logged = {key for job in jobs for key in job["final_eval"]}
    pass_at_k = sorted(
        (k for k in logged if k.startswith("eval/pass@") and k[10:].isdigit()), key=lambda k: int(k[10:])
    )
    eval_keys = [k for k in ("eval/pass@1_greedy", *pass_at_k, "eval/reward_mean") if k in logged]
    header = [
        "job",
        *keys,
        "final reward",
        "best reward",
        *(k.removeprefix("eval/") for k in eval_keys),
        "s/step",
    ]
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        f"{len(jobs)} jobs; shared overrides: {' '.join(shared) if shared else '(none)'}.",
        "Rewards are reward/total_mean per step; eval columns are the last evaluation (eval/ in metrics.jsonl).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for job in jobs:
        cells = [job["name"], *(override_value(job, key) for key in keys)]
        cells += [f"{job['final_reward']:.3f}", f"{job['best_reward']:.3f}"]
        cells += [f"{job['final_eval'][k]:.3f}" if k in job["final_eval"] else "" for k in eval_keys]
        cells.append(f"{job['s_per_step']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(jobs: list[dict], path: Path) -> None:
    """Three panels, one colour per job: mean reward per step, eval pass@1 (greedy solid, sampled dashed)
    and eval mean reward (sampled) per evaluation."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    _, keys = varying_overrides(jobs)
    figure, (rewards, passes, eval_rewards) = plt.subplots(1, 3, figsize=(16, 4.5))
    for job in jobs:
        label = f"{job['name']}: " + " ".join(f"{k}={override_value(job, k)}" for k in keys)
        line = rewards.plot(
            [r["step"] for r in job["train"]], [r[REWARD] for r in job["train"]], label=label
        )[0]
        for axis, key, style in (
            (passes, "eval/pass@1_greedy", "o-"),
            (passes, "eval/pass@1", "o--"),
            (eval_rewards, "eval/reward_mean", "o-"),
        ):
            points = [e for e in job["evals"] if key in e]
            axis.plot([e["step"] for e in points], [e[key] for e in points], style, color=line.get_color())
    rewards.set(title="mean reward per step", xlabel="step", ylabel=REWARD)
    passes.set(title="eval pass@1: greedy (solid), sampled (dashed)", xlabel="step", ylim=(-0.05, 1.05))
    eval_rewards.set(title="eval mean reward (sampled)", xlabel="step", ylabel="eval/reward_mean")
    if not any(job["evals"] for job in jobs):
        passes.set_title("no evaluation ran (eval_every=0)")
    rewards.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def newest_sweep(root: Path) -> Path:
    sweeps = sorted(path.parent.parent for path in root.glob("*/*/*/metrics.jsonl"))
    if not sweeps:
        raise SystemExit(f"no sweep with metrics under {root}/: pass the sweep directory")
    return sweeps[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a multirun directory; default: the newest")
    sweep_dir = parser.parse_args().sweep_dir or newest_sweep(Path("multirun"))
    jobs = [summarise_job(job) for job in job_dirs(sweep_dir)]
    if not jobs:
        raise SystemExit(f"{sweep_dir} has no job directories with metrics.jsonl")
    table = markdown_table(jobs, sweep_dir)
    (sweep_dir / "summary.md").write_text(table)
    plot(jobs, sweep_dir / "summary.png")
    print(table)
    print(f"Wrote {sweep_dir / 'summary.md'} and {sweep_dir / 'summary.png'}")


if __name__ == "__main__":
    main()
