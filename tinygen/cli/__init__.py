"""The command line: `main` (main.py) and one module per `tinygen` subcommand, each with
`add_parser(subparsers)` and `run(args) -> int`; flags built from config dataclasses (flags.py)."""
from .main import main

__all__ = ["main"]
