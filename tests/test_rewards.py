"""Rewards on tables of realistic completions, and the checks that guard the loop from bad rewards."""

import math
import time

import pytest

from online_rl.rewarding import (
    RewardError,
    load_reward_functions,
    reward_error_metrics,
    reward_metrics,
    score_completions,
    total_reward,
)
from rewards.digits import digit_fraction
from rewards.format import think_answer_format
from rewards.length import overlong_penalty
from rewards.math_accuracy import math_accuracy

FORMAT_TABLE = [
    ("<think>2 + 2 is 4.</think><answer>4</answer>", 1.0),
    ("<think>\nLet x = 3.\nThen 2x = 6.\n</think>\n<answer>\n6\n</answer>\n", 1.0),
    ("  <think>ok</think> <answer>$\\frac{1}{2}$</answer>", 1.0),
    ("<answer>4</answer>", 0.0),  # no reasoning block
    ("<think>4</think>", 0.0),  # no answer block
    ("<answer>4</answer><think>because</think>", 0.0),  # wrong order
    ("<think>a</think><answer>4</answer> and some trailing chatter", 0.0),
    ("<think>unclosed <answer>4</answer>", 0.0),
    ("The answer is 4.", 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize("completion, expected", FORMAT_TABLE)
def test_think_answer_format(completion, expected):
    assert think_answer_format(["What is 2 + 2?"], [completion]) == [expected]


MATH_TABLE = [
    # (completion, reference solution, expected)
    ("<think>7 * 6 = 42</think><answer>42</answer>", "42", 1.0),
    ("<think>...</think><answer>41</answer>", "42", 0.0),
    ("<think>half</think><answer>\\frac{1}{2}</answer>", "The answer is $\\boxed{\\frac{1}{2}}$.", 1.0),
    ("<think>half</think><answer>0.5</answer>", "$\\boxed{\\frac{1}{2}}$", 1.0),
    ("<think>..</think><answer>$2\\sqrt{2}$</answer>", "\\sqrt{8}", 1.0),
    ("<think>..</think><answer>2\\sqrt{2}</answer>", "\\sqrt{8}", 1.0),
    ("<think>..</think><answer>\\sqrt{2}</answer>", "\\sqrt{8}", 0.0),
    ("So the total is \\boxed{18}.", "Janet sells 16 - 3 - 4 = 9 eggs ... #### 18", 1.0),
    ("<think>x</think><answer>x = 3</answer>", "3", 1.0),
    ("<think>I am not sure</think><answer>I don't know</answer>", "42", 0.0),
    ("", "42", 0.0),
    # an unparsable reference says nothing about the model: None, not 0 and not a crash
    ("<answer>4</answer>", "see the figure in the appendix", None),
]


@pytest.mark.parametrize("completion, solution, expected", MATH_TABLE)
def test_math_accuracy(completion, solution, expected):
    assert math_accuracy(["q"], [completion], solution=[solution]) == [expected]


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>" + "{" * 20000 + "</answer>",
        "1" * 500_000,
        "<answer>" + "\\frac{" * 3000 + "</answer>",
        "<answer>" + "(" * 10000 + "x" + ")" * 10000 + "</answer>",
    ],
)
def test_math_accuracy_time_is_bounded_on_adversarial_strings(completion):
    started = time.perf_counter()
    scores = math_accuracy(["q"], [completion], solution=["3"], timeout_s=2)
    elapsed = time.perf_counter() - started
    assert scores == [0.0]
    # the 1000-character cap and math-verify's 2 s alarm per call bound it (parse + verify: a few calls)
    assert elapsed < 10, elapsed


def test_digit_fraction():
    assert digit_fraction(["q"] * 4, ["42", "4 2 x", "no digits", " "]) == [1.0, 2 / 3, 0.0, None]


def test_overlong_penalty():
    # max 10, window 4: free up to 6 tokens, then -1/4 per token, -1 at 10
    assert overlong_penalty(
        ["q"] * 5, ["c"] * 5, completion_lengths=[3, 6, 7, 9, 10], max_length=10, soft_window=4
    ) == [
        0.0,
        0.0,
        -0.25,
        -0.75,
        -1.0,
    ]
    with pytest.raises(ValueError, match="soft_window"):
        overlong_penalty(["q"], ["c"], completion_lengths=[1], max_length=10, soft_window=11)


def reward_config(**entries):
    from omegaconf import OmegaConf

    return OmegaConf.create(entries)


def test_weighted_total_and_none_handling():
    functions = load_reward_functions(
        reward_config(
            format={"fn": "rewards.format.think_answer_format", "weight": 0.5, "kwargs": {}},
            accuracy={"fn": "rewards.math_accuracy.math_accuracy", "weight": 2.0, "kwargs": {"timeout_s": 3}},
        )
    )
    completions = ["<think>a</think><answer>4</answer>", "4", "<think>a</think><answer>5</answer>"]
    scores = score_completions(functions, ["q"] * 3, completions, {"solution": ["4", "4", "not math at all"]})
    assert scores == {"format": [1.0, 0.0, 1.0], "accuracy": [1.0, 1.0, None]}
    assert total_reward(functions, scores).tolist() == [2.5, 2.0, 0.5]  # None adds nothing
    metrics = reward_metrics(scores)
    assert metrics["reward/accuracy_mean"] == 1.0  # the None is left out of the mean
    assert metrics["reward/accuracy_none_frac"] == pytest.approx(1 / 3)


def failing_reward(prompts, completions, **columns):
    raise KeyError("solution")


def short_reward(prompts, completions, **columns):
    return [1.0]


def nan_reward(prompts, completions, **columns):
    return [math.nan] * len(completions)


@pytest.mark.parametrize(
    "fn, message",
    [
        ("tests.test_rewards.failing_reward", "reward 'r' raised KeyError"),
        ("tests.test_rewards.short_reward", "returned 1 scores for 2 completions"),
        ("tests.test_rewards.nan_reward", "returned nan for completion 0"),
    ],
)
def test_bad_rewards_fail_with_their_name(fn, message):
    functions = load_reward_functions(reward_config(r={"fn": fn, "weight": 1.0, "kwargs": {}}))
    with pytest.raises(RewardError, match=message):
        score_completions(functions, ["q", "q"], ["a", "b"], {})


def test_unimportable_reward_is_named():
    with pytest.raises(ValueError, match="cannot import reward fn 'rewards.nope.fn'"):
        load_reward_functions(reward_config(r={"fn": "rewards.nope.fn", "weight": 1.0, "kwargs": {}}))


def fails_on_b(prompts, completions, **columns):
    return [{"a": 1.0}[completion] for completion in completions]  # KeyError on "b"


def test_reward_that_raises_shows_the_failing_sample_or_is_skipped():
    spec = reward_config(r={"fn": "tests.test_rewards.fails_on_b", "weight": 1.0, "kwargs": {}})
    with pytest.raises(
        RewardError, match=r"(?s)raised KeyError.*on sample 1: .*completion='b'.*on_reward_error=skip"
    ):
        score_completions(load_reward_functions(spec), ["q", "q"], ["a", "b"], {})
    skipping = load_reward_functions(spec, on_error="skip")
    assert score_completions(skipping, ["q"] * 3, ["a", "b", "a"], {}) == {"r": [1.0, None, 1.0]}
    assert reward_error_metrics(skipping) == {"reward/r_errors": 1.0}
    assert score_completions(skipping, ["q"], ["a"], {}) == {"r": [1.0]}
    assert reward_error_metrics(skipping) == {"reward/r_errors": 0.0}  # counted per call, not summed
