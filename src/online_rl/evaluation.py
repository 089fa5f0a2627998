"""Held-out evaluation: greedy and sampled completions of the eval set, scored by the configured rewards.

The eval set is eval.split, or for data without that split eval.holdout_size rows held out of data.split
(data.training_and_eval_prompts).

What "pass" means: a completion passes when its score is >= `eval.pass_threshold`, where the score is
the reward named by `eval.pass_reward` (a None score fails), or the weighted total of all rewards when
that is null. A reward with weight 0 is logged but not trained on, so `rewards=[digits,accuracy]` with
accuracy's weight 0 and `eval.pass_reward=accuracy` evaluates accuracy while training on digits.

pass@k is the unbiased estimator of Chen et al. 2021 (arXiv:2107.03374, eq. 1): of n samples of a
prompt c pass; the chance that k of them drawn without replacement hold at least one pass is
1 - C(n-c, k) / C(n, k), averaged over prompts. Greedy decoding gives one completion per prompt,
so its pass@1 is the share of prompts whose greedy completion passes.

Evaluation draws its samples inside a forked RNG, so a run with evaluation trains exactly like one without.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from omegaconf import DictConfig, OmegaConf

from online_rl.data import tokenize_prompts
from online_rl.rewarding import RewardFunction, score_completions, total_reward
from online_rl.tracking import append_metrics

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with n samples, c of them passing (1 - C(n-c, k) / C(n, k))."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every draw of k holds a pass
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): a product of terms in (0, 1], no huge binomials
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(n: int) -> list[int]:
    """The k of pass@k reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def mean_pass_at_k(passes: list[list[bool]], ks: list[int]) -> dict[int, float]:
    """{k: pass@k averaged over prompts}, from each prompt's n pass/fail outcomes."""
    return {k: sum(pass_at_k(len(p), sum(p), k) for p in passes) / len(passes) for k in ks}


def pass_scores(
    scores: dict[str, list[float | None]], totals: torch.Tensor, pass_reward: str | None
) -> list[float | None]:
    """The score each completion's pass is decided on: the named reward's, or the weighted total."""
    return list(scores[pass_reward]) if pass_reward is not None else totals.tolist()


class Evaluator:
    """Scores a model on the eval set through the run's engine; logs what it finds under `eval/`."""

    def __init__(
        self,
        eval_cfg: DictConfig,
        data_cfg: DictConfig,
        prompts: datasets.Dataset,
        sampling: DictConfig,
        engine: Any,
        tokenizer: Any,
        reward_functions: list[RewardFunction],
        tracker: Any,
        metrics_path: Path,
        device: torch.device,
        episodes: Any = None,
    ):
        """eval_cfg: the `eval` group; data_cfg: the `data` group (its prompt format); prompts: the eval set's
        rows (training_and_eval_prompts); sampling: the training's, whose temperature eval.temperature may replace;
        episodes: env != none, the environment's episodes (multiturn.Episodes) instead of single completions."""
        self.episodes = episodes
        self.engine, self.tokenizer, self.reward_functions = engine, tokenizer, reward_functions
        self.tracker, self.metrics_path, self.device = tracker, metrics_path, device
        self.eval_cfg = eval_cfg
        self.rows = list(prompts)
        self.prompt_ids = tokenize_prompts(
            tokenizer,
            [row["prompt"] for row in self.rows],
            data_cfg.system_prompt,
            data_cfg.max_prompt_length,
        )
        temperature = eval_cfg.temperature if eval_cfg.temperature is not None else sampling.temperature
        self.sampled = OmegaConf.merge(sampling, {"temperature": temperature})
        self.greedy = OmegaConf.merge(sampling, {"temperature": 0.0, "top_p": 1.0, "top_k": 0})

    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Evaluate `model` now, log the metrics at `step` (tracker, metrics.jsonl, console) and return them."""
        metrics = self.evaluate(model)
        self.tracker.log(metrics, step)
        append_metrics(self.metrics_path, step, metrics)
        log.info(console_line(step, metrics))
        return metrics

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        started = time.perf_counter()
        n = self.eval_cfg.num_generations
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training run's random stream stays as it was
            metrics = {}
            if self.eval_cfg.greedy:
                outcome = self.score(model, 1, self.greedy)
                metrics["eval/pass@1_greedy"] = mean_pass_at_k(outcome["passes"], [1])[1]
                metrics["eval/reward_mean_greedy"] = outcome["reward_mean"]
            outcome = self.score(model, n, self.sampled)
        metrics.update(
            {f"eval/pass@{k}": v for k, v in mean_pass_at_k(outcome["passes"], k_values(n)).items()}
        )
        metrics["eval/reward_mean"] = outcome["reward_mean"]
        metrics.update({f"eval/{name}_mean": value for name, value in outcome["per_reward"].items()})
        metrics["eval/len_mean"] = outcome["len_mean"]
        metrics["eval/prompts"] = float(len(self.rows))
        metrics["time/eval_s"] = time.perf_counter() - started
        return metrics

    def score(self, model: torch.nn.Module, n: int, sampling: Any) -> dict[str, Any]:
        """n completions per eval prompt of `model`, generated batch by batch and scored by every reward."""
        passes: list[list[bool]] = []
        totals, lengths = [], []
        per_reward: dict[str, list[float]] = {reward.name: [] for reward in self.reward_functions}
        batch_size = self.eval_cfg.batch_size
        for start in range(0, len(self.rows), batch_size):
            rows = self.rows[start : start + batch_size]
            # before every engine call, not once per evaluation: a colocated vLLM at sleep level 2 drops its
            # weights when it sleeps after each call (a push takes tens of ms; an evaluation a few calls)
            self.engine.sync_weights(model)
            if self.episodes is None:
                rollout = self.engine.generate(self.prompt_ids[start : start + batch_size], n, sampling)
            else:  # env != none: each sample a whole conversation, scored by the environment too
                _, rollout = self.episodes.play(
                    self.engine, rows, n, sampling, lambda: self.engine.sync_weights(model)
                )  # (weights pushed before every engine call, as above)
            completions = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            columns = {
                key: [row[key] for row in rows for _ in range(n)] for key in rows[0] if key != "prompt"
            }
            columns.update(rollout.columns)
            columns["completion_lengths"] = [len(ids) for ids in rollout.completion_ids]
            prompts = [row["prompt"] for row in rows for _ in range(n)]
            scores = score_completions(
                self.reward_functions, prompts, completions, columns, rollout.completion_ids
            )
            total = total_reward(self.reward_functions, scores)  # (len(rows) * n,)
            decided = pass_scores(scores, total, self.eval_cfg.pass_reward)
            outcomes = [s is not None and s >= self.eval_cfg.pass_threshold for s in decided]
            passes += [outcomes[i : i + n] for i in range(0, len(outcomes), n)]
            totals += total.tolist()
            lengths += columns["completion_lengths"]
            for name, values in scores.items():
                per_reward[name] += [v for v in values if v is not None]
        return {
            "passes": passes,
            "reward_mean": sum(totals) / len(totals),
            "per_reward": {name: sum(v) / len(v) if v else float("nan") for name, v in per_reward.items()},
            "len_mean": sum(lengths) / len(lengths),
        }


def console_line(step: int, metrics: dict[str, float]) -> str:
    pass_at = " ".join(
        f"{key.removeprefix('eval/')} {value:.3f}"
        for key, value in metrics.items()
        if key.startswith("eval/pass@") and not key.endswith("_greedy")
    )
    greedy = (
        f"pass@1 greedy {metrics['eval/pass@1_greedy']:.3f} | " if "eval/pass@1_greedy" in metrics else ""
    )
    return (
        f"eval at step {step} on {metrics['eval/prompts']:.0f} prompts | {greedy}{pass_at} | "
        f"reward {metrics['eval/reward_mean']:.3f} | {metrics['time/eval_s']:.1f} s"
    )
