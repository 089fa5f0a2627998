"""A calculator tool for the arithmetic data: the model may write `<tool>expression</tool>` and gets the result
back as a `tool` message before it answers. The expression is parsed (ast), never run: numbers and + - * / **
only, with bounded sizes, so a sample cannot make the trainer compute for ever or run code."""

from __future__ import annotations

import ast
import math
import operator
import re

TOOL_CALL = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64  # 2 ** 64 is fine, 10 ** 10 ** 10 is not
MAX_MAGNITUDE = (
    1e18  # every number read or computed stays within this (floats keep integers exact up to 2**53)
)

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class CalculatorError(ValueError):
    """The expression is not bounded arithmetic; the message says what was refused."""


def calculate(expression: str) -> float | int:
    """The value of `expression`: numbers, + - * / **, unary minus and parentheses, nothing else.

    Refused (CalculatorError): names, calls, attributes, strings, an exponent beyond MAX_EXPONENT, a number
    or result beyond MAX_MAGNITUDE, a division by zero, more than MAX_EXPRESSION_CHARS characters.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise CalculatorError(f"not an expression: {error.msg}") from None
    return bounded(value_of(tree.body))


def value_of(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool is not a number here
        return bounded(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = value_of(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = value_of(node.left), value_of(node.right)
        if abs(exponent) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {exponent} beyond {MAX_EXPONENT}")
        if base == 0 and exponent < 0:
            raise CalculatorError("zero to a negative power")
        try:
            result = base**exponent
        except OverflowError:
            raise CalculatorError(f"result beyond {MAX_MAGNITUDE:g}") from None
        if isinstance(result, complex):  # a negative number to a fractional power
            raise CalculatorError("not a real number")
        return bounded(result)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = value_of(node.left), value_of(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalculatorError("division by zero")
        return bounded(BINARY[type(node.op)](left, right))
    raise CalculatorError(f"{type(node).__name__} is not arithmetic: only numbers and + - * / **")


def bounded(value: float | int) -> float | int:
    # checked on each intermediate value, so a chain of products cannot build a huge integer before the end
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"a number beyond {MAX_MAGNITUDE:g}")
    return value


def shown(value: float | int) -> str:
    """A result as the model reads it: 12, not 12.0."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


class Calculator:
    """The row's question; each `<tool>...</tool>` in a turn gets its result back (or the refusal) as a tool
    message; a turn with no tool call is the answer: reward 1 when its first number equals `solution`, else 0."""

    def __init__(
        self, instructions: str = "Use <tool>expression</tool> to calculate, then answer with a number."
    ):
        self.instructions = instructions

    def reset(self, row: dict) -> list[dict]:
        self.solution = float(row["solution"])
        return [{"role": "user", "content": f"{row['prompt']} {self.instructions}"}]

    def step(self, assistant_text: str) -> tuple[list[dict] | None, float | None, bool]:
        calls = TOOL_CALL.findall(assistant_text)
        if calls:
            return [{"role": "tool", "content": self.run_tool(call)} for call in calls], None, False
        answer = NUMBER.search(assistant_text)
        return None, float(answer is not None and float(answer.group()) == self.solution), True

    @staticmethod
    def run_tool(expression: str) -> str:
        try:
            return shown(calculate(expression))
        except CalculatorError as refusal:
            return f"error: {refusal}"
