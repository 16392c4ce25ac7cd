"""Other tokenizers' vocabulary files, read into tinygen's ranks: tiktoken's and GPT-2's.

A rank table maps each token's bytes to its id, which is also its merge
priority (tinygen.tokenizer.bpe). tiktoken stores it directly, one "base64-token rank"
line per token; GPT-2 stores vocab.json (token text -> id) and merges.txt
(one "left right" merge per line, in rank order), with the bytes written
through a byte-to-printable-character map (`gpt2_byte_chars`).
"""
import base64
import json

from ..errors import TinygenError


def read_tiktoken(path) -> dict:
    """{token bytes: rank} from a tiktoken rank file such as cl100k_base.tiktoken."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise TinygenError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


def read_gpt2(vocab_json, merges_txt):
    """GPT-2's vocab.json + merges.txt -> (ranks, special tokens {text: id}, merges [(left, right)]).

    Entries of vocab.json that no merge builds, like "<|endoftext|>", are the
    special tokens. Every merge must give its result the next id, 256 + n.
    """
    decoder = {c: b for b, c in gpt2_byte_chars().items()}
    ranks, merges = {}, []
    try:
        with open(vocab_json, encoding="utf-8") as f:
            vocab = dict(json.load(f))
        with open(merges_txt, encoding="utf-8") as f:
            lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
        for c, b in decoder.items():
            ranks[bytes([b])] = vocab.pop(c)
        if sorted(ranks.values()) != list(range(256)):
            raise TinygenError("the 256 byte tokens must have ids 0..255")
        for n, line in enumerate(lines):
            left, right = line.split(" ")
            a, b = bytes(map(decoder.__getitem__, left)), bytes(map(decoder.__getitem__, right))
            if vocab.pop(left + right, None) != 256 + n or a + b in ranks:
                raise TinygenError(f"merge {n} {line!r}: vocab.json must give {left + right!r} the id {256 + n}")
            ranks[a + b] = 256 + n
            merges.append((a, b))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, TinygenError):
            raise TinygenError(f"{merges_txt}: {e}") from None
        raise TinygenError(f"{vocab_json}, {merges_txt}: not GPT-2 vocab.json/merges.txt files: "
                           f"{type(e).__name__} {e}") from None
    return ranks, vocab, merges


def gpt2_byte_chars():
    """GPT-2's map from bytes to printable characters: 33 -> "!", 32 (space) -> "Ġ", 10 -> "Ċ".

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in order,
    to chr(256), chr(257), ... so every token is a readable, space-free string.
    """
    keep = [b for b in range(256) if chr(b).isprintable() and b != 32]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}
