"""Format reward of the DeepSeek-R1 recipe: reasoning in <think>, the answer in <answer>."""

import re

THINK_ANSWER = re.compile(r"<think>.*</think>\s*<answer>.*</answer>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def think_answer_format(completions: list[str], **kwargs) -> list[float | None]:
    """1.0 when the whole completion is one <think>...</think> then one <answer>...</answer>, else 0.0.

    Each tag must appear exactly once: a pattern alone lets `.*?` span a second pair of blocks, and two
    answers would be paid like one.
    """
    return [
        1.0 if all(c.count(tag) == 1 for tag in TAGS) and THINK_ANSWER.fullmatch(c.strip()) else 0.0
        for c in completions
    ]
