"""Format reward of the DeepSeek-R1 recipe: reasoning in <think>, the answer in <answer>."""

import re

THINK_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def think_answer_format(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """1.0 when the whole completion is <think>...</think> then <answer>...</answer>, else 0.0."""
    return [1.0 if THINK_ANSWER.fullmatch(c.strip()) else 0.0 for c in completions]
