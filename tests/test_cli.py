"""The command line's shape: one module per command under mapprune/commands, listed once in mapprune/cli.py; the
defaults argparse knows shown by argparse; FMT's own defend flags in their own help group."""

import argparse
import re
from pathlib import Path

from mapprune import cli
from mapprune.commands import defend

COMMANDS_DIR = Path(cli.__file__).resolve().parent / "commands"
SHARED = {"__init__", "common", "lines"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_module_is_a_command_in_the_order_listed():
    modules = {p.stem for p in COMMANDS_DIR.glob("*.py")} - SHARED
    assert {c.__name__.rsplit(".", 1)[1] for c in cli.COMMANDS} == modules
    names = [c.NAME for c in cli.COMMANDS]
    assert len(set(names)) == len(names)
    assert list(_subparsers(cli.build_parser())) == names
    assert all(callable(c.run) and callable(c.add_parser) for c in cli.COMMANDS)


def test_defaults_argparse_knows_are_shown_by_argparse():
    """A help string never spells out a default argparse holds: it says %(default)s, so the two cannot drift."""
    copied = []
    for name, sub in _subparsers(cli.build_parser()).items():
        for a in sub._actions:
            shown = isinstance(a.default, (str, int, float)) and not isinstance(a.default, bool)
            if a.help and shown and a.default != argparse.SUPPRESS:
                if re.search(rf"default:? {re.escape(str(a.default))}\b", a.help):
                    copied.append(f"{name} {a.option_strings or a.dest}: {a.help!r}")
    assert not copied, "\n".join(copied)


def test_defend_groups_fmts_own_flags():
    (group,) = [g for g in _subparsers(cli.build_parser())["defend"]._action_groups if g.title == "fmt options"]
    assert {a.dest for a in group._group_actions} == set(defend.FMT_ONLY)
