"""Reward functions from config: import them, call them by keyword, check and combine what they return.

Rewards are called as TRL calls its own, by keyword: fn(prompts=, completions=, completion_ids=, **columns)
-> list[float | None], where columns are the dataset's columns (one value per completion, e.g. `solution`)
plus `completion_lengths` (tokens per completion). A function names the keywords it reads; without a
**kwargs it gets only those. `completions: messages` in a reward's config hands the texts over as TRL's
conversational form ([{"role": "assistant", "content": text}] per completion), which TRL's own text rewards
read. None means "no opinion": the sample is left out of that reward's mean and adds 0 to the total.
A function that raises stops the run (on_reward_error=raise) or scores the samples it failed on None
(on_reward_error=skip, counted as reward/<name>_errors).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# what every call passes besides the dataset's columns (the `prompt` column arrives as `prompts`)
CALL_KEYWORDS = ("prompts", "completions", "completion_ids", "completion_lengths")


@dataclass
class RewardFunction:
    name: str
    fn: Callable[..., list]
    weight: float
    on_error: str = "raise"  # raise | skip (see on_reward_error)
    errors: int = 0  # samples of the last call scored None because the function raised on them
    accepted: frozenset[str] | None = None  # the keywords fn names; None: it takes **kwargs, so all of them
    as_messages: bool = False  # completions (and prompts) in TRL's conversational form instead of text


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; the message names it and shows a sample."""


def import_function(path: str, name: str) -> Callable:
    """The function at import path `path` (rewards.<name>.fn), or an error that says what would import."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ValueError(
            f"rewards.{name}.fn={path!r} is not an import path like online_rl.rewards.format.think_answer_format"
        )
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        # a module of the user's own is found from the current directory only by `python train.py` in a clone
        raise ValueError(
            f"cannot import reward fn {path!r} (rewards.{name}.fn): {error}. Built-in rewards are "
            "online_rl.rewards.<module>.<fn>; a module of your own must be importable where the run starts "
            "(rewards/ of a clone with python train.py from its root; elsewhere its folder on PYTHONPATH)"
        ) from error


def load_reward_functions(
    rewards_cfg: Mapping[str, Any], on_error: str = "raise", dataset_columns: Iterable[str] | None = None
) -> list[RewardFunction]:
    """The configured rewards, each checked against what it will be called with (`dataset_columns`: the
    dataset's columns; None skips that check) before anything trains."""
    if not rewards_cfg:
        raise ValueError("no reward functions configured: pick some, e.g. rewards=[format,math_accuracy]")
    available = None if dataset_columns is None else call_keywords(dataset_columns)
    loaded = []
    for name, entry in rewards_cfg.items():
        spec = reward_spec(name, entry)
        fn = import_function(spec.fn, name)
        if spec.kwargs:
            fn = functools.partial(fn, **spec.kwargs)
        accepted = accepted_keywords(name, spec.fn, fn)
        if available is not None:
            check_required_keywords(name, spec.fn, fn, available)
        as_messages = getattr(spec, "completions", "text") == "messages"
        loaded.append(RewardFunction(name, fn, float(spec.weight), on_error, 0, accepted, as_messages))
    return loaded


def reward_spec(name: str, entry: Any) -> Any:
    """rewards.<name> over RewardConfig's defaults (weight 1, no kwargs, text completions). A key RewardConfig
    lacks, a value of the wrong type or no `fn`: an error naming rewards.<name> and what it takes."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from online_rl.config import RewardConfig

    fields = ", ".join(RewardConfig.__dataclass_fields__)
    try:
        # resolved where it stands, so that an interpolation (overlong's ${sampling.max_completion_length}) reads
        # the run's config
        given = OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else entry
        spec = OmegaConf.merge(OmegaConf.structured(RewardConfig), given or {})
        spec.fn  # noqa: B018 (MISSING until set: reading it raises)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        raise ValueError(
            f"rewards.{name}: {message}; a reward takes {fields}, "
            f"e.g. +rewards.{name}.fn=online_rl.rewards.digits.digit_fraction"
        ) from None
    return spec


def complete_reward_specs(cfg: Any) -> None:
    """Each of cfg.rewards over RewardConfig's defaults, in place: what the run records (config_resolved.yaml,
    the tracker, the model card) is what it uses."""
    for name in list(cfg.rewards):
        cfg.rewards[name] = reward_spec(name, cfg.rewards[name])


def call_keywords(dataset_columns: Iterable[str]) -> set[str]:
    """Every keyword a reward is called with: the fixed ones and the dataset's columns but `prompt`."""
    return set(CALL_KEYWORDS) | {column for column in dataset_columns if column != "prompt"}


def accepted_keywords(name: str, path: str, fn: Callable) -> frozenset[str] | None:
    """The keywords `fn` can take (None: any, it has **kwargs). A parameter that must come by position
    cannot get its value: a clear error now rather than a TypeError at the first step."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable without a readable signature: call it with everything
        return None
    positional_only = [
        p.name for p in parameters if p.kind is p.POSITIONAL_ONLY and p.default is inspect.Parameter.empty
    ]
    if positional_only:
        raise ValueError(
            f"reward '{name}' ({path}) takes {', '.join(positional_only)} by position only, but rewards are "
            f"called by keyword ({', '.join(CALL_KEYWORDS)} and the dataset's columns): declare it as "
            "def fn(completions, **kwargs)"
        )
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_required_keywords(name: str, path: str, fn: Callable, available: set[str]) -> None:
    """A parameter without a default that no call will fill (a column the dataset lacks, a misspelt
    keyword) stops the run before it starts, naming what the reward wants and what there is."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    missing = [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is inspect.Parameter.empty
        and p.name not in available
    ]
    if missing:
        raise ValueError(
            f"reward '{name}' ({path}) needs {', '.join(repr(m) for m in missing)}, which no call passes: it is "
            f"called with {', '.join(sorted(available))}. Rename the dataset column (data.solution_column=... "
            f"for `solution`), or bind a value in its config (rewards.{name}.kwargs.{missing[0]}=...)"
        )


def reward_keywords(
    reward: RewardFunction,
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]] | None,
    columns: Mapping[str, list],
) -> dict[str, Any]:
    """What `reward.fn` is called with: every keyword it accepts, one value per completion."""
    if reward.as_messages:  # TRL's conversational form: a list of messages per prompt and per completion
        prompts = [[{"role": "user", "content": p}] for p in prompts]
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    keywords = {"prompts": prompts, "completions": completions, **columns}
    if completion_ids is not None:
        keywords["completion_ids"] = completion_ids
    if reward.accepted is None:
        return keywords
    return {key: value for key, value in keywords.items() if key in reward.accepted}


def check_scores(
    name: str, scores: Any, expected: int, prompts: list[str], completions: list[str]
) -> list[float | None]:
    """The scores as floats / None, or a RewardError that names the reward and shows an offending sample."""
    if not isinstance(scores, (list, tuple)) or len(scores) != expected:
        size = len(scores) if hasattr(scores, "__len__") else type(scores).__name__
        raise RewardError(
            f"reward '{name}' returned {size} scores for {expected} completions: return one per completion"
        )
    checked: list[float | None] = []
    for i, score in enumerate(scores):
        sample = f"\n  prompt: {prompts[i][:200]!r}\n  completion: {completions[i][:200]!r}"
        if score is not None:
            # numbers.Real: int, float, bool and numpy's scalars; a string, even '1.0', is a bug in the function
            if not isinstance(score, numbers.Real):
                raise RewardError(
                    f"reward '{name}' returned {score!r} ({type(score).__name__}) for completion {i}: return a "
                    f"number (int, float or bool) or None for no opinion, one per completion.{sample}"
                )
            score = float(score)
            if not math.isfinite(score):
                raise RewardError(
                    f"reward '{name}' returned {score} for completion {i}; return a finite float, or None for "
                    f"no opinion.{sample}"
                )
        checked.append(score)
    return checked


def score_completions(
    reward_functions: list[RewardFunction],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list],
    completion_ids: list[list[int]] | None = None,
) -> dict[str, list[float | None]]:
    """{reward name: one score or None per completion}; each function called by keyword (reward_keywords)."""
    scores = {}
    for reward in reward_functions:
        reward.errors = 0
        try:
            raw = reward.fn(**reward_keywords(reward, prompts, completions, completion_ids, columns))
        except Exception as error:
            raw = score_one_by_one(reward, prompts, completions, completion_ids, columns, error)
        scores[reward.name] = check_scores(reward.name, raw, len(completions), prompts, completions)
    return scores


def score_one_by_one(
    reward: RewardFunction,
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]] | None,
    columns: dict[str, list],
    error: Exception,
) -> list[float | None]:
    """After the batch call raised: call the function per sample to find the samples it fails on.

    Under on_error=raise the first of them (or the batch error, if every sample passes alone) stops the
    run with that sample; under skip they score None and are counted.
    """
    scores: list[float | None] = []
    failures: list[tuple[int, Exception]] = []
    for i in range(len(completions)):
        ids = None if completion_ids is None else [completion_ids[i]]
        one = {key: [values[i]] for key, values in columns.items()}
        try:
            [score] = reward.fn(**reward_keywords(reward, [prompts[i]], [completions[i]], ids, one))
        except Exception as sample_error:
            failures.append((i, sample_error))
            score = None
        scores.append(score)
    i, first = failures[0] if failures else (0, error)
    where = f"on sample {i}: prompt={prompts[i][:200]!r} completion={completions[i][:200]!r}"
    if reward.on_error != "skip" or not failures:
        raise RewardError(
            f"reward '{reward.name}' raised {type(first).__name__}: {first}\n  {where}\n"
            "Fix the function, or set on_reward_error=skip to score the samples it fails on None"
        ) from first
    reward.errors = len(failures)
    log.warning(
        "reward '%s' raised on %d of %d samples, scored None (on_reward_error=skip); the first, %s: %s: %s",
        reward.name,
        len(failures),
        len(completions),
        where,
        type(first).__name__,
        first,
    )
    return scores


class UnscoredRewards:
    """Rewards that score no completion of a step (every score None) teach nothing that step, silently: a
    dataset without the column a reward needs, say. Each such reward is named in a warning the first time and
    counted after (reward/<name>_unscored_steps); when every trained reward (weight != 0) is silent for
    `max_in_a_row` steps in a row, the run stops with a checkpoint (0 = never)."""

    def __init__(self, reward_functions: list[RewardFunction], max_in_a_row: int):
        self.trained = [r.name for r in reward_functions if r.weight != 0]
        self.steps = {r.name: 0 for r in reward_functions}  # steps each reward scored nothing, so far
        self.max_in_a_row, self.in_a_row = max_in_a_row, 0

    def observe(self, scores: dict[str, list[float | None]], step: int) -> None:
        silent = {name for name, values in scores.items() if all(value is None for value in values)}
        for name in sorted(silent):
            if self.steps[name] == 0:
                log.warning(
                    "step %d: reward '%s' scored every completion None (no opinion), so it teaches nothing this "
                    "step. Does the data have the column it reads (data.solution_column)? Does it return None "
                    "where it should score? Counted from now on as reward/%s_unscored_steps",
                    step,
                    name,
                    name,
                )
            self.steps[name] += 1
        self.in_a_row = self.in_a_row + 1 if silent.issuperset(self.trained) else 0

    @property
    def must_stop(self) -> bool:
        return 0 < self.max_in_a_row <= self.in_a_row

    def metrics(self) -> dict[str, float]:
        return {f"reward/{name}_unscored_steps": float(count) for name, count in self.steps.items()}

    def error(self, checkpoint: Path) -> RewardError:
        return RewardError(
            f"no trained reward ({', '.join(self.trained)}) scored any completion for {self.in_a_row} steps in a "
            f"row (max_unscored_steps={self.max_in_a_row}): the run learns nothing. The weights are saved in "
            f"{checkpoint}. Check that the data has the columns the rewards read (data.solution_column) and "
            f"that the rewards return numbers; then resume with resume={checkpoint}"
        )


def reward_error_metrics(reward_functions: list[RewardFunction]) -> dict[str, float]:
    """reward/<name>_errors: samples of this step a skipping reward raised on."""
    return {f"reward/{r.name}_errors": float(r.errors) for r in reward_functions if r.on_error == "skip"}


def total_reward(
    reward_functions: list[RewardFunction], scores: dict[str, list[float | None]]
) -> torch.Tensor:
    """Weighted sum per completion, (N,); a None adds nothing."""
    count = len(next(iter(scores.values())))
    total = torch.zeros(count)
    for reward in reward_functions:
        values = torch.tensor([0.0 if s is None else s for s in scores[reward.name]])
        total += reward.weight * values
    return total


def reward_metrics(scores: dict[str, list[float | None]]) -> dict[str, float]:
    """reward/<name>_mean over the samples that got a score, and the share that got None."""
    metrics = {}
    for name, values in scores.items():
        given = [v for v in values if v is not None]
        metrics[f"reward/{name}_mean"] = sum(given) / len(given) if given else float("nan")
        metrics[f"reward/{name}_none_frac"] = 1 - len(given) / len(values)
    return metrics
