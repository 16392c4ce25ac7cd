"""The `tinygen` command: one subcommand per module of `tinygen.cli`.

Each command module has `add_parser(subparsers)`, which registers its flags
and `set_defaults(run=run)`; `run(args) -> int` is an importable function.
Whatever goes wrong ends in one line on stderr, "tinygen COMMAND: error: ...",
and an exit code that says what kind of failure it was (tinygen.errors,
docs/failures.md): 1 the training diverged, 2 bad input, 74 a write failed,
75 the run directory is in use, 130 Ctrl-C, 70 anything else (a bug: the
line names the exception and where it was raised; TINYGEN_TRACEBACK=1
shows the whole traceback instead). `main` raises malloc's thresholds at
its start, as the library does at its first computation
(reuse_freed_memory_by_default; TINYGEN_MALLOC=default opts out).
"""
import argparse
import os
import sys
import traceback

from .. import __version__
from ..errors import (EXIT_BAD_INPUT, EXIT_BUSY, EXIT_DIVERGED, EXIT_INTERNAL, EXIT_INTERRUPTED,
                      EXIT_WRITE_FAILED, RunDirBusy, TinygenError, WriteError)
from ..plumbing.memory import reuse_freed_memory_by_default
from ..train import TrainingDiverged
from . import demo, exercises, explain, fill_mask, finetune, fixtures, gradcheck, pretrain, sample, tokenizer

# in the order of the story: tokenize, pretrain, fine-tune, sample, fill masks, check gradients, golden files,
# learn, look
COMMANDS = [demo, tokenizer, pretrain, finetune, sample, fill_mask, gradcheck, fixtures, exercises, explain]


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
    reuse_freed_memory_by_default()  # before any work, as the library would at its first computation
    fail = lambda message, code: _fail(args.command, message, code)  # noqa: E731
    try:
        return int(args.run(args) or 0)
    except TrainingDiverged as e:
        return fail(e, EXIT_DIVERGED)
    except RunDirBusy as e:
        return fail(e, EXIT_BUSY)
    except WriteError as e:
        return fail(e, EXIT_WRITE_FAILED)
    except (TinygenError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        return fail(e, EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"tinygen {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # reading failed in another way (a name too long, an I/O error of the disk)
        return fail(f"{e.strerror or e}: {e.filename}" if e.filename else e, EXIT_BAD_INPUT)
    except MemoryError as e:
        return fail(f"out of memory ({str(e)[:200] or 'MemoryError'}); try smaller sizes", EXIT_INTERNAL)
    except Exception as e:  # the last resort: a bug, told in one line that says where
        if os.environ.get("TINYGEN_TRACEBACK"):
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        return fail(f"internal error: {type(e).__name__}: {str(e)[:300]} (at {os.path.basename(where.filename)}:"
                    f"{where.lineno} in {where.name}); please report it, with TINYGEN_TRACEBACK=1 for the "
                    "traceback", EXIT_INTERNAL)


def _fail(command, message, code) -> int:
    """Print one line "tinygen COMMAND: error: MESSAGE" (newlines folded) and return `code`."""
    text = " ".join(str(message).split("\n"))
    print(f"tinygen {command}: error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
