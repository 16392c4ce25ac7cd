"""`tinygen explain --model RUN_DIR --prompt TEXT [--out FILE.html]`: a page of pictures of the model at work.

One self-contained HTML file (inline SVG and CSS, nothing loaded from
anywhere): the prompt's tokens, each token's loss, the top-5 next tokens at
each position, the logit lens per layer, and every head's attention as a
heatmap. See tinygen/explain.py and docs/explain.md.
"""
from ..explain import explain


def add_parser(sub):
    p = sub.add_parser(
        "explain",
        help="an HTML page showing what a model attends to and predicts for a prompt",
        description="Write one self-contained HTML page for --prompt on the model of --model: tokens, "
        "per-token loss, top-5 next tokens, the logit lens and every head's attention heatmap. Works on "
        "pretrained and fine-tuned run directories, on a Hugging Face GPT-2 checkpoint directory and with a PEFT adapter.",
    )
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a run directory (pretrained or fine-tuned by "
                   "any method), a Hugging Face GPT-2 checkpoint, or a PEFT adapter directory")
    p.add_argument("--adapter", metavar="DIR", help="an adapter to put on --model: a tinygen LoRA/adapter/prompt "
                   "run, or a PEFT LoRA or prompt-tuning adapter directory")
    p.add_argument("--base", metavar="DIR", help="where the base of --model (a fine-tuning run or PEFT adapter) is "
                   "now, when it moved")
    p.add_argument("--prompt", required=True, help="the text to explain (<|endoftext|> is allowed)")
    p.add_argument("--out", default="explain.html", metavar="FILE.html", help="where to write the page (default: explain.html)")
    p.set_defaults(run=run)


def run(args) -> int:
    out = explain(args.model, args.prompt, args.out, adapter=args.adapter, base=args.base)
    print(f"wrote {out}: open it in a browser")
    return 0
