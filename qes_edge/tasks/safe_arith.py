"""A safe evaluator for the arithmetic a model writes (Countdown answers).

Never `eval`: the text is parsed with `ast` and only integers, + - * / and parentheses are
walked, over exact fractions.  Length, digits and depth are bounded, and there is no power
operator at all, so no answer can hang the process (the reference's `a**b**c`) or reach
anything but arithmetic.  Whitespace (spaces, tabs, newlines) is allowed anywhere between
tokens: a model that writes its answer on its own line is not wrong."""

from __future__ import annotations

import ast
from fractions import Fraction

MAX_CHARS = 120          # of the expression, leading and trailing whitespace stripped
MAX_DIGITS = 7
MAX_DEPTH = 24


_SPACE = " \t\r\n"
_ALLOWED = frozenset("0123456789+-*/()" + _SPACE)
_TO_SPACE = str.maketrans("\t\r\n", "   ")


class UnsafeExpression(ValueError):
    pass


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """Value of an arithmetic expression and the integers it uses; UnsafeExpression otherwise."""
    if not isinstance(text, str):
        raise UnsafeExpression("expression missing")
    text = text.strip(_SPACE)
    if len(text) > MAX_CHARS:
        raise UnsafeExpression("expression too long")
    if any(c not in _ALLOWED for c in text):
        raise UnsafeExpression("only digits, + - * / and parentheses are allowed")
    # a newline outside parentheses ends a Python expression: the parser sees spaces only
    text = text.translate(_TO_SPACE)
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise UnsafeExpression("not an arithmetic expression") from None
    used: list[int] = []

    def walk(node, depth):
        if depth > MAX_DEPTH:
            raise UnsafeExpression("expression nested too deeply")
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if len(str(node.value)) > MAX_DIGITS:
                raise UnsafeExpression("number too long")
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left, depth + 1), walk(node.right, depth + 1)
            if isinstance(node.op, ast.Div):
                if b == 0:
                    raise UnsafeExpression("division by zero")
                return a / b
            op = _OPS.get(type(node.op))
            if op is None:
                raise UnsafeExpression(f"operator {type(node.op).__name__} not allowed")
            return op(a, b)
        raise UnsafeExpression(f"{type(node).__name__} not allowed")

    return walk(tree.body, 0), used
