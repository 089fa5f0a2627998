"""Rewards on tables of realistic completions, and the checks that guard the loop from bad rewards."""

import math
import threading

import pytest

from online_rl.loop import run
from online_rl.rewarding import (
    RewardError,
    load_reward_functions,
    reward_error_metrics,
    reward_metrics,
    score_completions,
    total_reward,
)
from online_rl.rewards.digits import digit_fraction
from online_rl.rewards.format import think_answer_format
from online_rl.rewards.length import overlong_penalty
from online_rl.rewards.math_accuracy import math_accuracy

SMALL_RUN = ["data.synthetic_rows=64", "prompts_per_step=4", "algo.num_generations=4", "micro_batch_size=8"]

FORMAT_TABLE = [
    # (completion, expected, why)
    ("<think>2 + 2 is 4.</think><answer>4</answer>", 1.0, "one think block, then one answer block"),
    (
        "<think>\nLet x = 3.\nThen 2x = 6.\n</think>\n<answer>\n6\n</answer>\n",
        1.0,
        "newlines between and inside",
    ),
    ("  <think>ok</think> <answer>$\\frac{1}{2}$</answer>", 1.0, "surrounding whitespace"),
    ("<think></think><answer>4</answer>", 1.0, "an empty think block is still the R1 format"),
    ("<answer>4</answer>", 0.0, "no reasoning block"),
    ("<think>4</think>", 0.0, "no answer block"),
    ("<answer>4</answer><think>because</think>", 0.0, "wrong order"),
    ("<think>a</think><answer>4</answer> and some trailing chatter", 0.0, "text after the answer"),
    ("<think>unclosed <answer>4</answer>", 0.0, "think never closed"),
    ("<think>a</think><answer>4", 0.0, "answer never closed (truncated)"),
    ("<think>a</think><answer>3</answer><think>b</think><answer>4</answer>", 0.0, "two think/answer pairs"),
    ("<think>a</think><answer>3</answer><answer>4</answer>", 0.0, "two answer blocks"),
    ("<think>a</think><think>b</think><answer>4</answer>", 0.0, "two think blocks"),
    (
        "<think>maybe <answer>3</answer>?</think><answer>4</answer>",
        0.0,
        "an answer block inside the reasoning",
    ),
    ("<think>a <think>b</think></think><answer>4</answer>", 0.0, "nested think blocks"),
    ("The answer is 4.", 0.0, "no tags at all"),
    ("", 0.0, "empty completion"),
]


@pytest.mark.parametrize(
    "completion, expected", [row[:2] for row in FORMAT_TABLE], ids=[r[2] for r in FORMAT_TABLE]
)
def test_think_answer_format(completion, expected):
    assert think_answer_format(prompts=["What is 2 + 2?"], completions=[completion]) == [expected]


# Reference solutions as the datasets give them: GSM8K's after `solution_regex` ('####\s*(.+?)\s*$'),
# NuminaMath-TIR's whole worked solution (code, its output, a boxed answer in \(...\)).
def numina(answer: str) -> str:
    return (
        "Let's reason step by step and check with code.\n\n```python\nimport sympy as sp\nx = sp.symbols('x')\n"
        f"print(sp.solve(x**2 - 5*x + 6, x))\n```\n```output\n[2, 3]\n```\nSo the answer is \\(\\boxed{{{answer}}}\\)."
    )


def tagged(answer: str, reasoning: str = "Let me work it out step by step.") -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>"


EGGS = "Janet's ducks lay 16 eggs. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 eggs are sold at $2: 9 * 2 = 18."
TAIL = " Wait, let me double-check the 3 eggs and the 4 muffins once more." * 120  # ~8,000 characters

MATH_TABLE = [
    # (completion, reference solution, expected, why)
    # truncated: the tags never close, and the last number is the gold's
    (
        "<think>The digits of 1966 sum to 1+9+6+6 = 22, so the age",
        "22",
        0.0,
        "cut off, last number is the gold",
    ),
    (f"<think>{EGGS} So she makes $18", "18", 0.0, "cut off after the right amount, no tag"),
    (f"<think>{EGGS}</think>\n<answer>18", "18", 0.0, "cut off inside the answer block"),
    (f"<think>{EGGS}</think>\n<answer>\\boxed{{1", "18", 0.0, "cut off inside a box"),
    (f"<think>{EGGS} So \\boxed{{18}}. Checking: 16 - 3", "18", 1.0, "cut off after a complete box"),
    # plain answers, as GSM8K-style models write them
    (tagged("42", "7 * 6 = 42"), "42", 1.0, "plain number"),
    (tagged("41"), "42", 0.0, "wrong number"),
    ("<think>\nsum\n</think>\n<answer>\n42\n</answer>\n", "42", 1.0, "multi-line answer block"),
    (tagged("The answer is 42."), "42", 1.0, "a sentence around one number"),
    (tagged("x = 3"), "3", 1.0, "an equation giving the value"),
    (tagged("1,000"), "1000", 1.0, "thousands separator"),
    (tagged("1000"), "1,000", 1.0, "thousands separator in the gold"),
    (tagged("-3"), "-3", 1.0, "negative number"),
    (tagged("3"), "-3", 0.0, "sign matters"),
    (tagged("**42**"), "42", 1.0, "markdown bold"),
    (tagged("I don't know"), "42", 0.0, "no number"),
    (tagged("x + 3"), "3", 0.0, "an expression that contains the gold is not the gold"),
    (tagged("The answer is x + 3"), "3", 0.0, "prose with an expression is not a lone number"),
    (tagged("It is 40 or 42"), "42", 0.0, "two candidates in prose: no guess"),
    (tagged("1+9+6+6 = 22"), "22", 1.0, "a computation ending in the value"),
    # LaTeX
    (tagged("\\frac{1}{2}"), numina("\\frac{1}{2}"), 1.0, "bare LaTeX fraction"),
    (tagged("$\\dfrac{3}{4}$"), "0.75", 1.0, "dfrac against a decimal gold"),
    (tagged("0.5"), "$\\boxed{\\frac{1}{2}}$", 1.0, "decimal against a fraction gold"),
    (tagged("\\(\\frac{\\pi}{3}\\)"), numina("\\frac{\\pi}{3}"), 1.0, "inline math delimiters"),
    (tagged("2\\sqrt{2}"), "\\sqrt{8}", 1.0, "bare surd, simplified"),
    (tagged("\\sqrt{2}"), "\\sqrt{8}", 0.0, "a different surd"),
    (tagged("$x^2 - 1$"), numina("(x-1)(x+1)"), 1.0, "symbolically equal polynomial"),
    (tagged("\\boxed{18}"), "18", 1.0, "a box inside the answer block"),
    (tagged("The final answer is $\\boxed{7}$."), "7", 1.0, "a sentence with a boxed answer"),
    # boxed, without tags
    (f"{EGGS} So the total is \\boxed{{18}}.", f"{EGGS} #### 18", 1.0, "box without tags, prose gold"),
    (f"{EGGS} So the answer is $\\boxed{{17}}$.", "18", 0.0, "wrong box without tags"),
    (f"{EGGS} The answer is 18.", "18", 0.0, "no tag and no box: nothing to credit"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", numina("\\frac{\\sqrt{3}}{2}"), 1.0, "nested braces in a box"),
    ("First \\boxed{3}, but I misread; corrected: \\boxed{4}", "4", 1.0, "the last box counts"),
    ("First \\boxed{3}, but I misread; corrected: \\boxed{4}", "3", 0.0, "an earlier box does not"),
    # sets
    (tagged("2, 3"), numina("2, 3"), 1.0, "plain set"),
    (tagged("\\{2,3\\}"), numina("2, 3"), 1.0, "LaTeX set"),
    (tagged("3, 2"), numina("\\{2, 3\\}"), 1.0, "a set has no order"),
    (tagged("2, 3"), "3", 0.0, "a set is not its last element"),
    (tagged("2"), numina("2, 3"), 0.0, "one element of the set"),
    (tagged("x = 2 \\text{ or } x = 3"), numina("2, 3"), 1.0, "roots given as equations"),
    # intervals
    (tagged("(2, 5]"), numina("(2, 5]"), 1.0, "half-open interval"),
    (tagged("(2, 5)"), numina("(2, 5]"), 0.0, "open is not half-open"),
    (tagged("(2, 5]"), "5", 0.0, "an interval is not its end point"),
    (tagged("x \\in (-\\infty, 3)"), numina("(-\\infty, 3)"), 1.0, "membership in an unbounded interval"),
    # tuples
    (tagged("(1, 2)"), numina("(1, 2)"), 1.0, "ordered pair"),
    (tagged("(2, 1)"), numina("(1, 2)"), 0.0, "a pair has an order"),
    (tagged("(1, 2)"), "2", 0.0, "a pair is not its last element"),
    # surds
    (tagged("5\\sqrt{2}"), numina("5\\sqrt{2}"), 1.0, "LaTeX surd"),
    (tagged("5√2"), numina("5\\sqrt{2}"), 1.0, "unicode surd"),
    (tagged("√50"), numina("5\\sqrt{2}"), 1.0, "unsimplified unicode surd"),
    (tagged("5√2"), "5", 0.0, "a surd is not its coefficient"),
    (tagged("5"), numina("5\\sqrt{2}"), 0.0, "nor the coefficient the surd"),
    # percents: 25% is 25 * 1/100, which math-verify counts equal to 25, 0.25 and 1/4
    (tagged("25\\%"), numina("25\\%"), 1.0, "LaTeX percent against a boxed percent"),
    (tagged("25%"), numina("25\\%"), 1.0, "plain percent"),
    (tagged("25 percent"), numina("25\\%"), 1.0, "percent in words"),
    (tagged("25"), numina("25\\%"), 1.0, "the number of percent"),
    (tagged("0.25"), numina("25\\%"), 1.0, "the fraction the percent is"),
    (tagged("100"), numina("25\\%"), 0.0, "the code's 100 is not the answer"),
    (tagged("20\\%"), numina("25\\%"), 0.0, "wrong percent"),
    (tagged("25%"), "25\\%", 1.0, "bare percent gold"),
    # units and currency
    (tagged("22 years"), "22", 1.0, "unit word"),
    (tagged("21 years"), "22", 0.0, "wrong number with a unit"),
    (tagged("$18"), "18", 1.0, "dollar sign"),
    (tagged("\\$18.00"), "18", 1.0, "escaped dollar and cents"),
    (tagged("18 dollars"), "18", 1.0, "currency word"),
    (tagged("6 \\text{ cm}^2"), "6", 1.0, "LaTeX unit with a power"),
    (tagged("6 cm^2"), "6", 1.0, "plain unit with a power"),
    (tagged("30°"), numina("30^\\circ"), 1.0, "degrees"),
    # long tails
    (f"{EGGS} So \\boxed{{18}}.{TAIL}", "18", 1.0, "an early box before a long tail"),
    (f"{EGGS} So \\boxed{{17}}.{TAIL}", "18", 0.0, "an early wrong box before a long tail"),
    (tagged("18", EGGS + TAIL), "18", 1.0, "a long reasoning block"),
    (tagged("18 " + "and so on " * 200), "18", 0.0, "an answer longer than max_answer_chars"),
    # two blocks: the last answer is the one given (the format reward pays 0)
    (
        "<think>a</think><answer>17</answer><think>b</think><answer>18</answer>",
        "18",
        1.0,
        "two blocks, last right",
    ),
    (
        "<think>a</think><answer>18</answer><think>b</think><answer>17</answer>",
        "18",
        0.0,
        "two blocks, last wrong",
    ),
    # empty
    ("", "18", 0.0, "empty completion"),
    (tagged(""), "18", 0.0, "empty answer block"),
    (tagged("   \n "), "18", 0.0, "blank answer block"),
    # an unreadable gold says nothing about the model: None, not 0 and not a crash
    (tagged("4"), "see the figure in the appendix", None, "unreadable gold"),
    ("", "see the figure in the appendix", None, "unreadable gold, empty completion"),
]


@pytest.mark.parametrize(
    "completion, solution, expected", [row[:3] for row in MATH_TABLE], ids=[row[3] for row in MATH_TABLE]
)
def test_math_accuracy(completion, solution, expected):
    assert math_accuracy(completions=[completion], solution=[solution]) == [expected]


def test_math_accuracy_table_in_one_batch():
    """The same table as one call, as the loop makes it: a gold shared by many rows is read once."""
    completions, solutions, expected, _ = zip(*MATH_TABLE)
    assert math_accuracy(completions=list(completions), solution=list(solutions)) == list(expected)


HOSTILE = [
    tagged("{" * 20000),
    "1" * 500_000,
    tagged("\\frac{" * 3000),
    tagged("(" * 10000 + "x" + ")" * 10000),
    "\\boxed{" * 100_000,
    "<answer>" * 60_000,
    tagged("10^{10^{10}}"),  # math-verify computes for minutes without a timeout
    tagged("100000000!"),
    tagged("9^{9^{9^{9}}}"),
]


@pytest.mark.parametrize("completion", HOSTILE, ids=[repr(c[:24]) for c in HOSTILE])
def test_math_accuracy_scores_hostile_strings_zero(completion):
    assert math_accuracy(completions=[completion], solution=["3"]) == [0.0]


def test_math_accuracy_off_the_main_thread():
    """The loop may score in a background thread, where math-verify's SIGALRM timeouts cannot be set; a
    hostile answer must still end, and a late worker is replaced."""
    results = []
    completions = [tagged("9^{9^{9^{9}}}"), tagged("3")]
    worker = threading.Thread(
        target=lambda: results.append(
            math_accuracy(completions=completions, solution=["3"] * 2, timeout_s=0.5)
        )
    )
    worker.start()
    worker.join()
    assert results == [[0.0, 1.0]]


def test_digit_fraction():
    assert digit_fraction(completions=["42", "4 2 x", "no digits", " "]) == [1.0, 2 / 3, 0.0, None]


def test_overlong_penalty():
    # max 10, window 4: free up to 6 tokens, then -1/4 per token, -1 at 10
    assert overlong_penalty(
        completions=["c"] * 5, completion_lengths=[3, 6, 7, 9, 10], max_length=10, soft_window=4
    ) == [
        0.0,
        0.0,
        -0.25,
        -0.75,
        -1.0,
    ]
    with pytest.raises(ValueError, match="soft_window"):
        overlong_penalty(completion_lengths=[1], max_length=10, soft_window=11)


def reward_config(**entries):
    from omegaconf import OmegaConf

    return OmegaConf.create(entries)


def test_weighted_total_and_none_handling():
    functions = load_reward_functions(
        reward_config(
            format={"fn": "online_rl.rewards.format.think_answer_format", "weight": 0.5, "kwargs": {}},
            accuracy={
                "fn": "online_rl.rewards.math_accuracy.math_accuracy",
                "weight": 2.0,
                "kwargs": {"timeout_s": 3},
            },
        )
    )
    completions = ["<think>a</think><answer>4</answer>", "\\boxed{4}", "<think>a</think><answer>5</answer>"]
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
    with pytest.raises(
        ValueError, match=r"cannot import reward fn 'rewards.nope.fn' \(rewards.r.fn\).*PYTHONPATH"
    ):
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


def lengths_only(completion_lengths):
    return [float(n) for n in completion_lengths]


def ids_and_solution(completion_ids, solution, **kwargs):
    return [float(len(ids) == int(answer)) for ids, answer in zip(completion_ids, solution)]


def test_rewards_are_called_by_keyword_each_with_what_it_names():
    """TRL's convention: keywords, not positions; a function without **kwargs gets only the ones it names."""
    functions = load_reward_functions(
        reward_config(
            lengths={"fn": "tests.test_rewards.lengths_only", "weight": 1.0, "kwargs": {}},
            ids={"fn": "tests.test_rewards.ids_and_solution", "weight": 1.0, "kwargs": {}},
        ),
        dataset_columns=["prompt", "solution"],
    )
    columns = {"solution": ["2", "2"], "completion_lengths": [2, 3]}
    scores = score_completions(
        functions, ["q", "q"], ["ab", "abc"], columns, completion_ids=[[1, 2], [1, 2, 3]]
    )
    assert scores == {"lengths": [2.0, 3.0], "ids": [1.0, 0.0]}


def positional_only(completions, /):
    return [1.0] * len(completions)


def wants_answer(completions, answer, **kwargs):
    return [1.0] * len(completions)


@pytest.mark.parametrize(
    "fn, message",
    [
        (
            "tests.test_rewards.positional_only",
            r"reward 'r' \(tests.test_rewards.positional_only\) takes completions by position only.*by keyword",
        ),
        (
            "tests.test_rewards.wants_answer",
            r"reward 'r' \(tests.test_rewards.wants_answer\) needs 'answer', which no call passes: it is called "
            r"with completion_ids, completion_lengths, completions, prompts, solution\. .*rewards.r.kwargs.answer",
        ),
    ],
)
def test_a_reward_that_cannot_take_the_keywords_is_refused_when_loaded(fn, message):
    with pytest.raises(ValueError, match=message):
        load_reward_functions(
            reward_config(r={"fn": fn, "weight": 1.0, "kwargs": {}}), dataset_columns=["prompt", "solution"]
        )


def test_a_reward_wanting_a_column_the_data_lacks_stops_the_run_before_any_model_loads(make_config, tmp_path):
    cfg = make_config("max_steps=1", "rewards=[digits]", "rewards.digits.fn=tests.test_rewards.wants_answer")
    with pytest.raises(ValueError, match="reward 'digits' .* needs 'answer'"):
        run(cfg)
    assert not (tmp_path / "random_init").exists()  # the tiny model was never built


# a config of the user's own, beside the packaged ones (hydra.searchpath), naming TRL's functions unchanged
TRL_REWARDS_YAML = """
think:
  fn: trl.rewards.think_format_reward
  completions: messages
accuracy:
  fn: trl.rewards.accuracy_reward
  completions: messages
"""


def test_trl_reward_functions_plug_in_unchanged_and_score_what_they_promise():
    """TRL's own rewards, imported by path, read completions in its conversational form."""
    pytest.importorskip("trl")
    functions = load_reward_functions(
        reward_config(
            think={
                "fn": "trl.rewards.think_format_reward",
                "weight": 1.0,
                "kwargs": {},
                "completions": "messages",
            },
            accuracy={
                "fn": "trl.rewards.accuracy_reward",
                "weight": 1.0,
                "kwargs": {},
                "completions": "messages",
            },
        ),
        dataset_columns=["prompt", "solution"],
    )
    completions = ["<think>6 times 7</think>\\boxed{42}", "it is 41"]
    scores = score_completions(functions, ["6 * 7?"] * 2, completions, {"solution": ["42", "42"]})
    assert scores == {"think": [1.0, 0.0], "accuracy": [1.0, 0.0]}


def test_a_few_steps_train_on_trl_reward_functions(make_config, tmp_path):
    pytest.importorskip("trl")
    (tmp_path / "conf" / "rewards").mkdir(parents=True)
    (tmp_path / "conf" / "rewards" / "trl_r1.yaml").write_text(TRL_REWARDS_YAML)
    searchpath = f"hydra.searchpath=[file://{tmp_path}/conf]"
    cfg = make_config("max_steps=2", "vllm=off", "rewards=[digits,trl_r1]", searchpath, *SMALL_RUN)
    summary = run(cfg)
    assert len(summary.history) == 2
    for name in ("think", "accuracy"):  # scored every completion (a TRL reward returns a number or None)
        assert summary.history[-1][f"reward/{name}_none_frac"] < 1.0
        assert 0.0 <= summary.history[-1][f"reward/{name}_mean"] <= 1.0
