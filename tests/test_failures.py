"""Failures mid-run: a stuck phase, non-finite updates, rewards that raise, an unwritable output directory.
Each either stops with an error that names the knob or the fix, or is a documented, logged skip."""

import json
import logging
import math
import os
import time

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from online_rl.config import RewardConfig
from online_rl.data import PromptSampler, synthetic_arithmetic
from online_rl.guards import NonFiniteError
from online_rl.loop import run
from online_rl.watchdog import WatchdogTimeout


@pytest.fixture
def make_config(make_config):
    """make_config, where `+reward_fn=<import path>` adds that function to the rewards (weight 1)."""

    def make(*overrides):
        functions = [o.split("=", 1)[1] for o in overrides if o.startswith("+reward_fn=")]
        cfg = make_config(*(o for o in overrides if not o.startswith("+reward_fn=")))
        with open_dict(cfg):
            for path in functions:
                cfg.rewards[path.rsplit(".", 1)[-1]] = RewardConfig(fn=path)
        return cfg

    return make


SMALL = ["data.synthetic_rows=64", "prompts_per_step=2", "algo.num_generations=4", "micro_batch_size=8"]


def sleepy_reward(prompts, completions, **columns):
    time.sleep(120)  # a reward server that never answers
    return [0.0] * len(completions)


def test_watchdog_fails_a_stuck_phase_with_every_threads_stack(make_config, caplog):
    started = time.perf_counter()
    with caplog.at_level(logging.ERROR), pytest.raises(WatchdogTimeout) as caught:
        run(
            make_config(
                "max_steps=2",
                *SMALL,
                "+reward_fn=tests.test_failures.sleepy_reward",
                "watchdog_seconds.reward=2",
            )
        )
    assert time.perf_counter() - started < 60  # not the 120 s sleep
    assert "the reward phase ran longer than watchdog_seconds.reward=2.0 s" in str(caught.value)
    assert "raise watchdog_seconds.reward" in str(caught.value)
    stacks = caplog.text
    assert 'Thread "MainThread"' in stacks and 'Thread "watchdog"' in stacks
    assert "in sleepy_reward" in stacks and "time.sleep(120)" in stacks  # where it is stuck


def float32_overflow_reward(prompts, completions, **columns):
    """Finite in Python, inf once the total reward is a float32 tensor: the loss becomes NaN for real."""
    return [1e39 if "*" in prompt else 0.0 for prompt in prompts]


def test_non_finite_updates_are_skipped_and_the_run_continues(make_config, tmp_path):
    reward = "+reward_fn=tests.test_failures.float32_overflow_reward"
    summary = run(make_config("max_steps=6", *SMALL, reward, "max_consecutive_nonfinite=0"))
    sampler = PromptSampler(synthetic_arithmetic(64), batch_size=2, seed=42)
    has_product = [any("*" in row["prompt"] for row in sampler.next_batch()) for _ in range(6)]
    skipped = [m["train/skipped_updates"] for m in summary.history]
    assert skipped == [float(p) for p in has_product] and 0 < sum(skipped) < 6
    assert all(math.isnan(m["train/loss"]) == bool(s) for m, s in zip(summary.history, skipped))
    weights = load_file(summary.final_checkpoint / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the NaN gradients never reached them


def always_overflowing_reward(prompts, completions, **columns):
    return [1e39] * len(completions)


def test_k_non_finite_updates_in_a_row_stop_with_a_checkpoint_of_the_untouched_weights(make_config, tmp_path):
    with pytest.raises(NonFiniteError, match="2 updates in a row had a non-finite loss") as caught:
        run(
            make_config(
                "max_steps=5",
                *SMALL,
                "+reward_fn=tests.test_failures.always_overflowing_reward",
                "max_consecutive_nonfinite=2",
            )
        )
    checkpoint = tmp_path / "checkpoints" / "step_000002"
    assert f"resume={checkpoint}" in str(caught.value)
    initial = load_file(tmp_path / "random_init" / "tiny-random-qwen2" / "model.safetensors")
    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(initial[name], saved[name]) for name in initial)  # neither update was applied
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/skipped_updates"] for m in logged] == [1.0, 1.0]


def flaky_reward(prompts, completions, **columns):
    return [math.sqrt(int(solution)) for solution in columns["solution"]]  # ValueError on a negative answer


def test_on_reward_error_skip_scores_none_and_counts(make_config):
    summary = run(
        make_config(
            "max_steps=3",
            "data.synthetic_rows=64",
            "prompts_per_step=16",
            "algo.num_generations=2",
            "micro_batch_size=8",
            "+reward_fn=tests.test_failures.flaky_reward",
            "on_reward_error=skip",
        )
    )
    sampler = PromptSampler(synthetic_arithmetic(64), batch_size=16, seed=42)
    negative = [sum(int(row["solution"]) < 0 for row in sampler.next_batch()) * 2 for _ in range(3)]
    assert 0 < sum(negative) < 96  # some samples fail, some do not
    assert [m["reward/flaky_reward_errors"] for m in summary.history] == negative
    assert [m["reward/flaky_reward_none_frac"] for m in summary.history] == [n / 32 for n in negative]


def test_unwritable_output_dir_names_the_fix(tmp_path):
    from .conftest import compose_config

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"is not writable .*hydra.run.dir=<dir>"):
        run(compose_config([f"output_dir={blocker / 'run'}", "logger=none", "max_steps=1", *SMALL]))
    if os.geteuid() == 0:
        return  # root writes through permission bits; the file above covers this machine
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match=r"is not writable \(Permission denied\)"):
        run(compose_config([f"output_dir={locked / 'run'}", "logger=none", "max_steps=1", *SMALL]))
