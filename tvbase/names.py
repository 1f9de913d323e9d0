"""Task names: what a name may be, and how an unknown one is reported."""

import difflib
import re

from .errors import InvalidInputError

_NAME_RE = re.compile(r"[A-Za-z_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")  # the expression parser's name token
_MAX_NAME = 128


def validate_task_name(name):
    """Raise InvalidInputError unless ``name`` is a safe task name.

    Task names end up in metadata, file names and expressions, so they may not escape a
    directory or confuse a parser: letters, digits, ``_``, ``-``, ``.``; no ``..``.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInputError("task name is empty; use letters, digits, '_', '-' or '.'")
    if len(name) > _MAX_NAME:
        raise InvalidInputError(f"task name {name[:20]!r}... is {len(name)} characters long; the limit is {_MAX_NAME}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"task name {name!r} is not allowed: use letters, digits, '_', '-' and '.', starting with a letter "
            "or '_', ending with a letter, digit or '_', and no '..' (so names can neither escape the store "
            "nor be misread in an expression)"
        )
    return name


def unknown_name(kind, name, known):
    """The message for a ``kind`` called ``name`` that is not among ``known``: the closest match
    and (up to ten of) the known names."""
    hint = difflib.get_close_matches(name, known, n=1)
    listing = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "") if known else "(none)"
    return f"no {kind} {name!r} in this store" + (f"; did you mean {hint[0]!r}?" if hint else "") + f". Known: {listing}"
