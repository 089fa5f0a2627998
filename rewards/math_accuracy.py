"""Accuracy of a math answer, checked by math-verify against the dataset's reference solution."""

import re
import threading

from math_verify import parse, verify

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str, max_chars: int) -> str:
    """The last <answer>...</answer> content if there is one, else the completion; at most its last max_chars.

    Answers sit at the end, and the cap bounds the parser's work on huge or adversarial strings.
    """
    tagged = ANSWER_TAG.findall(completion)
    return (tagged[-1] if tagged else completion)[-max_chars:]


def parse_math(text: str, timeout: int | None) -> list:
    """math-verify's parse. Bare LaTeX such as 2\\sqrt{2} lacks the $...$ anchor the LaTeX extractor looks
    for (the plain-expression extractor would read just "2"), so it is parsed inside $...$ first."""
    if "\\" in text and "$" not in text and "\\boxed" not in text:
        anchored = parse(f"${text}$", parsing_timeout=timeout)
        if anchored:
            return anchored
    return parse(text, parsing_timeout=timeout)


def math_accuracy(
    prompts: list[str],
    completions: list[str],
    solution: list[str],
    timeout_s: int = 5,
    max_answer_chars: int = 1000,
    **columns,
) -> list[float | None]:
    """1.0 if the answer equals the solution mathematically (LaTeX or plain), 0.0 if not.

    None when the reference solution itself cannot be parsed: the sample says nothing about the model.
    math-verify bounds each parse and comparison by `timeout_s` seconds with SIGALRM, which only the
    main thread can use; elsewhere only the character cap bounds the time.
    """
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold_cache: dict[str, list] = {}
    scores: list[float | None] = []
    for completion, reference in zip(completions, solution):
        if reference not in gold_cache:
            gold_cache[reference] = parse_math(reference, timeout)
        gold = gold_cache[reference]
        if not gold:
            scores.append(None)
            continue
        answer = parse_math(extract_answer(completion, max_answer_chars), timeout)
        scores.append(1.0 if answer and verify(gold, answer, timeout_seconds=timeout) else 0.0)
    return scores
