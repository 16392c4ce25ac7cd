"""`tinygen demo`: tokenizer, pretraining, fine-tuning, evaluation and samples in one go.

    tinygen demo                     # about 10 minutes on 2 cores, into ./tinygen-demo
    tinygen demo --out /tmp/demo
    tinygen demo --preset long       # about an hour: a larger model, longer training

Writes OUT/report.md and OUT/report.json (per task: fine-tuned from the
pretrained model, full and LoRA; the same from random initialisation; the
pretrained model few-shot; multi-task vs single-task) and the loss curves
as SVG. docs/demo.md walks through the report.
"""
from .flags import add_dataclass_arguments, dataclass_overrides
from ..demo import PRESETS, DemoConfig, run as demo
from ..errors import TinygenError


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
    p.add_argument("--tiny", action="store_true", help="a seconds-long run with tiny sizes (a smoke test); "
                   "the same as --preset tiny")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="starting sizes; a size flag overrides its value (default: the 10-minute run; tiny: "
                   "seconds; long: about an hour on 2 cores, a 6-layer model of width 192 trained 3x longer)")
    add_dataclass_arguments(p.add_argument_group("sizes (DemoConfig)"), DemoConfig)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.tiny and args.preset not in (None, "tiny"):
        raise TinygenError(f"--tiny is --preset tiny; it cannot go with --preset {args.preset}")
    preset = "tiny" if args.tiny else args.preset or "default"
    values = {**PRESETS[preset], **dataclass_overrides(args, DemoConfig)}
    report = demo(args.out, DemoConfig(**values))  # holds OUT's lock (tinygen.plumbing.lock)
    for task, row in report["tasks"].items():
        cells = ", ".join(f"{name} {s['val_loss']:.3f} / {s['accuracy']:.0%}" for name, s in row.items())
        print(f"{task}: (loss / accuracy) {cells}")
    print(f"report: {args.out}/report.md ({report['elapsed_s']:.0f} s)")
    return 0
