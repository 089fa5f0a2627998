"""What a step reports: its metrics (namespaced: reward/, rollout/, train/, time/, sync/, ...), the console line,
the table of samples, and the summary of the run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from online_rl.rewarding import reward_metrics

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output_dir: Path
    final_checkpoint: Path | None  # None for eval_only
    history: list[dict[str, float]] = field(default_factory=list)  # the logged metrics of every step
    seconds: float = 0.0
    evals: list[dict[str, float]] = field(default_factory=list)  # the eval/ metrics of every evaluation
    model_dir: Path | None = None  # the exported final model (<output_dir>/model)

    @property
    def reward_means(self) -> list[float]:
        return [metrics["reward/total_mean"] for metrics in self.history]


def step_metrics(
    samples, generated, totals: dict[str, float], tokens: int, seconds: dict[str, float]
) -> dict:
    """The metrics every algorithm shares, for one optimizer step over `samples`.

    totals: the training pass's sums; tokens: the rollout's completion tokens in the loss (this rank's);
    seconds: the phases' (time/generate_s, time/reward_s, time/train_s, time/logprobs_s (inside train_s: the
    no-grad passes for old and reference log-probs), time/sync_s, time/step_s)."""
    lengths = torch.tensor(samples.columns["completion_lengths"], dtype=torch.float)
    # reward curves follow the policy's own samples, not the mixture / reference ones
    own = samples.from_engine
    policy_rewards = samples.rewards[own]
    metrics = {
        "reward/total_mean": float(policy_rewards.mean()),
        "reward/total_std": float(policy_rewards.std()) if len(policy_rewards) > 1 else 0.0,
        **reward_metrics(
            {name: [v for v, e in zip(values, own) if e] for name, values in samples.scores.items()}
        ),
        "rollout/len_mean": float(lengths.mean()),
        "rollout/len_max": float(lengths.max()),
        "rollout/truncated_frac": 1 - int(samples.finished.sum()) / len(samples),
        # the trainer's updates minus those of the weights that sampled the rollout (off_policy_steps)
        "rollout/staleness": float(generated.staleness),
        "train/loss": totals["loss"],
        "train/kl": totals.get("kl", 0.0) / tokens,
        "train/entropy": totals["entropy"] / tokens,
        **seconds,
        **generated.memory,
        **generated.rollout.stats,
        "perf/completion_tokens_per_s": float(lengths.sum()) / seconds["time/step_s"],
    }
    if generated.rollout.sampler_logprobs is not None:
        metrics["sync/logp_gap_mean"] = totals.get("gap", 0.0) / max(totals.get("engine_tokens", 0.0), 1)
        metrics["sync/logp_gap_max"] = totals.get("gap_max", 0.0)
        metrics["sync/logp_nonfinite_tokens"] = totals.get("gap_nonfinite", 0.0)  # left out of the gap
    return metrics


def console_line(step: int, max_steps: int, metrics: dict[str, float], reward_names: list[str]) -> str:
    per_reward = " ".join(f"{name} {metrics[f'reward/{name}_mean']:.3f}" for name in reward_names)
    return (
        f"step {step}/{max_steps} | reward {metrics['reward/total_mean']:.3f} ({per_reward}) | "
        f"loss {metrics['train/loss']:+.4f} | kl {metrics['train/kl']:.4f} | entropy {metrics['train/entropy']:.2f} | "
        f"len {metrics['rollout/len_mean']:.1f} | grad {metrics['train/grad_norm']:.3f} | {metrics['time/step_s']:.2f} s"
    )


def sample_rows(samples, count: int) -> list[dict[str, Any]]:
    """The first `count` rows of the rollout as a table: prompt, completion, total reward, each reward's score."""
    rows = []
    for i in range(min(count, len(samples))):
        row = {
            "prompt": samples.prompts[i],
            "completion": samples.completions[i],
            "reward": float(samples.rewards[i]),
        }
        row.update({name: values[i] for name, values in samples.scores.items()})
        rows.append(row)
    return rows


def report(summary: RunSummary, tracker) -> None:
    rewards = summary.reward_means
    window = max(1, len(rewards) // 10)
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    log.info(
        "Done in %.0f s. Mean reward, first %d steps: %.3f -> last %d steps: %.3f",
        summary.seconds,
        window,
        first,
        window,
        last,
    )
    log.info(
        "Outputs: %s (config_resolved.yaml, train.log, metrics.jsonl, checkpoints/, model/)",
        summary.output_dir,
    )
    log.info("Final checkpoint: %s", summary.final_checkpoint)
    command = tracker.dashboard_command()
    if command:
        log.info("Dashboard: %s", command)
