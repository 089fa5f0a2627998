"""The summary of scripts/gpu_validate_server_ipc.sh (issue 28, point 5): per run, the logp gap of every step
(checked at the on-policy ones), sync seconds, staleness, reward first -> last, median s/step and the GPU
memory of the server and of the trainer, from the work directory the script leaves.

    python scripts/summarize_server_ipc.py WORK --out OUT

WORK holds runs.tsv (name, start, end, trainer pid, exit status), server.txt (when the server came up),
memory.csv (nvidia-smi each second: `t,app,pid,MiB` per compute app and `t,device,MiB`) and
runs/<name>/metrics.jsonl. OUT gets summary.json, summary.md and metrics.jsonl (every run's lines, each with
its "run"); summary.md is printed too.
"""

import argparse
import json
import statistics
from pathlib import Path

MAX_LOGP_GAP = 0.1  # vllm.max_logp_gap's default, which the runs keep


def read_memory(path: Path) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """(per compute app: time, pid, MiB), (the device: time, MiB); lines nvidia-smi could not fill are left out."""
    apps, device = [], []
    for line in path.read_text().splitlines() if path.exists() else []:
        fields = [field.strip() for field in line.split(",")]
        try:
            if fields[1] == "app" and len(fields) == 4:
                apps.append((int(fields[0]), int(fields[2]), int(fields[3])))
            elif fields[1] == "device" and len(fields) == 3:
                device.append((int(fields[0]), int(fields[2])))
        except ValueError:  # "[N/A]", "[Not Supported]"
            continue
    return apps, device


def peak_mib(samples: dict[int, int]) -> int | None:
    return max(samples.values()) if samples else None


def memory_of(apps, device, begin: int, end: int, trainer_pid: int | None, server_alone: int | None) -> dict:
    """The peaks in [begin, end] of the trainer's process, of every other process (the server), and of the
    device; where nvidia-smi shows no processes (a container hides their pids), the trainer's is estimated as
    the device's peak less the server alone on it."""
    trainer, others = {}, {}
    for t, pid, mib in apps:
        if begin <= t <= end:
            into = trainer if pid == trainer_pid else others
            into[t] = into.get(t, 0) + mib
    device_peak = peak_mib({t: mib for t, mib in device if begin <= t <= end})
    memory = {
        "trainer_mib": peak_mib(trainer),
        "server_mib": peak_mib(others),
        "device_peak_mib": device_peak,
    }
    if memory["trainer_mib"] is None and device_peak is not None:
        memory["trainer_mib_estimated"] = device_peak - (server_alone or 0)
    return memory


def run_summary(lines: list[dict]) -> dict:
    """One run's numbers from its metrics.jsonl lines."""
    steps = [m for m in lines if "reward/total_mean" in m]
    if not steps:
        return {"steps": 0}
    gaps = [m.get("sync/logp_gap_mean") for m in steps]
    staleness = [int(m.get("rollout/staleness", 0)) for m in steps]
    on_policy = [gap for gap, behind in zip(gaps, staleness) if behind == 0 and gap is not None]
    rewards = [m["reward/total_mean"] for m in steps]
    seconds = [m["time/step_s"] for m in steps]
    sync = [m.get("time/sync_s") for m in steps]
    return {
        "steps": len(steps),
        "logp_gap_mean": gaps,
        "staleness": staleness,
        "on_policy_gap_max": max(on_policy, default=None),
        "gap_ok": bool(on_policy) and max(on_policy) <= MAX_LOGP_GAP,
        "sync_s": sync,
        "sync_s_median": statistics.median([s for s in sync if s is not None] or [0.0]),
        "reward_first": rewards[0],
        "reward_last": rewards[-1],
        "reward_first3": statistics.mean(rewards[:3]),
        "reward_last3": statistics.mean(rewards[-3:]),
        "first_step_s": seconds[0],
        # after the first (CUDA graphs, caches): the steady step
        "median_step_s": statistics.median(seconds[1:] or seconds),
        "trainer_torch_peak_reserved_gib": max(
            (m["memory/torch_peak_reserved_gib"] for m in steps if "memory/torch_peak_reserved_gib" in m),
            default=None,
        ),
    }


def summarize(work: Path) -> dict:
    server = (work / "server.txt").read_text().split() if (work / "server.txt").exists() else []
    server_up = int(server[1]) if len(server) > 1 and server[0] == "server_up" and server[1] != "-" else None
    apps, device = read_memory(work / "memory.csv")
    runs = []
    index = [line.split("\t") for line in (work / "runs.tsv").read_text().splitlines() if line.strip()]
    begins = [int(begin) for _, begin, *_ in index if begin != "-"]
    # the server alone on the GPU: from its /health to the first run's start
    server_alone = None
    if server_up is not None and begins:
        server_alone = peak_mib({t: mib for t, mib in device if server_up <= t < min(begins)})
    for name, begin, end, pid, status in index:
        record = {"run": name, "status": status}
        metrics = work / "runs" / name / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        record.update(run_summary(lines))
        if begin != "-":
            record["seconds"] = int(end) - int(begin)
            record["memory"] = memory_of(
                apps, device, int(begin), int(end), int(pid), server_alone if name != "colocate" else None
            )
        runs.append({**record, "_lines": lines})
    return {"server": " ".join(server), "server_alone_mib": server_alone, "runs": runs}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    out = [
        f"Server: {summary['server'] or '-'}; the server alone on the GPU: "
        f"{fmt(summary['server_alone_mib'], 'd')} MiB",
        "",
        "| run | exit | steps | on-policy gap max | gap ok | sync s (median) | reward first -> last "
        "(first 3 -> last 3) | median s/step (first) | trainer MiB | server MiB | device peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in summary["runs"]:
        memory = run.get("memory", {})
        trainer = memory.get("trainer_mib")
        trainer_text = (
            fmt(trainer, "d") if trainer is not None else f"~{fmt(memory.get('trainer_mib_estimated'), 'd')}"
        )
        reward = (
            f"{run['reward_first']:.3f} -> {run['reward_last']:.3f} "
            f"({run['reward_first3']:.3f} -> {run['reward_last3']:.3f})"
            if run.get("steps")
            else "-"
        )
        out.append(
            f"| {run['run']} | {run['status']} | {run.get('steps', 0)} | "
            f"{fmt(run.get('on_policy_gap_max'), '.4f')} | {run.get('gap_ok', '-')} | "
            f"{fmt(run.get('sync_s_median'), '.3f')} | {reward} | {fmt(run.get('median_step_s'), '.2f')} "
            f"({fmt(run.get('first_step_s'), '.1f')}) | {trainer_text} | {fmt(memory.get('server_mib'), 'd')} | "
            f"{fmt(memory.get('device_peak_mib'), 'd')} |"
        )
    out += ["", "Per step: logp gap mean / staleness / sync s", ""]
    for run in summary["runs"]:
        if run.get("steps"):
            cells = [
                f"{fmt(gap, '.4f')}/{behind}/{fmt(sync, '.2f')}"
                for gap, behind, sync in zip(run["logp_gap_mean"], run["staleness"], run["sync_s"])
            ]
            out.append(f"- {run['run']}: " + " ".join(cells))
    out.append(
        "\n`~`: the device's peak less the server alone (nvidia-smi showed no processes); trainer MiB of colocate "
        "includes its vLLM engine"
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    summary = summarize(options.work)
    options.out.mkdir(parents=True, exist_ok=True)
    with (options.out / "metrics.jsonl").open("w") as metrics:
        for run in summary["runs"]:
            for line in run.pop("_lines"):
                metrics.write(json.dumps({"run": run["run"], **line}) + "\n")
    (options.out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary)
    (options.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
