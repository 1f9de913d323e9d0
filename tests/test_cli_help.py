"""Every positional and option of the command line says what it is, and its default."""

import argparse

import pytest

from tvbase.cli import build_parser

# changed elsewhere at the moment (their parser entries are another change's)
NOT_CHECKED = {"apply", "compose"}


def _subcommands(parser, prefix=()):
    """(command path, parser) of every subcommand, nested ones (``bench memory-accuracy``) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name in NOT_CHECKED:
                    continue
                sub.format_help()  # a lazy subcommand (a benchmark) adds its options only then
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


COMMANDS = dict(_subcommands(build_parser()))


def test_the_walk_sees_every_command():
    assert {"init", "ingest", "get", "ls", "info", "log", "rm", "compact", "verify", "gc", "demo", "bench",
            ("bench", "memory-accuracy")} <= {path[0] if len(path) == 1 else path for path in COMMANDS}  # fmt: skip
    assert not NOT_CHECKED & {path[0] for path in COMMANDS}


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_argument_has_help(path):
    missing = [
        action.dest for action in COMMANDS[path]._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]  # fmt: skip
    assert not missing, f"`tvbase {' '.join(path)}`: no help for {missing}"


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_default_is_stated(path):
    # an option that has a value when left out says which (store_true flags are off when left out)
    unstated = [
        action.dest for action in COMMANDS[path]._actions
        if action.default not in (None, False, argparse.SUPPRESS) and not action.required
        and "default" not in (action.help or "")
    ]  # fmt: skip
    assert not unstated, f"`tvbase {' '.join(path)}`: the default of {unstated} is not in its help"


def test_help_prints_for_every_command(capsys):
    for path, parser in COMMANDS.items():
        text = parser.format_help()
        assert "usage: tvbase" in text and " ".join(path) in text, path
