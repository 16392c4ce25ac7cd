"""`tinygen tokenizer train|encode`: learn a byte-level BPE vocabulary, or look at one.

    tinygen tokenizer train --input a.txt b.txt --vocab-size 4096 --out tok.json
    echo "Hello world" | tinygen tokenizer encode --tokenizer tok.json --show

Each input file is one document, so no token spans two files. `encode` prints
the ids on one line; `--show` prints one token per line (id, then the token's
text in Python quotes), which is the quickest way to see what BPE learned.
"""
import os
import sys
import time

from ..errors import TinygenError
from ..plumbing.progress import Progress
from ..tokenizer.tokenizer import ENDOFTEXT, Tokenizer


def add_parser(subparsers):
    parser = subparsers.add_parser("tokenizer", help="train a BPE tokenizer, or encode text with one",
                                   description=__doc__.split("\n")[0])
    actions = parser.add_subparsers(dest="action", metavar="ACTION", help="train: learn a tokenizer; encode: text -> ids")
    actions.required = True

    train_p = actions.add_parser("train", help="learn merges from text files, write tok.json")
    train_p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    train_p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                         help="number of token ids, special tokens included (>= 256 + specials)")
    train_p.add_argument("--out", required=True, metavar="PATH", help="where to write the tokenizer JSON")
    train_p.add_argument("--pattern", default="gpt4", help="split pattern: gpt2, gpt4 or a regex (default: gpt4)")
    train_p.add_argument("--special", nargs="*", default=[ENDOFTEXT], metavar="TOKEN",
                         help=f"special tokens, given ids after the merges (default: {ENDOFTEXT})")

    encode_p = actions.add_parser("encode", help="print the token ids of a text")
    encode_p.add_argument("--tokenizer", required=True, metavar="PATH",
                          help="a tinygen tokenizer JSON, or a directory with one (or GPT-2's vocab.json + merges.txt)")
    encode_p.add_argument("--input", metavar="FILE", help="text file to encode (default: stdin)")
    encode_p.add_argument("--show", action="store_true", help="one token per line: id and its text")
    encode_p.add_argument("--allow-special", action="store_true",
                          help="encode special-token text such as <|endoftext|> as the special id")
    parser.set_defaults(run=run)


def run(args) -> int:
    return {"train": train, "encode": encode}[args.action](args)


def train(args, stream=None) -> int:
    docs = [_read(path) for path in args.input]
    n_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
    specials = list(dict.fromkeys(args.special))
    progress = Progress(total=max(args.vocab_size - 256 - len(specials), 0), desc="merges", unit="merge",
                        stream=stream)
    progress.write(f"training on {len(docs)} file(s), {n_bytes / 1e6:.2f} MB, to vocab_size {args.vocab_size}")
    t0 = time.perf_counter()
    tok = Tokenizer.train(docs, args.vocab_size, pattern=args.pattern, special_tokens=specials, progress=progress)
    progress.close()
    tok.save(args.out)
    progress.write(f"wrote {args.out}: {tok.vocab_size} ids ({len(tok.merges)} merges, "
                   f"{len(tok.special_tokens)} special) in {time.perf_counter() - t0:.1f}s")
    return 0


def encode(args, out=None) -> int:
    out = out or sys.stdout
    tok = Tokenizer.load_dir(args.tokenizer) if os.path.isdir(args.tokenizer) else Tokenizer.load(args.tokenizer)
    text = _read(args.input) if args.input else sys.stdin.read()
    ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset())
    if args.show:
        for i in ids:
            out.write(f"{i:>7}  {_show(tok.id_to_bytes(i))}\n")
    else:
        out.write(" ".join(map(str, ids)) + "\n")
    n_bytes = len(tok.decode_bytes(ids))
    print(f"{len(ids)} tokens, {n_bytes} bytes, {n_bytes / max(len(ids), 1):.2f} bytes/token", file=sys.stderr)
    return 0


def _show(piece):
    """A token as a Python literal: text if it is valid UTF-8 (' world'), else bytes (b'\\xc3')."""
    try:
        return repr(piece.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(piece)


def _read(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:  # keep "\r\n": it is text to tokenize
            return f.read()
    except UnicodeDecodeError as e:
        raise TinygenError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
