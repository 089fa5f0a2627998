"""An arm's raw measurements as a row of the results (summarize), and what the rows of a command say together:
ours / TRL (ratios), each step over its floor (floor_bounds), issue 6's targets (targets)."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.settings import ARMS, FLOOR_OF, Settings
from bench.shapes import mfu, trl_phases, vllm_awake_gib
from bench.trl_sweep import trl_command


def train_flops(settings: Settings, flops_per_token: float) -> float:
    """An optimizer step's FLOPs over one rollout's tokens (prompts and completions, every completion at its
    length limit: random weights never stop early)."""
    tokens_per_step = (
        settings.prompts_per_step
        * settings.num_generations
        * (settings.prompt_tokens + settings.completion_tokens)
    )
    return flops_per_token * tokens_per_step


def train_mfu(
    train_s: float, settings: Settings, flops_per_token: float, peak_flops: float | None
) -> float | None:
    """The share of the GPU's bf16 peak (shapes.peak_bf16_flops) that an optimizer step over one rollout's
    tokens reaches in train_s seconds; None off a GPU."""
    if settings.device != "cuda":
        return None
    return mfu(train_flops(settings, flops_per_token), train_s, peak_flops)


def summarize(
    arm: str, raw: dict, settings: Settings, flops_per_token: float, peak_flops: float | None = None
) -> dict:
    """One arm's row of the results: medians and spreads over the measured steps (train MFU against
    peak_flops, the GPU's bf16 peak)."""
    if arm in FLOOR_OF:
        generate, train = statistics.median(raw["generate_s"]), statistics.median(raw["train_s"])
        return {
            "arm": arm,
            "generate_alone_s": generate,
            "train_alone_s": train,
            "floor_s": generate + train,
            "train_mfu": train_mfu(train, settings, flops_per_token, peak_flops),
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
        # torch's peaks in the trainer's process (TRL's: vLLM's engine included, allocated through torch)
        "peak_allocated_gib": raw.get("peak_allocated_gib"),
        "peak_reserved_gib": raw.get("peak_reserved_gib"),
        # vLLM's share of the device: TRL's engine's fraction; ours, what waking it adds to the trainer's use
        "vllm_gib": raw.get("vllm_gib")
        or vllm_awake_gib(raw.get("device_used_awake_gib"), raw.get("device_used_asleep_gib")),
        "arm_command": raw.get("arm_command"),
        "staleness_steps": raw.get("staleness"),  # ours: updates behind the trainer, per measured step
        "logp_gap_steps": raw.get("logp_gap_mean"),  # ours: the engine's log-probs against the trainer's
    }
    if ARMS[arm][0] == "trl" and "generate_s" in raw:
        flops = train_flops(settings, flops_per_token) if settings.device == "cuda" else 0.0
        phases = trl_phases(raw, flops, peak_flops)
        row["phases_s"] = {key.removesuffix("_s"): phases[key] for key in ("generate_s", "train_s", "sync_s")}
        row["phases_s"]["sleep_wake"] = 0.0
        row["sync_sleep_share"], row["train_mfu"] = phases["sync_sleep_share"], phases["train_mfu"]
        row["generate_steps_s"], row["sync_steps_s"] = raw["generate_s"], raw["sync_s"]
        lora = ARMS[arm][1]
        row["arm_command"] = trl_command(raw["arguments"], settings, lora)
        if "sweep" in raw:  # trl_tuned: every candidate with its fields, the fastest named
            row["tuned"] = raw["tuned"]
            if raw.get("stopped"):  # (the sweep cut short: the candidates it measured)
                row["sweep_stopped"] = raw["stopped"]
            row["sweep"] = [
                {
                    **record,
                    **(trl_phases(record, flops, peak_flops) if "step_s" in record else {}),
                    **(
                        {"arm_command": trl_command(record["arguments"], settings, lora)}
                        if "arguments" in record
                        else {}
                    ),
                }
                for record in raw["sweep"]
            ]
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
                "train_mfu": train_mfu(phases["train"], settings, flops_per_token, peak_flops),
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
    frozen base), N the parameters that multiply (an untied input embedding is a lookup: left out; a tied one
    counts once, as the output projection); attention scores left out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return (4 if lora else 6) * multiplying_parameters(model)


def multiplying_parameters(model) -> int:
    """The model's parameters less an input embedding of its own (untied from the output projection)."""
    params = sum(p.numel() for p in model.parameters())  # (a tied weight is one parameter)
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return params - (embedding.numel() if embedding is not output else 0)


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
