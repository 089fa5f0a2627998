"""Print a markdown table of chosen metrics per step from one or more runs' metrics.jsonl.

python scripts/summarize_metrics.py outputs/run1/metrics.jsonl outputs/run2/metrics.jsonl
"""

import argparse
import json
from pathlib import Path

COLUMNS = [
    ("reward/total_mean", "reward", "{:.3f}"),
    ("sync/logp_gap_mean", "gap mean", "{:.4f}"),
    ("sync/logp_gap_max", "gap max", "{:.3f}"),
    ("memory/device_used_awake_gib", "GPU GiB awake", "{:.1f}"),
    ("memory/device_used_asleep_gib", "GPU GiB asleep", "{:.1f}"),
    ("time/generate_s", "generate s", "{:.2f}"),
    ("time/second_sample_s", "mixture sample s", "{:.2f}"),
    ("pairs/tie_frac", "tied pairs", "{:.2f}"),
    ("time/reward_s", "reward s", "{:.3f}"),
    ("time/train_s", "train s", "{:.2f}"),
    ("time/sync_s", "sync s", "{:.3f}"),
    ("time/sync_broadcast_s", "broadcast s", "{:.3f}"),
    ("time/sync_finish_s", "finish+reset s", "{:.3f}"),
    ("sync/weight_gib", "GiB pushed", "{:.2f}"),
    ("time/wake_weights_s", "wake w s", "{:.3f}"),
    ("time/wake_kv_cache_s", "wake kv s", "{:.3f}"),
    ("time/sleep_s", "sleep s", "{:.2f}"),
    ("time/step_s", "step s", "{:.2f}"),
]


def read_metrics(path: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl: one per step, plus one per evaluation (its eval/ metrics)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(path: Path) -> str:
    rows = [row for row in read_metrics(path) if "reward/total_mean" in row]  # the training steps
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| step | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in columns]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path)
    for path in parser.parse_args().files:
        print(f"\n### {path.name.split('.')[0]}\n\n{table(path)}")


if __name__ == "__main__":
    main()
