"""Tests for the task-arithmetic expression parser (tvbase.arithmetic.parse_expression)."""

import math

import pytest

from tvbase.arithmetic import parse_expression
from tvbase.errors import InvalidInputError, NotFoundError

VALID = [
    ("0.7*math + 0.5*code - 1.0*toxic", {"math": 0.7, "code": 0.5, "toxic": -1.0}),
    ("math - toxic", {"math": 1.0, "toxic": -1.0}),
    ("-0.5 * a", {"a": -0.5}),
    ("2*a + b/2", {"a": 2.0, "b": 0.5}),
    ("a", {"a": 1.0}),
    ("+a", {"a": 1.0}),
    ("  a  ", {"a": 1.0}),
    ("a\t+\nb", {"a": 1.0, "b": 1.0}),
    ("1*a", {"a": 1.0}),
    ("0.5 a", {"a": 0.5}),  # a coefficient may precede its name without '*'
    (".5*a", {"a": 0.5}),
    ("1.*a", {"a": 1.0}),
    ("1e-3*a", {"a": 1e-3}),
    ("2.5E+2 * a", {"a": 250.0}),
    ("a*3", {"a": 3.0}),
    ("a * -2", {"a": -2.0}),
    ("a/4", {"a": 0.25}),
    ("3*a*2", {"a": 6.0}),
    ("a + -b", {"a": 1.0, "b": -1.0}),
    ("a - -b", {"a": 1.0, "b": 1.0}),
    ("a -b", {"a": 1.0, "b": -1.0}),  # '-' after a space is the operator
    ("a- b", {"a": 1.0, "b": -1.0}),  # a name cannot end with '-'
    ("a + a + 0.5*a", {"a": 2.5}),  # repeated names are summed
    ("a - a", {"a": 0.0}),
    ("b + a - b", {"b": 0.0, "a": 1.0}),
    ("1e6*a", {"a": 1e6}),
    ("0*a", {"a": 0.0}),
    ("_private + a_b2", {"_private": 1.0, "a_b2": 1.0}),
]


@pytest.mark.parametrize("text, expected", VALID)
def test_valid_expressions(text, expected):
    got = parse_expression(text)
    assert list(got) == list(expected)  # order of first appearance
    for name, value in expected.items():
        assert math.isclose(got[name], value, rel_tol=1e-12, abs_tol=0.0), (name, got)
        assert got[name] != 0 or math.copysign(1.0, got[name]) == 1.0  # 0.0, never -0.0


def test_names_with_dash_and_dot():
    got = parse_expression("0.5*llama-3.1-chat - mistral.v0.2 + math-toxic")
    assert got == {"llama-3.1-chat": 0.5, "mistral.v0.2": -1.0, "math-toxic": 1.0}


def test_values_are_python_floats():
    got = parse_expression("2*a - b")
    assert all(type(v) is float for v in got.values())


MALFORMED = [
    ("", "empty expression", 1),
    ("   ", "empty expression", 1),
    ("a +", "dangling operator '+'", 3),
    ("a -", "dangling operator '-'", 3),
    ("-", "dangling operator '-'", 1),
    ("0.5*", "dangling operator '*'", 4),
    ("a *", "dangling operator '*'", 3),
    ("a /", "dangling operator '/'", 3),
    ("* a", "missing a term before '*'", 1),
    ("a + * b", "missing a term before '*'", 5),
    ("a + + + b", "missing a term before '+'", 7),
    ("0.5", "coefficient '0.5' has no task name", 1),
    ("0.5 + a", "missing a task name before '+'", 5),
    ("0.5 * 3", "expected a task name, got '3'", 7),
    ("a * b", "expected a number after '*', got the task name 'b'", 5),
    ("a b", "missing operator '+' or '-' before 'b'", 3),
    ("a 2", "missing operator '+' or '-' before '2'", 3),
    ("2math", "unexpected character 'm' after the number '2'", 2),
    ("1e*a", "unexpected character 'e' after the number '1'", 2),
    ("1.2.3*a", "unexpected character '.' after the number '1.2'", 4),
    ("1_000*a", "unexpected character '_' after the number '1'", 2),
    ("a & b", "unexpected character '&'", 3),
    ("a.", "unexpected character '.'", 2),
    ("(a)", "unexpected character '('", 1),
    ("a \u2212 b", "use the ASCII '-'", 3),
    ("a ** 2", "missing a number before '*'", 4),
    ("a / 0", "division by zero", 5),
    ("a / 0.0e5", "division by zero", 5),
    ("1e400*a", "coefficient '1e400' is not finite", 1),
    ("1e7*a", "coefficient '1e7' is out of range", 1),
    ("a * 1e7", "coefficient '1e7' is out of range", 5),
    ("1e6*a*10", "coefficient of 'a' is out of range", 1),
    ("a / 1e-300", "coefficient of 'a' is out of range", 1),
    ("1e6*a + 1e6*a", "total coefficient of 'a' is out of range", 5),
    ("a" + "+a" * 1024, "more than 1024 terms", 2049),
    ("a" * 4097, "longer than 4096 characters", 4097),
]


@pytest.mark.parametrize("text, phrase, column", MALFORMED)
def test_malformed_expressions(text, phrase, column):
    with pytest.raises(InvalidInputError) as info:
        parse_expression(text)
    message = str(info.value)
    assert phrase in message
    assert f"at column {column}:" in message
    # The last two lines show (a window of) the expression and a caret under the column.
    shown, caret = message.splitlines()[-2:]
    assert caret.strip() == "^"
    if len(text) <= 72:
        assert shown == "    " + text.replace("\t", " ").replace("\n", " ")
        assert caret.index("^") == 4 + column - 1


def test_caret_window_on_long_expression():
    text = " + ".join(f"task{i}" for i in range(200)) + " + (x)"
    with pytest.raises(InvalidInputError) as info:
        parse_expression(text)
    shown, caret = str(info.value).splitlines()[-2:]
    assert shown.startswith("    ...") and len(shown) < 100
    assert shown[caret.index("^")] == "("


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "exec('1')",
        "a; import os",
        "a if b else c",  # parses as names, then fails on the missing operator
        "[a for a in b]",
        "lambda: 0",
        "a.__class__",  # a valid (odd) name; it is only ever a key, never looked up
    ],
)
def test_nothing_is_evaluated(text, monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("user text reached eval/exec/__import__")

    # Patched after the module was imported, so any import/eval the parser did would trip it.
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    if text == "a.__class__":
        assert parse_expression(text) == {"a.__class__": 1.0}
        return
    with pytest.raises(InvalidInputError):
        parse_expression(text)


def test_rejects_non_string():
    with pytest.raises(InvalidInputError, match="must be a string, got int"):
        parse_expression(3)


KNOWN = ["code", "math", "toxic"]


def test_known_names_accepted():
    assert parse_expression("math - toxic", known=iter(KNOWN)) == {"math": 1.0, "toxic": -1.0}


def test_unknown_name_suggests_closest_and_lists_known():
    with pytest.raises(NotFoundError) as info:
        parse_expression("0.5*mth + code", known=KNOWN)
    message = str(info.value)
    assert isinstance(info.value, KeyError)
    assert message.startswith("unknown task 'mth' at column 5:")
    assert "Did you mean 'math'?" in message
    assert "Known tasks: code, math, toxic." in message
    assert message.splitlines()[-1] == "        ^"


def test_unknown_name_lists_at_most_ten_sorted():
    known = [f"task{i:02d}" for i in range(15, 0, -1)]
    with pytest.raises(NotFoundError) as info:
        parse_expression("zzz", known=known)
    message = str(info.value)
    assert "Known tasks: task01, task02, task03, task04, task05, task06, task07, task08, " \
        "task09, task10, ... (5 more)." in message
    assert "Did you mean" not in message  # nothing close to 'zzz'


def test_unknown_dashed_name_hints_at_subtraction():
    with pytest.raises(NotFoundError, match="write 'code - toxic' with spaces"):
        parse_expression("math + code-toxic", known=KNOWN)


def test_unknown_name_with_no_tasks():
    with pytest.raises(NotFoundError, match="there are no tasks"):
        parse_expression("math", known=[])


def test_syntax_errors_win_over_unknown_names():
    with pytest.raises(InvalidInputError):
        parse_expression("nope +", known=KNOWN)
