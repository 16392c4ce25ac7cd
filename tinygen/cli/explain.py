"""`tinygen explain --model RUN_DIR --prompt TEXT [--out FILE.html]`: a page of pictures of the model at work.

One self-contained HTML file (inline SVG and CSS, nothing loaded from
anywhere): the prompt's tokens, each token's loss, the top-5 next tokens at
each position, the logit lens per layer, and every head's attention as a
heatmap. See tinygen/explain.py and docs/explain.md.
"""
from ..explain import explain
from .flags import add_model_arguments


def add_parser(sub):
    p = sub.add_parser(
        "explain",
        help="an HTML page showing what a model attends to and predicts for a prompt",
        description="Write one self-contained HTML page for --prompt on the model of --model: tokens, "
        "per-token loss, top-5 next tokens, the logit lens and every head's attention heatmap. Works on "
        "pretrained and fine-tuned run directories, on a Hugging Face GPT-2 checkpoint directory and with a PEFT adapter.",
    )
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the text to explain (<|endoftext|> is allowed)")
    p.add_argument("--out", default="explain.html", metavar="FILE.html", help="where to write the page (default: explain.html)")
    p.set_defaults(run=run)


def run(args) -> int:
    out = explain(args.model, args.prompt, args.out, adapter=args.adapter, base=args.base)
    print(f"wrote {out}: open it in a browser")
    return 0
