"""The `tinygen` command: one subcommand per module of `tinygen.cli`.

Each command module has `add_parser(subparsers)`, which registers its flags
and `set_defaults(run=run)`; `run(args) -> int` is an importable function.
Bad input (`TinygenError`, a missing file) becomes one line on stderr and
exit code 2, never a traceback. `main` is the program: it treats the process
as its own and raises malloc's thresholds for it (reuse_freed_memory), which
the library leaves to its caller.
"""
import argparse
import sys

from .. import __version__
from ..errors import TinygenError
from ..plumbing.memory import reuse_freed_memory
from . import demo, finetune, fixtures, gradcheck, pretrain, sample, tokenizer

# in the order of the story: tokenize, pretrain, fine-tune, sample, check gradients, golden files, and the demo
COMMANDS = [demo, tokenizer, pretrain, finetune, sample, gradcheck, fixtures]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinygen",
        description="A NumPy-only GPT-2: tokenize, pretrain, fine-tune, sample, check gradients, write golden fixtures.",
    )
    parser.add_argument("--version", action="version", version=f"tinygen {__version__}",
                        help="print tinygen's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reuse_freed_memory()  # the command owns its process, so it opts in (the library never does): plumbing/memory.py
    try:
        return int(args.run(args) or 0)
    except (TinygenError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"tinygen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinygen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
