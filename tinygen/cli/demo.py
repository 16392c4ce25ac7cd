"""`tinygen demo`: tokenizer, pretraining, fine-tuning, evaluation and samples in one go.

    tinygen demo                     # about 10 minutes on 2 cores, into ./tinygen-demo
    tinygen demo --out /tmp/demo

Writes OUT/report.md and OUT/report.json (per task: fine-tuned from the
pretrained model, full and LoRA; the same from random initialisation; the
pretrained model few-shot; multi-task vs single-task) and the loss curves
as SVG. docs/demo.md walks through the report.
"""
from .flags import add_dataclass_arguments, dataclass_overrides
from ..demo import TINY, DemoConfig, run as demo
from ..plumbing.lock import run_lock

HELP = {
    "vocab_size": "size of the BPE vocabulary trained on the corpus",
    "block_size": "context length T of the model",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block (must divide --n-embd)",
    "n_embd": "width of the residual stream",
    "corpus_bytes": "cap on the standard-library sources used for pretraining, in bytes",
    "tokenizer_bytes": "bytes of the corpus the tokenizer trains on",
    "pretrain_steps": "pretraining steps",
    "pretrain_batch": "sequences per pretraining step",
    "pretrain_lr": "peak learning rate of pretraining",
    "finetune_steps": "steps of each fine-tuning run",
    "finetune_batch": "examples per fine-tuning step",
    "full_lr": "peak learning rate of full fine-tuning",
    "lora_lr": "peak learning rate of LoRA fine-tuning",
    "lora_rank": "rank r of the LoRA updates",
    "single_task": "the task of the single-task run (compared with multi-task)",
    "few_shot_k": "solved examples in front of each few-shot prompt",
    "eval_examples": "test examples per task for the loss",
    "accuracy_examples": "test examples per task decoded for the accuracy",
    "train_examples": "fine-tuning examples per task (default: all)",
    "seed": "seed of the weights, the batches and the example subsets",
}


def add_parser(sub):
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on built-in data, with a report: does pretraining help?",
        description="Train a tokenizer, pretrain a GPT-2 on standard-library sources, fine-tune it "
        "(full and LoRA) on three tasks derived from the standard library, fine-tune the same model "
        "from random initialisation, evaluate everything and the pretrained model few-shot on held-out "
        "modules, and write report.md / report.json. About 10 minutes on 2 cores.",
    )
    p.add_argument("--out", default="tinygen-demo", metavar="DIR", help="output directory (default: ./tinygen-demo)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run with tiny sizes (a smoke test)")
    add_dataclass_arguments(p.add_argument_group("sizes (DemoConfig)"), DemoConfig, HELP)
    p.set_defaults(run=run)


def run(args) -> int:
    values = {**(TINY if args.tiny else {}), **dataclass_overrides(args, DemoConfig)}
    config = DemoConfig(**values)
    with run_lock(args.out):  # one demo per output directory (tinygen.plumbing.lock)
        report = demo(args.out, config)
    for task, row in report["tasks"].items():
        cells = ", ".join(f"{name} {s['val_loss']:.3f} / {s['accuracy']:.0%}" for name, s in row.items())
        print(f"{task}: (loss / accuracy) {cells}")
    print(f"report: {args.out}/report.md ({report['elapsed_s']:.0f} s)")
    return 0
