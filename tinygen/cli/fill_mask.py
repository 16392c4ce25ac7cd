"""`tinygen fill-mask`: the most likely tokens for each <|mask|> of a text, from a masked language model.

    tinygen pretrain --objective mlm --out runs/mlm
    tinygen fill-mask --model runs/mlm --text "return <|mask|> + 1"

Prints, for each mask in order, its top candidates with their probabilities,
then the text with every mask replaced by its best candidate. Only a masked
language model (a run pretrained with --objective mlm, causal=False) fills
masks; a causal model gets one line on stderr and exit code 2, as does a text
without a mask.
"""


def add_parser(sub):
    p = sub.add_parser(
        "fill-mask",
        help="fill in the <|mask|> tokens of a text with a masked language model",
        description="Run a masked language model (tinygen pretrain --objective mlm) over --text and print "
        "the most probable tokens for each <|mask|> in it. See docs/objectives.md.",
    )
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a run directory of a masked language model")
    p.add_argument("--text", required=True, help='the text, with <|mask|> for each blank, e.g. "return <|mask|> + 1"')
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="candidates printed per mask (default: 5)")
    p.set_defaults(run=run)


def format_candidates(text, candidates) -> str:
    """The printed answer: one block per mask, then the filled-in text.

    >>> from tinygen.mlm import Candidate
    >>> print(format_candidates("f(<|mask|>)", [[Candidate("x", 120, 0.5), Candidate(" self", 301, 0.25)]]))
    mask 1:
      0.5000  'x'
      0.2500  ' self'
    filled: f(x)
    """
    from ..mlm import fill_in

    lines = []
    for k, found in enumerate(candidates, 1):
        lines.append(f"mask {k}:")
        lines += [f"  {c.probability:.4f}  {c.text!r}" for c in found]
    lines.append(f"filled: {fill_in(text, candidates)}")
    return "\n".join(lines)


def run(args) -> int:
    from ..config import POSITIVE, require
    from ..gpt import GPT
    from ..mlm import fill_mask
    from ..tokenizer.tokenizer import Tokenizer

    require("--top-k", args.top_k, POSITIVE)
    model = GPT.from_pretrained(args.model)
    candidates = fill_mask(model, Tokenizer.load_dir(args.model), args.text, args.top_k)
    print(format_candidates(args.text, candidates))
    return 0
