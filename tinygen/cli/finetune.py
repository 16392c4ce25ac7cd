"""`tinygen finetune`: adapt a pretrained run to prompt/completion tasks.

    tinygen finetune --base runs/pretrain-small --data builtin --method lora --out runs/lora
    tinygen finetune --base runs/pretrain-small --data mine.jsonl --method full --freeze-layers 2 --out runs/ft
    tinygen finetune --resume runs/lora --max-steps 600

The base run directory is only read. Progress, metrics.jsonl, loss.svg,
checkpoints and --resume behave as in `tinygen pretrain`; at the end every
task is evaluated on the test split (loss, exact-match accuracy and the
task's own metric of greedy completions, with bootstrap intervals), printed
and written to OUT/eval.json.
"""
import dataclasses
import os
import sys

from .flags import add_dataclass_arguments, dataclass_overrides
from ..errors import TinygenError
from ..finetuning.finetune import FINETUNE_FILE, FinetuneConfig, read_run_file, recorded_data, run as finetune
from ..runs import run_base


def add_parser(sub):
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained run on prompt/completion data (full, LoRA, adapters, prompt tuning)",
        description="Fine-tune the model of --base on JSONL prompt/completion data or the built-in "
        "standard-library tasks. The loss counts completion tokens only. The base is never modified: "
        "full fine-tuning writes a whole model to --out, the other methods only their own small "
        "adapter.safetensors, which loads on top of its base (`tinygen sample --model OUT`).",
    )
    p.add_argument("--base", metavar="RUN_DIR", help="the pretrained run directory (model and tokenizer); with "
                   "--resume: where the run's base is now, if it moved")
    p.add_argument("--data", metavar="FILE.jsonl|builtin",
                   help='JSONL lines {"prompt", "completion", "task"?}, or "builtin" for the standard-library tasks')
    p.add_argument("--out", metavar="RUN_DIR2", help="run directory to write")
    p.add_argument("--resume", metavar="RUN_DIR2", help="continue this fine-tuning run from its last checkpoint")
    add_dataclass_arguments(p.add_argument_group("fine-tuning (FinetuneConfig)"), FinetuneConfig)
    p.set_defaults(run=run)


def resolve(args):
    """Flags -> (base_dir, data, out_dir, FinetuneConfig, resume)."""
    over = dataclass_overrides(args, FinetuneConfig)
    if args.resume:
        path = os.path.join(args.resume, FINETUNE_FILE)
        if not os.path.isfile(path):
            raise TinygenError(f"--resume {args.resume}: no {FINETUNE_FILE}, so not a fine-tuning run directory")
        info, fc = read_run_file(args.resume)
        extra = sorted(set(over) - {"max_steps", "workers"})
        if extra or args.data or args.out:
            raise TinygenError(f"--resume continues the run as recorded in its {FINETUNE_FILE}; "
                               f"only --max-steps and --workers can change (and --base says where its base is now)")
        return (run_base(args.resume, args.base), recorded_data(args.resume, info), args.resume,
                dataclasses.replace(fc, **over), True)
    missing = [f for f, v in (("--base", args.base), ("--data", args.data), ("--out", args.out)) if not v]
    if missing:
        raise TinygenError(f"missing {', '.join(missing)} (or --resume RUN_DIR2)")
    if args.data != "builtin" and not os.path.isfile(args.data):
        raise TinygenError(f"--data {args.data}: no such file (give a JSONL file or 'builtin')")
    return args.base, args.data, args.out, FinetuneConfig(**over), False


def format_eval(scores: dict) -> str:
    """The per-task table printed at the end: loss, exact match, and the task's metrics with their
    bootstrap 95% intervals.

    >>> print(format_eval({"name": {"examples": 9, "val_loss": 3.2, "accuracy": 0.1,
    ...                             "scores": {"subtoken_f1": [0.25, 0.1, 0.4]}}}))
    task             examples     loss  accuracy  metrics (95% interval)
    name                    9   3.2000     10.0%  subtoken_f1 0.250 [0.10, 0.40]
    """
    lines = [f"{'task':<16} {'examples':>8} {'loss':>8} {'accuracy':>9}  metrics (95% interval)"]
    for task, s in scores.items():
        metrics = ", ".join(f"{name} {v:.3f} [{low:.2f}, {high:.2f}]" for name, (v, low, high) in
                            s.get("scores", {}).items() if name not in ("val_loss", "exact_match"))
        lines.append(f"{task:<16} {s['examples']:>8} {s['val_loss']:>8.4f} {s['accuracy']:>9.1%}  {metrics}".rstrip())
    return "\n".join(lines)


def run(args) -> int:
    base_dir, data, out_dir, fc, resume = resolve(args)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    result = finetune(base_dir, data, out_dir, fc, resume=resume, log=say)  # holds out_dir's lock
    if result["train"]["interrupted"]:
        say(f"stopped; continue with: tinygen finetune --resume {out_dir}")
        return 130
    print(f"run directory: {out_dir}  (sample with: tinygen sample --model {out_dir} --prompt ...)")
    print("test split:")
    print(format_eval(result["eval"]))
    return 0
