"""One module per `tinygen` subcommand, each with `add_parser(subparsers)` and `run(args)`."""
from . import gradcheck

COMMANDS = [gradcheck]
