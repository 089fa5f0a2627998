"""An arm's raw measurements as a row of the results (summarize), and what the rows of a command say together:
ours / TRL (ratios), each step over its floor (floor_bounds), issue 6's targets (targets)."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.settings import ARMS, FLOOR_OF, Settings

H200_BF16_DENSE_FLOPS = 989e12  # the H200's dense bf16 tensor-core peak (NVIDIA's data sheet)


def train_mfu(train_s: float, settings: Settings, flops_per_token: float) -> float | None:
    """The share of the H200's bf16 peak that an optimizer step over one rollout's tokens (prompts and
    completions) reaches in train_s seconds; None off a GPU."""
    if settings.device != "cuda":
        return None
    tokens_per_step = (
        settings.prompts_per_step
        * settings.num_generations
        * (settings.prompt_tokens + settings.completion_tokens)
    )
    return flops_per_token * tokens_per_step / train_s / H200_BF16_DENSE_FLOPS


def summarize(arm: str, raw: dict, settings: Settings, flops_per_token: float) -> dict:
    """One arm's row of the results: medians and spreads over the measured steps."""
    if arm in FLOOR_OF:
        generate, train = statistics.median(raw["generate_s"]), statistics.median(raw["train_s"])
        return {
            "arm": arm,
            "generate_alone_s": generate,
            "train_alone_s": train,
            "floor_s": generate + train,
            "train_mfu": train_mfu(train, settings, flops_per_token),
            "generate_alone_steps_s": raw["generate_s"],
            "train_alone_steps_s": raw["train_s"],
            "generate_alone_gc_s": raw["generate_gc_s"],  # of it, in Python's garbage collector
            "generate_alone_cpu_s": raw["generate_cpu_s"],  # the main thread's CPU seconds in it
            "generate_alone_steal_s": raw["generate_steal_s"],  # the host's, from all CPUs, meanwhile
        }
    seconds = raw["step_s"]
    row = {
        "arm": arm,
        "s_per_step_median": statistics.median(seconds),
        "s_per_step_min": min(seconds),
        "s_per_step_max": max(seconds),
        "completion_tokens_per_s": statistics.median(
            t / s for t, s in zip(raw["completion_tokens"], seconds)
        ),
        "peak_gpu_gib": raw["peak_gpu_gib"],
        "steps_s": seconds,
    }
    phases = raw.get("phases")
    if phases:
        row.update(
            {
                "phases_s": phases,
                "generate_steps_s": raw["generate_s"],
                "train_steps_s": raw["train_s"],
                "gc_steps_s": raw["gc_s"],
                "gc_full_steps_s": raw.get("gc_full_s"),
                "gc_full_collections_steps": raw.get("gc_full_collections"),
                "gc_full_collected_steps": raw.get("gc_full_collected"),
                "generate_cpu_steps_s": raw["generate_cpu_s"],
                "generate_steal_steps_s": raw["generate_steal_s"],
                "sync_sleep_share": (phases["sync"] + phases["sleep_wake"]) / row["s_per_step_median"],
                "train_mfu": train_mfu(phases["train"], settings, flops_per_token),
            }
        )
    return row


def targets(rows: list[dict]) -> list[dict]:
    """Issue 6's targets on the anchor, each with what this run measured (None: an arm it needs did not run)."""
    by_arm = {row["arm"]: row for row in rows}
    pairs = ratios(rows)
    ours, floor, trl = by_arm.get("ours_full"), by_arm.get("floor"), by_arm.get("trl_full")
    measured = [
        ("full fine-tune: ours / TRL completion tok/s", ">= 2.0", pairs.get("full"), lambda v: v >= 2.0),
        (
            "full fine-tune: step / floor (generation alone + training alone)",
            "<= 1.10",
            floor_bounds(rows).get("floor", {}).get("step_over_floor"),
            lambda v: v <= 1.10,
        ),
        ("LoRA r=8: ours / TRL completion tok/s", ">= 2.8", pairs.get("lora"), lambda v: v >= 2.8),
        (
            "one-step off-policy: ours / TRL (on-policy) completion tok/s",
            ">= 2.6",
            pairs.get("offpolicy"),
            lambda v: v >= 2.6,
        ),
        (
            "train phase MFU (training alone)",
            ">= 40%",
            floor["train_mfu"] if floor else None,
            lambda v: v >= 0.40,
        ),
        (
            "sync + sleep/wake share of our step",
            "<= 3%",
            ours["sync_sleep_share"] if ours else None,
            lambda v: v <= 0.03,
        ),
        (
            "peak GPU memory: ours / TRL",
            "<= 1.0",
            ours["peak_gpu_gib"] / trl["peak_gpu_gib"]
            if ours and trl and ours["peak_gpu_gib"] and trl["peak_gpu_gib"]
            else None,
            lambda v: v <= 1.0,
        ),
    ]
    return [
        {
            "target": name,
            "goal": goal,
            "measured": value,
            "met": None if value is None else bool(check(value)),
        }
        for name, goal, value, check in measured
    ]


def floor_bounds(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per floor arm, measured in the same command: our step / floor, and TRL's step / floor (the ratio to TRL
    that an on-policy step would reach at the floor; a target above it needs generation or training faster)."""
    by_arm = {row["arm"]: row for row in rows}
    bounds = {}
    for floor_arm, (ours_arm, trl_arm) in FLOOR_OF.items():
        floor = by_arm.get(floor_arm)
        if floor is None:
            continue
        bounds[floor_arm] = {
            key: by_arm[arm]["s_per_step_median"] / floor["floor_s"]
            for key, arm in (("step_over_floor", ours_arm), ("trl_over_floor", trl_arm))
            if arm in by_arm and by_arm[arm].get("command") == floor.get("command")
        }
    return bounds


def flops_per_token(model_dir: Path, lora: bool) -> float:
    """Forward + backward FLOPs per trained token: 6 N (full) or 4 N (LoRA: no weight gradients of the
    frozen base), N counting the tied embedding once as the output projection; attention scores left out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    params = sum(p.numel() for p in model.parameters())
    return (4 if lora else 6) * params


def ratios(rows: list[dict]) -> dict[str, float]:
    """ours / TRL completion tokens per second, per pair of arms that both ran."""
    by_arm = {row["arm"]: row for row in rows if "completion_tokens_per_s" in row}
    twins = {
        arm: "trl_full" if ARMS[arm][2] else arm.replace("ours_", "trl_")
        for arm in by_arm
        if arm.startswith("ours_")
    }
    return {
        arm.removeprefix("ours_"): by_arm[arm]["completion_tokens_per_s"]
        / by_arm[twin]["completion_tokens_per_s"]
        for arm, twin in twins.items()
        if twin in by_arm and by_arm[arm].get("command") == by_arm[twin].get("command")  # one command only
    }
