"""Accuracy of a math answer, checked by math-verify against the dataset's reference solution.

What counts as the answer, and why:
- the content of the last <answer>...</answer>; without one, the last complete \\boxed{...} anywhere in the
  completion; without either, nothing (0.0). Reading "the last number of the text" instead would pay a
  completion cut off mid-sum ("1+9+6+6 = 22, so the age") and teach the model never to close its tags.
- that content is read as ONE expression: the whole of it inside $...$ through math-verify's LaTeX reader
  (sets `2, 3`, intervals `(2, 5]`, tuples, surds `5\\sqrt{2}`), after stripping what math-verify misreads
  or reads as a product of letters: delimiters, `\\boxed`, currency, trailing unit words, `√`, percent
  signs. A plain-text answer is a lone number among words ("The answer is 42."). math-verify's own default,
  the last number of the text, would read `2, 3` as 3 and `(2, 5]` as 5.
- the gold is read the same way (its last \\boxed{} when it has one); a gold in prose without a box (a GSM8K
  solution ending in "#### 18") is trusted to end with its answer and read by math-verify's default.
- a percent is what math-verify makes of `25%`: 25 * (1/100), which it counts equal to 25, 0.25 and 1/4.

Time: math-verify's parse and verify can run for minutes on a short string (`10^{10^{10}}`, `100000000!`),
and its timeouts use SIGALRM, which only the main thread may set, while the loop may score rewards in a
background thread. So parsing and verifying run in a worker process of their own: there the alarms work
(1 s per math-verify call, so the worker usually survives a hostile string), and the caller waits at most
`timeout_s` per completion before it kills the worker (restarted on the next request) and scores that
completion 0. Answers are capped in length before anything is parsed.
"""

import atexit
import functools
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time

from latex2sympy2_extended import NormalizationConfig, convert_to_pct
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOXED = re.compile(r"\\boxed\s*{")
BRACE = re.compile(r"[{}]")
MATH_DELIMITERS = re.compile(r"\\\$|\$|\\\(|\\\)|\\\[|\\\]")
SURD = re.compile(r"√\s*(\d+(?:\.\d+)?|[A-Za-z]|\{[^{}]*\}|\([^()]*\))")
PERCENT = re.compile(r"\s*(?:\\?%|\b(?:percent|percentage|pct)\b)$")
# a word of two or more letters after a number or a closing brace at the very end: `22 years`, `6 cm^2`,
# `5\sqrt{2} meters`, `18 \text{ dollars}`. Two letters at least, so a variable (`2 x`) is never a unit.
TRAILING_UNIT = re.compile(
    r"(?<=[\d}])\s*(?:\\(?:text|mbox|mathrm)\s*{\s*[A-Za-z][A-Za-z\s.]*}|\s[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)"
    r"(?:\^\{?[23]\}?|[²³])?$"
)
TEXT_GROUP = re.compile(r"\\(?:text|mbox|mathrm|textbf)\s*{[^{}]*}")
# a word outside LaTeX commands, not a connective math-verify reads (`2 and 3`) nor a function name
WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
MATH_WORDS = {"and", "or", "pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "infty"}
PLAIN_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")

# math-verify's alarm per parse or verify call in the worker: signal.alarm counts whole seconds, 1 is the least
WORKER_ALARM_S = 1
STARTUP_S = 30.0  # the first request also waits for the worker to import math-verify and sympy (busy machine)

# One instance of each reader: math-verify caches the compiled patterns of its last config only.
LATEX = LatexExtractionConfig(
    normalization_config=NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=False
    )
)
PLAIN = ExprExtractionConfig()


def tagged_answer(completion: str) -> str | None:
    """The content of the last closed <answer>...</answer>, or None. rfind keeps it linear in the length."""
    close = completion.rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    opening = completion.rfind(ANSWER_OPEN, 0, close)
    return None if opening < 0 else completion[opening + len(ANSWER_OPEN) : close]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} whose braces close, or None.

    One pass pairs every brace, so a long tail after an early box, or thousands of unclosed boxes,
    costs linear time; a box cut off by truncation is skipped for the one before it.
    """
    closing_of: dict[int, int] = {}
    open_braces: list[int] = []
    for brace in BRACE.finditer(text):
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            closing_of[open_braces.pop()] = brace.start()
    for box in reversed(list(BOXED.finditer(text))):
        start = box.end() - 1
        if start in closing_of:
            return text[start + 1 : closing_of[start]]
    return None


def has_prose(text: str) -> bool:
    """Whether the text holds a word that is not LaTeX, not in \\text{...} and not a function name."""
    return any(word.lower() not in MATH_WORDS for word in WORD.findall(TEXT_GROUP.sub("", text)))


def final_answer(completion: str) -> str | None:
    """What the completion gives as its answer: the tagged answer, else a boxed one, else None."""
    tagged = tagged_answer(completion)
    return tagged if tagged is not None else last_boxed(completion)


def normalise(answer: str) -> tuple[str, bool]:
    """(the answer as one expression, whether it was a percent).

    Strips what math-verify's LaTeX reader misreads or reads as a product of letters; a lone number among
    words ("The answer is 42.") becomes that number.
    """
    text = " ".join(answer.split())  # math-verify's $...$ pattern stops at a newline
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = MATH_DELIMITERS.sub("", text).replace("**", "")
    text = SURD.sub(lambda m: "\\sqrt{" + m.group(1).strip("{}()") + "}", text).replace("°", "^\\circ")
    text = text.strip().rstrip(".").strip()
    percent = PERCENT.search(text) is not None
    text = PERCENT.sub("", text)
    text = TRAILING_UNIT.sub("", text).strip()
    # prose: its answer is a lone number, with nothing else but words and punctuation beside it
    if has_prose(text):
        numbers = NUMBER.findall(text)
        rest = WORD.sub("", NUMBER.sub("", text)).strip(" .,:;!?'\"")
        text = numbers[0] if len(numbers) == 1 and not rest else ""
    return text, percent


def read_expression(answer: str) -> list:
    """math-verify's reading of an answer as one expression: [] when it has none.

    A plain number skips the LaTeX reader: its grammar costs milliseconds where a regex costs microseconds.
    """
    text, percent = normalise(answer)
    if not text:
        return []
    plain = PLAIN_NUMBER.fullmatch(text) is not None
    values = parse(
        text if plain else f"${text}$",
        [PLAIN if plain else LATEX],
        fallback_mode="no_fallback",
        parsing_timeout=WORKER_ALARM_S,
    )
    if percent:
        values = [convert_to_pct(v) if getattr(v, "is_Number", False) else v for v in values]
    return values


@functools.lru_cache(maxsize=4096)
def read_gold(solution: str) -> list:
    """The reference answer: its last boxed answer, or the whole of it when it is bare math, else
    math-verify's default reading (a solution in prose is trusted to end with its answer, GSM8K's '#### 18')."""
    boxed = last_boxed(solution)
    if boxed is not None:
        return read_expression(boxed)
    if not has_prose(solution):
        return read_expression(solution)
    return parse(solution, [LATEX, PLAIN], fallback_mode="no_fallback", parsing_timeout=WORKER_ALARM_S)


def judge(solution: str, answer: str | None) -> bool | None:
    """None if the gold cannot be read; else whether the answer (None: the gold alone is checked) matches."""
    gold = read_gold(solution)
    if not gold:
        return None
    if answer is None:
        return True
    values = read_expression(answer)
    return bool(values) and verify(gold, values, timeout_seconds=WORKER_ALARM_S)


def serve() -> None:
    """The worker's loop: one JSON request per line on stdin, [solution, answer or null] -> true/false/null."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are expected here, not news
    for line in sys.stdin:
        solution, answer = json.loads(line)
        try:
            verdict = judge(solution, answer)
        except Exception:  # math-verify catches its own; whatever escapes means "no match"
            verdict = None if answer is None else False
        sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()


class Worker:
    """The worker process, started on the first request and again after it was killed for being late."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.pending = b""
        self.lock = threading.Lock()  # one request at a time, whichever thread scores rewards
        atexit.register(self.stop)

    def start(self) -> subprocess.Popen:
        """This file, run by path: the worker needs math-verify, not this package on its import path."""
        run_this_file = (
            f"import runpy; runpy.run_path({__file__!r}, run_name='math_accuracy_worker')['serve']()"
        )
        return subprocess.Popen(
            [sys.executable, "-c", run_this_file], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process, self.pending = None, b""

    def ask(self, solution: str, answer: str | None, timeout_s: float) -> bool | None:
        """The worker's verdict, or False when it takes longer than timeout_s or dies on the way."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self.stop()
                self.process = self.start()
                timeout_s += STARTUP_S
            try:
                self.process.stdin.write(json.dumps([solution, answer]).encode() + b"\n")
                self.process.stdin.flush()
                reply = self.read_line(timeout_s)
            except OSError:  # the worker died between the check and the write
                reply = None
            if reply is None:
                self.stop()
                return False
            return json.loads(reply)

    def read_line(self, timeout_s: float) -> bytes | None:
        """The next line from the worker, or None if it does not come within timeout_s or the worker died."""
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line


WORKER = Worker()


def math_accuracy(
    completions: list[str],
    solution: list[str],
    timeout_s: float = 3.0,
    max_answer_chars: int = 1000,
    **kwargs,
) -> list[float | None]:
    """1.0 if the completion's final answer equals the solution mathematically, 0.0 if not or if it has none.

    None when the reference solution itself cannot be read: the sample says nothing about the model.
    `timeout_s` bounds the time spent on one completion (or one gold); an answer longer than
    `max_answer_chars` is not an answer and scores 0 unparsed.
    """
    gold_readable: dict[str, bool] = {}
    scores: list[float | None] = []
    for completion, reference in zip(completions, solution):
        if reference not in gold_readable:
            gold_readable[reference] = WORKER.ask(reference, None, timeout_s) is True
        if not gold_readable[reference]:
            scores.append(None)
            continue
        answer = final_answer(completion)
        if answer is None or not answer.strip() or len(answer) > max_answer_chars:
            scores.append(0.0)
            continue
        scores.append(1.0 if WORKER.ask(reference, answer, timeout_s) else 0.0)
    return scores
