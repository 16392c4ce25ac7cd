"""Command-line flags built from config dataclasses: one `--flag` per field, typed as declared."""
import argparse
import dataclasses
import typing


def add_dataclass_arguments(parser, cls, help: dict = None, skip=()):
    """One `--flag` per field of dataclass `cls`, typed as declared; default None.

    `--max-steps 0` or `--dropout 0` are real values, so "not given" is None,
    which `dataclass_overrides` drops. Booleans become `--flag/--no-flag`.
    The help text is the field's own (`tinygen.config.option`); `help` overrides it by name.
    """
    help = help or {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        text = help.get(field.name) or field.metadata.get("help")
        if not text:  # a programming error: every flag explains itself
            raise ValueError(f"no --help text for {cls.__name__}.{field.name}")
        if field.default not in (dataclasses.MISSING, None):  # None: the help text says what it means
            text += f" (default: {field.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            if typing.get_origin(kind) is typing.Union:  # Optional[X]
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=text)


def dataclass_overrides(args, cls) -> dict:
    """The fields of `cls` that the user gave on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}
