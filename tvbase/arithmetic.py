"""Task arithmetic: parse expressions such as ``0.7*math + 0.5*code - 1.0*toxic``, combine
coefficients, compose task vectors and apply them to a base.

Expressions come from users (CLI arguments, config files, HTTP requests), so they are read by a
small hand-written tokenizer and parser; nothing the user writes is ever evaluated.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tvbase.errors import InvalidInputError, NotFoundError

__all__ = ["parse_expression"]


# ---------------------------------------------------------------------------------------------
# Expression parser: "0.7*math + 0.5*code - toxic" -> {"math": 0.7, "code": 0.5, "toxic": -1.0}
# ---------------------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 4096
MAX_TERMS = 1024
# Task vectors are added to a base model; a coefficient beyond this is a typo, not a request.
MAX_ABS_COEFFICIENT = 1e6

# re.ASCII: \d and friends must not accept other scripts' digits, which float() would.
# A name may contain '-' and '.' inside but must end with a letter, digit or '_', so the '-' of
# "math- toxic" or "math -toxic" is an operator while "llama-3.1-chat" is one name.
_NAME_RE = re.compile(r"[A-Za-z_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?", re.ASCII)
_NUMBER_RE = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.")
_SPACE = frozenset(" \t\r\n")
_OPERATORS = frozenset("+-*/")
# Characters that word processors and chat clients substitute for the operators.
_LOOKALIKES = {"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "*", "\u00b7": "*"}
_CARET_WINDOW = 72  # characters of the expression shown around an error


@dataclass(frozen=True)
class _Token:
    kind: str  # "number", "name", "end", or the operator itself: "+", "-", "*", "/"
    text: str
    pos: int  # 0-based offset in the expression
    value: float = 0.0  # numbers only


def _caret(text: str, pos: int) -> str:
    """Two indented lines: the expression (a window of it when long) and a caret under ``pos``."""
    start, end = 0, len(text)
    if len(text) > _CARET_WINDOW:
        start = max(0, min(pos - _CARET_WINDOW // 2, len(text) - _CARET_WINDOW))
        end = start + _CARET_WINDOW
    prefix = "..." if start > 0 else ""
    suffix = "..." if end < len(text) else ""
    # Tabs, newlines and control characters would misplace the caret; show them as spaces.
    shown = "".join(c if c.isprintable() else " " for c in text[start:end])
    offset = len(prefix) + pos - start
    return f"    {prefix}{shown}{suffix}\n    {' ' * offset}^"


def _fail(
    text: str, pos: int, message: str, error=InvalidInputError, lead: str = "invalid expression"
) -> Exception:
    """An error saying what is wrong, at which column, with the expression and a caret."""
    return error(f"{lead} at column {pos + 1}: {message}\n{_caret(text, pos)}")


def _check_coefficient(text: str, pos: int, value: float, what: str) -> float:
    if not math.isfinite(value):
        raise _fail(text, pos, f"{what} is not finite")
    if abs(value) > MAX_ABS_COEFFICIENT:
        raise _fail(
            text, pos, f"{what} is out of range: |{value:g}| > {MAX_ABS_COEFFICIENT:g}"
        )
    return value


def _tokenize(text: str) -> list[_Token]:
    """Split ``text`` into numbers, names and operators; the last token is ``"end"``."""
    tokens = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c in _OPERATORS:
            tokens.append(_Token(c, c, i))
            i += 1
        elif c.isascii() and (c.isdigit() or (c == "." and text[i + 1 : i + 2].isdigit())):
            literal = _NUMBER_RE.match(text, i).group()
            after = i + len(literal)
            if after < len(text) and text[after] in _NAME_CHARS:
                # "2math", "1e", "1.2.3", "1_000": refuse rather than guess.
                raise _fail(
                    text, after,
                    f"unexpected character {text[after]!r} after the number {literal!r}; "
                    "separate a coefficient from a task name with '*' or a space",
                )
            value = _check_coefficient(text, i, float(literal), f"coefficient {literal!r}")
            tokens.append(_Token("number", literal, i, value))
            i = after
        elif c.isascii() and (c.isalpha() or c == "_"):
            name = _NAME_RE.match(text, i).group()
            tokens.append(_Token("name", name, i))
            i += len(name)
        else:
            hint = _LOOKALIKES.get(c)
            hint = f"; use the ASCII {hint!r}" if hint else ""
            raise _fail(text, i, f"unexpected character {c!r}{hint}")
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    """Recursive descent over the tokens; see :func:`parse_expression` for the grammar."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def fail(self, token: _Token, message: str) -> Exception:
        return _fail(self.text, token.pos, message)

    def missing(self, token: _Token, after: _Token | None, wanted: str) -> Exception:
        """Error for a term or operand that should start at ``token`` but does not."""
        if token.kind == "end" and after is not None:
            message = f"dangling operator {after.text!r} at the end of the expression"
            return self.fail(after, message)
        if token.kind in ("+", "-", "*", "/"):
            return self.fail(token, f"missing {wanted} before {token.text!r}")
        if token.kind == "end":
            return self.fail(token, f"missing {wanted}")
        return self.fail(token, f"expected {wanted}, got {token.text!r}")

    def signed_number(self, after: _Token) -> tuple[float, _Token]:
        """``['+'|'-'] number`` after a '*' or '/'."""
        sign = 1.0
        start = self.peek()
        if start.kind in ("+", "-"):
            sign = -1.0 if self.take().kind == "-" else 1.0
        token = self.peek()
        if token.kind == "name":
            raise self.fail(
                token,
                f"expected a number after {after.text!r}, got the task name {token.text!r}; "
                "a task can only be scaled by a number",
            )
        if token.kind != "number":
            raise self.missing(token, start if start.kind in ("+", "-") else after, "a number")
        self.take()
        return sign * token.value, start

    def term(self, after: _Token | None) -> tuple[_Token, float]:
        """``[sign] [number ['*']] name [('*' | '/') [sign] number]``.

        ``after`` is the operator before the term (None for the first one). Returns the name
        token and the term's coefficient, sign included.
        """
        start = self.peek()
        coefficient = 1.0
        if start.kind in ("+", "-"):
            coefficient = -1.0 if self.take().kind == "-" else 1.0
            after = start
        token = self.peek()
        if token.kind == "number":
            number = self.take()
            coefficient *= number.value
            after = number
            if self.peek().kind == "*":
                after = self.take()
            token = self.peek()
            if token.kind != "name":
                if token.kind == "end" and after is number:
                    raise self.fail(number, f"coefficient {number.text!r} has no task name")
                raise self.missing(token, after, "a task name")
        elif token.kind != "name":
            raise self.missing(token, after, "a term")
        name = self.take()

        if self.peek().kind in ("*", "/"):
            op = self.take()
            value, at = self.signed_number(op)
            if op.kind == "/":
                if value == 0:
                    raise self.fail(at, "division by zero")
                coefficient /= value
            else:
                coefficient *= value
        coefficient = _check_coefficient(
            self.text, start.pos, coefficient, f"coefficient of {name.text!r}"
        )
        return name, coefficient

    def expression(self) -> tuple[dict[str, float], dict[str, int]]:
        """``term (('+' | '-') term)*``.

        Returns the summed coefficient of each name and the offset of its first occurrence.
        """
        coefficients: dict[str, float] = {}
        first_pos: dict[str, int] = {}
        n_terms = 0
        op = None
        while True:
            n_terms += 1
            if n_terms > MAX_TERMS:
                raise self.fail(self.peek(), f"more than {MAX_TERMS} terms")
            name, coefficient = self.term(op)
            if op is not None and op.kind == "-":
                coefficient = -coefficient
            coefficients[name.text] = coefficients.get(name.text, 0.0) + coefficient
            first_pos.setdefault(name.text, name.pos)
            token = self.peek()
            if token.kind == "end":
                break
            if token.kind not in ("+", "-"):
                raise self.fail(token, f"missing operator '+' or '-' before {token.text!r}")
            op = self.take()
        for name, total in coefficients.items():
            _check_coefficient(self.text, first_pos[name], total, f"total coefficient of {name!r}")
        # `+ 0.0` turns -0.0 into 0.0, so "a - a" gives {"a": 0.0}.
        return {name: total + 0.0 for name, total in coefficients.items()}, first_pos


def _check_known(text: str, first_pos: dict[str, int], known: Iterable[str]) -> None:
    """Raise :class:`NotFoundError` for the first name (by position) that is not in ``known``."""
    known_set = set(known)
    for name, pos in sorted(first_pos.items(), key=lambda item: item[1]):
        if name in known_set:
            continue
        ordered = sorted(known_set)
        if not ordered:
            raise _fail(text, pos, "there are no tasks", NotFoundError, f"unknown task {name!r}")
        hints = []
        close = difflib.get_close_matches(name, ordered, n=1)
        if close:
            hints.append(f"Did you mean {close[0]!r}?")
        parts = name.split("-")
        if len(parts) > 1 and all(part in known_set for part in parts):
            hints.append(
                f"Names may contain '-'; to subtract, write {' - '.join(parts)!r} with spaces."
            )
        listing = ", ".join(ordered[:10])
        if len(ordered) > 10:
            listing += f", ... ({len(ordered) - 10} more)"
        hints.append(f"Known tasks: {listing}.")
        raise _fail(text, pos, " ".join(hints), NotFoundError, f"unknown task {name!r}")


def parse_expression(text: str, known: Iterable[str] | None = None) -> dict[str, float]:
    """Parse a task-arithmetic expression into one coefficient per task.

    Grammar (whitespace is free between tokens)::

        expression := term (('+' | '-') term)*
        term       := [sign] [number ['*']] name [('*' | '/') [sign] number]
        sign       := '+' | '-'
        number     := digits ['.' [digits]] [exponent] | '.' digits [exponent]
        exponent   := ('e' | 'E') ['+' | '-'] digits
        name       := [A-Za-z_] ([A-Za-z0-9_.-]* [A-Za-z0-9_])?

    A name may contain ``-`` and ``.`` but not end with them: ``llama-3.1-chat`` is one name, and
    so is ``math-toxic``; write ``math - toxic`` (or ``math -toxic``) to subtract. A number must be
    followed by ``*``, a space or an operator (``2math`` is refused). Terms naming the same task are
    summed; names keep the order of their first appearance. Nothing is evaluated.

    Parameters
    ----------
    text : str
        The expression, e.g. ``"0.7*math + 0.5*code - 1.0*toxic"``, at most 4096 characters and
        1024 terms.
    known : iterable of str, optional
        Task names that exist. When given, every name in ``text`` must be one of them.

    Returns
    -------
    dict of str to float
        Coefficient of each task, e.g. ``{"math": 0.7, "code": 0.5, "toxic": -1.0}``. A task whose
        terms cancel keeps a coefficient of 0.0.

    Raises
    ------
    InvalidInputError
        For an empty, too long or malformed expression, or a coefficient that is not finite or
        whose absolute value exceeds 1e6 (per number, per term and per task). The message gives
        the column and shows the expression with a caret.
    NotFoundError
        For a name not in ``known``; the message suggests the closest known name and lists up to
        10 known names.

    Examples
    --------
    >>> parse_expression("0.7*math + 0.5*code - toxic")
    {'math': 0.7, 'code': 0.5, 'toxic': -1.0}
    >>> parse_expression("-0.5 * a + a/4")
    {'a': -0.25}
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise _fail(
            text, MAX_EXPRESSION_CHARS,
            f"expression is longer than {MAX_EXPRESSION_CHARS} characters ({len(text)})",
        )
    if not text.strip():
        raise _fail(text, 0, "empty expression")
    coefficients, first_pos = _Parser(text).expression()
    if known is not None:
        _check_known(text, first_pos, known)
    return coefficients
