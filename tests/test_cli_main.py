"""The command line as a whole: every flag of every command explains itself in --help."""
import argparse

import pytest

from tinygen.cli.main import build_parser


def subcommands():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def parsers(parser, path):
    """(path, parser) for this parser and every nested sub-command."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, f"{path} {name}")


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_flag_has_help_text(name):
    for path, command in parsers(subcommands()[name], f"tinygen {name}"):
        assert command.description or path != f"tinygen {name}", path
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = (action.help or "").strip()
            assert text and not text.startswith("(default"), f"{path} {action.option_strings or action.dest}"
