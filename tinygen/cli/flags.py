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


def add_model_arguments(parser) -> None:
    """--model, --adapter, --base: what tinygen.runs loads, for every command that reads a model."""
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="a run directory (model and tokenizer): a "
                        "checkpoint, a fine-tuning run of any method, or a PEFT adapter directory")
    parser.add_argument("--adapter", metavar="DIR", help="an adapter to put on --model: a tinygen LoRA/adapter/prompt "
                        "run, or a PEFT LoRA or prompt-tuning adapter directory")
    parser.add_argument("--base", metavar="DIR", help="where the base of --model (a fine-tuning run or PEFT adapter) "
                        "is now, when it moved (a run checks its base's checksum)")
