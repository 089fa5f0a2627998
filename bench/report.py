"""A command's results files, rewritten after every arm so that a command cut short still leaves what it
measured: <stem>.json (settings, commands, rows, ratios, targets, failures), <stem>.md (the tables) and
<stem>.png (s/step and completion tokens/s per arm; needs matplotlib)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bench.settings import FLOOR_OF, Settings, settings_from_json
from bench.summary import floor_bounds, ratios, targets


def write_results(
    path: Path,
    rows: list[dict],
    settings: Settings,
    commit: str,
    commands: list[dict],
    failures: dict[str, str],
) -> str:
    """The command's results so far in path (.json) and beside it (.md, and .png once an arm has a row); returns
    the markdown."""
    table = report(rows, settings, commit, commands, failures)
    results = {
        "started": commands[0]["started"],
        "commit": commit,
        "settings": asdict(settings),
        "commands": commands,
        "ours_over_trl": ratios(rows),
        "targets": targets(rows),
        "floor_bounds": floor_bounds(rows),
        "arms": rows,
        "failures": failures,
    }
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(table)
    if rows:
        chart(rows, path.with_suffix(".png"))
    return table


def rewrite(path: Path) -> str:
    """The .md and .png of a results .json again (`--report`: after a change to the report, or where the
    command's machine had no matplotlib); returns the markdown."""
    results = json.loads(path.read_text())
    settings = settings_from_json(results["settings"])
    commands = results.get("commands") or [{"started": results["started"], "arms": None}]
    table = report(results["arms"], settings, results["commit"], commands, results["failures"])
    path.with_suffix(".md").write_text(table)
    chart(results["arms"], path.with_suffix(".png"))
    return table


def machines(commands: list[dict]) -> list[str]:
    """The report's line on the machine of each command (results from before it was recorded: none)."""
    described = [
        f"{(machine['gpus'] or ['no GPU'])[0]}; {machine['cpu']}, {machine['cpus']} CPUs, "
        f"load {machine['load_1min']:.1f} at the start"
        for machine in (command.get("machine") for command in commands)
        if machine
    ]
    if not described:
        return []
    if len(set(described)) == 1:
        return [f"Machine: {described[0]}.", ""]
    return ["Machines, command by command: " + " / ".join(described) + ".", ""]


def report(
    rows: list[dict], settings: Settings, commit: str, commands: list[dict], failures: dict[str, str]
) -> str:
    def fmt(row: dict, key: str, spec: str) -> str:
        return format(row[key], spec) if row.get(key) is not None else ""

    pairs = ratios(rows)
    lines = [
        f"# make bench, {commands[0]['started']}, commit {commit}",
        "",
        f"GRPO step: {settings.prompts_per_step} prompts x {settings.num_generations} samples x "
        f"{settings.completion_tokens} completion tokens, prompts of {settings.prompt_tokens} tokens, "
        f"{settings.model}; micro-batches of {settings.micro_batch_size} (TRL) and {settings.our_micro_batch_size} (ours); "
        + (
            f"vLLM at gpu_memory_utilization {settings.gpu_memory_utilization} (TRL) and "
            f"{f'a {settings.kv_cache_gib:g} GiB KV cache' if settings.kv_cache_gib else 'the same'}, sleep level {settings.sleep_level} (ours); "
            if settings.use_vllm
            else "no vLLM (transformers generate); "
        )
        + ("our training passes torch.compile'd (model.compile); " if settings.compile_model else "")
        + (
            "our vLLM engine in a process of its own (vllm.separate_process); "
            if settings.separate_process and settings.engine_processes == 1
            else ""
        )
        + (
            f"{settings.engine_processes} vLLM engines of ours, each in a process of its own (vllm.engine_processes); "
            if settings.engine_processes > 1
            else ""
        )
        + (
            "our off-policy arm's vLLM engine in a process of its own; "
            if any(row["arm"] == "ours_offpolicy" for row in rows)
            and not settings.separate_process
            and settings.engine_processes == 1
            else ""
        )
        + ("every arm with CUDA's Multi-Process Service running (mps); " if settings.mps else "")
        + (
            f"our trainer beside an engine process capped at {settings.trainer_sm_percent}% of the GPU's "
            "multiprocessors (vllm.trainer_sm_percent); "
            if settings.trainer_sm_percent
            else ""
        )
        + f"median of {settings.measured_steps} steps after {settings.warmup_steps} warm-up steps."
        + (
            " Measured in "
            + "; then ".join(
                f"one command at {command['started']} ({', '.join(command['arms'])})" for command in commands
            )
            + ", one after another on the same GPU; ratios and the floor distance only compare arms of one command."
            if len(commands) > 1
            else ""
        ),
        "",
        *machines(commands),
        "| arm | s/step (median, min-max) | completion tok/s | ours/TRL tok/s | peak GPU GiB | sync+sleep share | train MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    stepped = [row for row in rows if "s_per_step_median" in row]
    for row in stepped:
        pair = pairs.get(row["arm"].removeprefix("ours_")) if row["arm"].startswith("ours_") else None
        lines.append(
            f"| {row['arm']} | {row['s_per_step_median']:.2f} ({row['s_per_step_min']:.2f}-{row['s_per_step_max']:.2f}) "
            f"| {row['completion_tokens_per_s']:,.0f} | {f'{pair:.2f}x' if pair else ''} | {fmt(row, 'peak_gpu_gib', '.1f')} "
            f"| {fmt(row, 'sync_sleep_share', '.1%')} | {fmt(row, 'train_mfu', '.1%')} |"
        )
    phased = [row for row in stepped if "reward" in row.get("phases_s", {})]  # ours (TRL's: sweep_lines)
    if phased:
        lines += [
            "",
            "Our phases inside a step, median seconds. log-probs: the passes for old log-probs (num_iterations > 1) "
            "and reference ones (beta > 0) before training; with TRL's defaults (1 and 0) there are none, the "
            "training pass's own log-probs being the old ones.",
            "",
        ]
        lines += [
            "| arm | generate | reward | log-probs | train | sync | sleep/wake | of it in Python's gc |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in phased:
            p = row["phases_s"]
            # (results from before these were measured have none)
            gc_s, logprobs_s = (f"{p[key]:.3f}" if key in p else "" for key in ("gc", "logprobs"))
            lines.append(
                f"| {row['arm']} | {p['generate']:.2f} | {p['reward']:.3f} | {logprobs_s} | {p['train']:.2f} | {p['sync']:.3f} | {p['sleep_wake']:.3f} | {gc_s} |"
            )
    rollouts = rollout_lines(rows)
    if rollouts:
        lines += [
            "",
            "Each measured rollout: seconds, then of them the main thread's CPU seconds and Python's gc, then the "
            "CPU seconds the host gave other tenants meanwhile (steal, all CPUs). CUDA spins while the thread "
            "waits for the GPU, so only waits for the interpreter (another thread's Python) or for a CPU leave "
            "its CPU seconds below the rollout's.",
            "",
            "| arm | rollouts: s (CPU s, gc s, steal s) |",
            "|---|---|",
            *rollouts,
        ]
    lines += sweep_lines(rows)
    lines += host_cpu_lines(rows)
    bounds = floor_bounds(rows)
    for row in rows:
        if row["arm"] in FLOOR_OF:
            bound = bounds.get(row["arm"], {})
            sentences = [
                f"{'Floor' if row['arm'] == 'floor' else 'LoRA floor'}, each half alone: generation "
                f"{row['generate_alone_s']:.2f} s + training {row['train_alone_s']:.2f} s "
                f"(MFU {fmt(row, 'train_mfu', '.1%')}) = {row['floor_s']:.2f} s."
            ]
            if "step_over_floor" in bound:
                sentences.append(f"Our step / floor: {bound['step_over_floor']:.2f}.")
            if "trl_over_floor" in bound:
                sentences.append(
                    f"TRL's step / floor: {bound['trl_over_floor']:.2f}, the most a step that generates, "
                    "then trains, can gain on TRL."
                )
            lines += ["", " ".join(sentences)]
    lines += ["", "Issue 6's targets:", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for target in targets(rows):
        value = target["measured"]
        shown = "not run" if value is None else f"{value:.1%}" if "%" in target["goal"] else f"{value:.2f}"
        met = "" if target["met"] is None else "yes" if target["met"] else "no"
        lines.append(f"| {target['target']} | {target['goal']} | {shown} | {met} |")
    for arm, error in failures.items():
        lines += ["", f"**{arm} failed**: {error}"]
    return "\n".join(lines) + "\n"


def sweep_lines(rows: list[dict]) -> list[str]:
    """TRL's runs with their phases: trl_full/trl_lora, and each candidate of a trl_tuned sweep (its anchor
    first, over the bench's steps; the others over the sweep's), the fastest marked."""

    def line(arm: str, name: str, fields: dict, mark: str) -> str:
        if fields.get("median_step_s") is None:
            return f"| {arm} | {name} | {fields.get('error', 'did not run')} | | | | |"
        peak = fields.get("peak_reserved_gib")
        mfu = fields.get("train_mfu")
        return (
            f"| {arm} | {name}{mark} | {fields['median_step_s']:.2f} ({len(fields['step_s'])} steps) "
            f"| {fields['generate_s']:.2f} | {fields['train_s']:.2f} | {fields['sync_s']:.3f} "
            f"| {'' if peak is None else f'{peak:.1f}'} | {'' if mfu is None else f'{mfu:.1%}'} |"
        )

    lines = []
    for row in rows:
        if "sweep" in row:
            lines += [
                line(row["arm"], r["name"], r, " (fastest)" if r["name"] == row["tuned"] else "")
                for r in row["sweep"]
            ]
        elif row["arm"].startswith("trl_") and "phases_s" in row:
            phases = row["phases_s"]
            fields = {**{f"{key}_s": value for key, value in phases.items()}, "step_s": row["steps_s"]}
            fields.update(
                median_step_s=row["s_per_step_median"], peak_reserved_gib=row.get("peak_reserved_gib")
            )
            lines.append(line(row["arm"], "anchor", {**fields, "train_mfu": row.get("train_mfu")}, ""))
    if not lines:
        return []
    return [
        "",
        "TRL's runs: per-device batch[:flags] (gc: gradient checkpointing), median s/step, of it generation, "
        "training (the rest) and weight sync, torch's peak reserved GiB in its process (vLLM's engine included), "
        "train MFU.",
        "",
        "| arm | candidate | s/step | generate | train | sync | peak GiB | train MFU |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
    ]


def rollout_lines(rows: list[dict]) -> list[str]:
    """A table row per arm whose rollouts were measured one by one (results from before: none)."""
    lines = []
    for row in rows:
        if "generate_alone_cpu_s" in row:
            walls, cpus = row["generate_alone_steps_s"], row["generate_alone_cpu_s"]
            gcs, steals = row["generate_alone_gc_s"], row["generate_alone_steal_s"]
        elif row.get("generate_cpu_steps_s") and None not in row["generate_cpu_steps_s"]:
            walls, cpus = row["generate_steps_s"], row["generate_cpu_steps_s"]
            gcs, steals = row["gc_steps_s"], row["generate_steal_steps_s"]  # (gc: the whole step's)
        else:
            continue
        shown = [
            f"{wall:.2f} ({cpu:.2f}, {gc:.2f}, {'?' if steal is None else f'{steal:.2f}'})"
            for wall, cpu, gc, steal in zip(walls, cpus, gcs, steals)
        ]
        lines.append(f"| {row['arm']} | {'; '.join(shown)} |")
    return lines


def host_cpu_lines(rows: list[dict]) -> list[str]:
    """How fast the host's CPUs ran Python just before and just after each arm (results from before: none).
    Generation is bound by one CPU thread, and on a shared host the same Python has run twice as long on
    some CPUs as on others, so a slow arm beside a busy host is told from a slow arm."""

    def shown(probe: dict[str, float]) -> str:
        return "/".join(f"{probe[key]:.1f}" for key in ("fastest", "median", "slowest"))

    arms = [
        f"{row['arm']} {shown(row['host_cpus_ms']['before'])} -> {shown(row['host_cpus_ms']['after'])}"
        for row in rows
        if "host_cpus_ms" in row
    ]
    if not arms:
        return []
    return [
        "",
        "The host's CPUs before -> after each arm: ms for the same loop of Python on the fastest / median / "
        "slowest CPU (bench.host.cpu_speeds; other tenants slow them): " + "; ".join(arms) + ".",
    ]


def chart(rows: list[dict], path: Path) -> None:
    rows = [row for row in rows if "s_per_step_median" in row]  # the floor has no steps of its own
    try:
        import matplotlib
    except ImportError:  # the GPU machine's bundle has no matplotlib: `--report FILE.json` draws it later
        print(f"bench: no matplotlib, so no {path.name}; draw it with --report {path.with_suffix('.json')}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [row["arm"] for row in rows]
    colors = ["tab:blue" if name.startswith("ours") else "tab:gray" for name in names]
    left.bar(names, [row["s_per_step_median"] for row in rows], color=colors)
    left.set_ylabel("s / step (median)")
    right.bar(names, [row["completion_tokens_per_s"] for row in rows], color=colors)
    right.set_ylabel("completion tokens / s")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
