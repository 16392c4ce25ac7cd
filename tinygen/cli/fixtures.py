"""`tinygen fixtures`: golden files for testing another implementation of GPT-2 against tinygen.

    tinygen fixtures --out fixtures --seed 0 --dtype float64

Writes every layer pair's inputs, outputs and gradients, a block, the whole
model, the sampler's processors and the tokenizer as safetensors and JSON
files with a manifest.json (tinygen.fixtures); docs/fixtures.md has a
40-line NumPy checker to port to your language.
"""
from ..fixtures import write_fixtures


def add_parser(sub):
    p = sub.add_parser(
        "fixtures",
        help="write golden inputs, outputs and gradients for testing another implementation",
        description="Write, for every layer pair (linear, embedding, layer norm, GELU, dropout, causal attention, "
        "cross-entropy, LoRA, adapter, prompt tuning), a transformer block and a whole small model: inputs, "
        "parameters, outputs and every gradient as safetensors files; the sampler's logit processors; and a "
        "tokenizer's chunks and ids for tricky strings; with a manifest.json describing each file, its tolerance "
        "and the doc that derives it (docs/fixtures.md).",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if needed)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random input (default: 0)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="floating-point type of the layer, block and model files (default: float64)")
    p.set_defaults(run=run)


def run(args) -> int:
    manifest = write_fixtures(args.out, seed=args.seed, dtype=args.dtype)
    print(f"wrote {len(manifest['cases'])} cases ({args.dtype}, seed {args.seed}) to {args.out}; "
          f"see {args.out}/manifest.json and docs/fixtures.md")
    return 0
