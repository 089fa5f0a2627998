"""Issue 27's results file, bench/results/<date>-shapes.json: a list with one object per shape and arm (the
0.5B anchor, its LoRA, the Qwen2.5-1.5B shape, the Qwen2.5-7B shape with LoRA), each command of `python -m bench
--shape NAME` replacing its own shape's rows; and the small sums its fields are made of (medians, MFU, shares,
ratios).

The arms as the file names them: ours_default (train.py as a user types it), ours_tuned (the bench's speed
settings), ours_off_policy, ours_server, ours_server_k1, ours_server_k2 (against a stock vLLM server on the same
GPU, on-policy and k updates behind: bench.server), trl_anchor (TRL with the notebook's settings), trl_tuned (TRL's fastest candidate).
Ratios are TRL's median step over ours, measured in one command where both ran in one; else (a shape whose arms
do not fit one command, joined by --append) against TRL's latest command, `ratio_same_command` saying which.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# dense bf16 tensor-core peaks (NVIDIA's data sheets), by a part of the name nvidia-smi gives; first match wins
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (HBM3)
    ("H200", 989e12),
    ("A100", 312e12),
)
# the bench's arm -> the file's
SHAPE_ARMS = {
    "ours_default": "ours_default",
    "ours_default_lora": "ours_default",
    "ours_full": "ours_tuned",
    "ours_lora": "ours_tuned",
    "ours_offpolicy": "ours_off_policy",
    "trl_full": "trl_anchor",
    "trl_lora": "trl_anchor",
    "trl_tuned": "trl_tuned",
    "trl_tuned_lora": "trl_tuned",
    "ours_server": "ours_server",
    "ours_server_k1": "ours_server_k1",
    "ours_server_k2": "ours_server_k2",
}


def median(values: list[float]) -> float | None:
    """The median of the values (None of none)."""
    return statistics.median(values) if values else None


def peak_bf16_flops(gpu: str | None) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s from its name (None: no GPU, or one not in PEAK_BF16_FLOPS)."""
    for part, flops in PEAK_BF16_FLOPS:
        if gpu and part in gpu:
            return flops
    return None


def mfu(flops: float, seconds: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOPs done in `seconds` over the GPU's peak (None if either is unknown)."""
    if not seconds or not peak_flops:
        return None
    return flops / seconds / peak_flops


def share(part_s: float | None, step_s: float | None) -> float | None:
    """The part's share of the step."""
    if part_s is None or not step_s:
        return None
    return part_s / step_s


def ratio(trl_s: float | None, ours_s: float | None) -> float | None:
    """How many times faster our step is: TRL's median seconds over ours."""
    if trl_s is None or not ours_s:
        return None
    return trl_s / ours_s


def vllm_awake_gib(awake_gib: float | None, asleep_gib: float | None) -> float | None:
    """What an awake engine holds beyond the device's use while it sleeps (our colocated vLLM's share)."""
    if awake_gib is None or asleep_gib is None:
        return None
    return awake_gib - asleep_gib


def trl_phases(record: dict, train_flops: float, peak_flops: float | None) -> dict:
    """A TRL run's measured steps (step_s, generate_s, sync_s per step) as fields: the median step, its
    generation (TRL's _generate_single_turn without the weight sync), sync, and the rest, training (with the
    rewards and the advantages, which take milliseconds); the train phase's MFU; TRL keeps vLLM awake, so the
    sync is its whole sync + sleep share."""
    step = median(record["step_s"])
    train = median([s - g - y for s, g, y in zip(record["step_s"], record["generate_s"], record["sync_s"])])
    sync = median(record["sync_s"])
    return {
        "median_step_s": step,
        "generate_s": median(record["generate_s"]),
        "train_s": train,
        "sync_s": sync,
        "sleep_wake_s": 0.0,
        "sync_sleep_share": share(sync, step),
        "train_mfu": mfu(train_flops, train, peak_flops),
    }


def entry(row: dict, shape: str, arm: str, context: dict) -> dict:
    """One object of the file from a row of the bench's results (or a record of TRL's sweep: the anchor)."""
    phases = row.get("phases_s") or {}
    return {
        "shape": shape,
        "arm": arm,
        "bench_arm": row["arm"],
        "command": row.get("arm_command"),
        **context,
        "measured_in_command": row.get("command"),
        "median_step_s": row.get("s_per_step_median", row.get("median_step_s")),
        "steps_s": row.get("steps_s", row.get("step_s")),
        # the device's peak while the arm's process ran (nvidia-smi; vLLM's pool included); for TRL's anchor
        # and tuned rows, the whole sweep's process (an upper bound): compare trainer_peak_reserved_gib there
        "peak_mem_gib": row.get("peak_gpu_gib"),
        "trainer_peak_allocated_gib": row.get("peak_allocated_gib"),
        "trainer_peak_reserved_gib": row.get("peak_reserved_gib"),
        "vllm_gib": row.get("vllm_gib"),
        "train_mfu": row.get("train_mfu"),
        "sync_sleep_share": row.get("sync_sleep_share"),
        "generate_s": phases.get("generate", row.get("generate_s")),
        "train_s": phases.get("train", row.get("train_s")),
        "sync_s": phases.get("sync", row.get("sync_s")),
        "sleep_wake_s": phases.get("sleep_wake", row.get("sleep_wake_s")),
        # off-policy arms: how many updates behind the trainer each measured step's rollout was
        "staleness": row.get("staleness_steps"),
        "logp_gap_mean": row.get("logp_gap_steps"),
    }


def shape_entries(rows: list[dict], shape: str, context: dict) -> list[dict]:
    """The file's objects for one shape from the rows of its results: every arm the file names; TRL's anchor
    from trl_tuned's sweep where no trl_full/trl_lora ran in that command; our arms' ratios to the TRL rows of
    their command. `context` (commit, GPU, the results file, the bench's command lines) goes into each."""
    entries = [
        entry(row, shape, SHAPE_ARMS[row["arm"]], context)
        for row in rows
        if row["arm"] in SHAPE_ARMS and "s_per_step_median" in row
    ]
    for row in rows:
        if SHAPE_ARMS.get(row["arm"]) != "trl_tuned" or not row.get("sweep"):
            continue
        anchor = row["sweep"][0]
        anchors = [
            e for e in entries if e["arm"] == "trl_anchor" and e["measured_in_command"] == row["command"]
        ]
        if anchor.get("median_step_s") is not None and not anchors:
            measured = {
                **anchor,
                "arm": row["arm"],
                "command": row["command"],
                "peak_gpu_gib": row.get("peak_gpu_gib"),
            }
            entries.append({**entry(measured, shape, "trl_anchor", context), "from_sweep": anchor["name"]})
    for tuned in entries:
        row = next(row for row in rows if row["arm"] == tuned["bench_arm"])
        if tuned["arm"] == "trl_tuned" and row.get("sweep"):  # every candidate's steps, the fastest named
            tuned["tuned"] = row["tuned"]
            tuned["sweep_stopped"] = row.get("sweep_stopped")
            kept = (
                "name",
                "anchor",
                "median_step_s",
                "step_s",
                "warmup_s",
                "peak_reserved_gib",
                "train_mfu",
                "error",
            )
            tuned["sweep"] = [{key: record[key] for key in kept if key in record} for record in row["sweep"]]
    for ours in entries:
        if not ours["arm"].startswith("ours_"):
            continue
        ours["ratio_same_command"] = {}
        for trl in ("trl_tuned", "trl_anchor"):
            twins = [e for e in entries if e["arm"] == trl]
            same = [e for e in twins if e["measured_in_command"] == ours["measured_in_command"]]
            # (else TRL of another command of these settings, --append'ed, the latest: said so beside it)
            twin = (same or sorted(twins, key=lambda e: e["measured_in_command"] or 0)[-1:] or [None])[0]
            ours[f"ratio_vs_{trl}"] = ratio(twin["median_step_s"], ours["median_step_s"]) if twin else None
            ours["ratio_same_command"][trl] = bool(same) if twin else None
    order = [
        "ours_default",
        "ours_tuned",
        "ours_off_policy",
        "ours_server",
        "ours_server_k1",
        "ours_server_k2",
        "trl_anchor",
        "trl_tuned",
    ]
    return sorted(one_per_arm(entries), key=lambda e: order.index(e["arm"]))


def one_per_arm(entries: list[dict]) -> list[dict]:
    """An object per arm: of an arm measured in several commands (--append), the one of ours_default's command,
    else the latest."""
    default = next((e["measured_in_command"] for e in entries if e["arm"] == "ours_default"), None)
    kept: dict[str, dict] = {}
    for e in entries:
        held = kept.get(e["arm"])
        rank = (e["measured_in_command"] == default, e["measured_in_command"] or 0)
        if held is None or rank > (held["measured_in_command"] == default, held["measured_in_command"] or 0):
            kept[e["arm"]] = e
    return list(kept.values())


def merge(existing: list[dict], shape: str, entries: list[dict]) -> list[dict]:
    """The file's objects with this shape's replaced by `entries` (the other shapes' kept, in their order)."""
    return [e for e in existing if e["shape"] != shape] + entries


def write_shapes(path: Path, shape: str, entries: list[dict]) -> None:
    existing = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(merge(existing, shape, entries), indent=1))
