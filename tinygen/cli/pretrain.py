"""`tinygen pretrain`: flags -> tinygen.pretrain's pipeline -> a run directory, a report and samples.

    tinygen pretrain                              # the `small` preset on the built-in corpus
    tinygen pretrain --preset tiny --out runs/t   # seconds
    tinygen pretrain --data notes/ --max-steps 2000 --out runs/notes
    tinygen pretrain --resume runs/notes --max-steps 4000

This module only turns flags into settings (`resolve`) and prints; the
pipeline itself (settings, tokenizer, token cache, training, samples) is
tinygen.pretrain, which the demo calls too.
"""
import dataclasses
import sys

from .flags import add_dataclass_arguments, dataclass_overrides
from ..checkpoint import checkpoint_step
from ..data import DataConfig
from ..errors import TinygenError
from ..plumbing.progress import format_duration
from ..plumbing.rundir import TRAIN_CONFIG
from ..pretrain import (PRESETS, RESUMABLE, RunSettings, bits_per_byte, default_prompts, new_settings, pretrain,
                        resume_settings, samples)
from ..train import TrainConfig, TrainingDiverged


def add_parser(sub):
    p = sub.add_parser(
        "pretrain",
        help="train a GPT-2 from scratch on the built-in corpus or your text",
        description="Train a byte-level BPE tokenizer and a GPT-2 from scratch. With no arguments: the "
        "`small` preset (about 4 minutes on 2 cores) on the built-in corpus (Python's language reference "
        "and standard-library sources). Writes a run directory that transformers can load and that "
        "--resume continues bit for bit. Ctrl-C saves a checkpoint and exits.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="starting values for every knob below; a flag overrides its value (default: small; "
                   + "; ".join(f"{k}: {_preset_summary(k)}" for k in sorted(PRESETS)) + ")")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="UTF-8 text files or folders to train on (default: the built-in corpus)")
    p.add_argument("--encoding-errors", choices=["strict", "replace"], default=None,
                   help="on bytes that are not UTF-8: stop with an error naming the file and offset "
                   "(strict), or substitute U+FFFD (replace) (default: strict)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory to create (default: runs/pretrain-PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint, to --max-steps")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that already holds a run (its tokenizer and token cache "
                   "are reused when they match)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="use this tokenizer (a tokenizer.json or a directory holding one) instead of training one")
    p.add_argument("--samples", type=int, default=3, metavar="N",
                   help="greedy samples printed at the end (default: 3)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt for the samples at the end; repeat for several (default: 'def', "
                   "'    def __init__(self', 'The' on the built-in corpus, the first words of "
                   "validation documents on --data)")
    p.add_argument("--sample-tokens", type=int, default=48, metavar="N",
                   help="tokens per sample (default: 48)")
    add_dataclass_arguments(p.add_argument_group("model and training (TrainConfig)"), TrainConfig)
    add_dataclass_arguments(p.add_argument_group("data (DataConfig)"), DataConfig)
    p.set_defaults(run=run)


def _preset_summary(name):
    values = {**dataclasses.asdict(TrainConfig()), **dataclasses.asdict(DataConfig()), **PRESETS[name]}
    keys = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "vocab_size", "max_steps")
    return ", ".join(f"{k}={values[k]}" for k in keys)


def resolve(args) -> RunSettings:
    """Flags -> the run's settings (what train_config.json holds)."""
    overrides = {**dataclass_overrides(args, TrainConfig), **dataclass_overrides(args, DataConfig)}
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in overrides if k not in RESUMABLE]
        given += [f for f, v in (("--preset", args.preset), ("--data", args.data), ("--out", args.out),
                                 ("--encoding-errors", args.encoding_errors), ("--tokenizer", args.tokenizer),
                                 ("--overwrite", args.overwrite)) if v]
        if given:
            raise TinygenError(f"--resume continues the run as recorded in its {TRAIN_CONFIG}; only "
                               f"--max-steps and --workers can change (got {', '.join(given)})")
        return resume_settings(args.resume, **overrides)
    return new_settings(args.out, preset=args.preset or "small", overrides=overrides, sources=args.data,
                        encoding_errors=args.encoding_errors or "strict", tokenizer=args.tokenizer)


def run(args) -> int:
    settings = resolve(args)
    resume = bool(args.resume)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    done = checkpoint_step(settings.run_dir) if resume else None
    if done is not None and done >= settings.train.max_steps:
        say(f"{settings.run_dir} is already at step {done} (--max-steps {settings.train.max_steps}): nothing to "
            f"do; pass a larger --max-steps to train further")
        return 0
    try:
        out = pretrain(settings, resume=resume, overwrite=args.overwrite, say=say)
    except TrainingDiverged as e:
        print(f"tinygen pretrain: error: {e}", file=sys.stderr)
        return 1
    result = out.result
    if result.interrupted:
        say(f"stopped at step {result.step}; continue with: tinygen pretrain --resume {settings.run_dir}")
        return 130
    print(f"run directory: {settings.run_dir}")
    if result.val_loss is not None:
        print(f"step {result.step}: val loss {result.val_loss:.4f} nats/token = "
              f"{bits_per_byte(result.val_loss, out.tokens.info):.3f} bits/byte "
              f"(training time {format_duration(result.elapsed_s)})")
    if args.samples > 0 and args.sample_tokens > 0:
        print("greedy samples:")
        prompts = args.prompt or default_prompts(settings, args.samples)
        for prompt, text in samples(out.model, out.tokenizer, prompts[:args.samples], args.sample_tokens):
            print(f"--- {prompt!r}\n{prompt}{text}")
    return 0
