"""Vocabulary files: other tokenizers' read into tinygen's ranks (tiktoken's and GPT-2's),
and how tinygen's own file writes token bytes (`escape_token`).

A rank table maps each token's bytes to its id, which is also its merge
priority (tinygen.tokenizer.bpe). tiktoken stores it directly, one "base64-token rank"
line per token; GPT-2 stores vocab.json (token text -> id) and merges.txt
(one "left right" merge per line, in rank order), with the bytes written
through a byte-to-printable-character map (`gpt2_byte_chars`).
"""
import base64

from ..errors import TinygenError
from ..plumbing.fileio import parse_json


def read_tiktoken(path) -> dict:
    """{token bytes: rank} from a tiktoken rank file such as cl100k_base.tiktoken.

    A malformed line, an empty or repeated token, a repeated rank: TinygenError "FILE:LINE: why".
    """
    ranks, line_of_rank = {}, {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                token, rank = base64.b64decode(token, validate=True), int(rank)
            except ValueError:
                raise TinygenError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from None
            if not token or rank < 0:
                raise TinygenError(f"{path}:{n}: expected a non-empty token and a rank >= 0, got {line[:60]!r}")
            if token in ranks:
                raise TinygenError(f"{path}:{n}: the token of line {line_of_rank[ranks[token]]} again")
            if rank in line_of_rank:
                raise TinygenError(f"{path}:{n}: rank {rank} was given to line {line_of_rank[rank]} already")
            ranks[token], line_of_rank[rank] = rank, n
    return ranks


def read_gpt2(vocab_json, merges_txt):
    """GPT-2's vocab.json + merges.txt -> (ranks, special tokens {text: id}, merges [(left, right)]).

    Entries of vocab.json that no merge builds, like "<|endoftext|>", are the
    special tokens. Every merge must give its result the next id, 256 + n.
    A problem is a TinygenError naming the file (and for merges.txt the line).
    """
    decoder = {c: b for b, c in gpt2_byte_chars().items()}
    with open(vocab_json, "rb") as f:
        vocab = parse_json(f.read(), f"{vocab_json}: not GPT-2 vocab.json")
    if not isinstance(vocab, dict):
        raise TinygenError(f"{vocab_json}: not GPT-2 vocab.json: expected an object of token -> id, "
                           f"got {type(vocab).__name__}")
    ranks, merges = {}, []
    for c, b in decoder.items():
        i = vocab.pop(c, None)
        if not _is_id(i):
            raise TinygenError(f"{vocab_json}: not GPT-2 vocab.json: byte token {c!r} has id {i!r:.40}, "
                               "expected an integer id")
        ranks[bytes([b])] = i
    if sorted(ranks.values()) != list(range(256)):
        raise TinygenError(f"{vocab_json}: the 256 byte tokens must have ids 0..255")
    with open(merges_txt, "rb") as f:
        raw_lines = f.read().split(b"\n")
    for number, raw in enumerate(raw_lines, 1):
        where, n = f"{merges_txt}:{number}", len(merges)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TinygenError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts) or not set(line) - {" "} <= decoder.keys():
            raise TinygenError(f"{where}: expected 'left right' in GPT-2's byte characters, got {line[:60]!r}")
        left, right = parts
        a, b = bytes(map(decoder.__getitem__, left)), bytes(map(decoder.__getitem__, right))
        if vocab.pop(left + right, None) != 256 + n or a + b in ranks or a not in ranks or b not in ranks:
            raise TinygenError(f"{where}: merge {n} {line[:60]!r}: vocab.json must give {left + right!r:.60} "
                               f"the id {256 + n}, and both sides must be tokens already")
        ranks[a + b] = 256 + n
        merges.append((a, b))
    bad = next((k for k, i in vocab.items() if not _is_id(i)), None)
    if bad is not None:
        raise TinygenError(f"{vocab_json}: special token {bad!r:.60} has id {vocab[bad]!r:.40}, expected an integer")
    return ranks, vocab, merges


def _is_id(i) -> bool:
    """A token id: a non-negative int, not a bool."""
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0


def gpt2_byte_chars():
    """GPT-2's map from bytes to printable characters: 33 -> "!", 32 (space) -> "Ġ", 10 -> "Ċ".

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in order,
    to chr(256), chr(257), ... so every token is a readable, space-free string.
    """
    keep = [b for b in range(256) if chr(b).isprintable() and b != 32]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def escape_token(b):
    r"""Token bytes -> readable str for tinygen's file: UTF-8 as text, other bytes as \xNN, "\" as "\\".

    >>> print(escape_token("é".encode() + b"\xff\\"))
    é\xff\\
    """
    return "\\\\".join(part.decode("utf-8", "backslashreplace") for part in b.split(b"\\"))


_HEX = frozenset("0123456789abcdefABCDEF")


def unescape_token(s):
    r"""The inverse of `escape_token`; a ValueError names a bad escape.

    >>> unescape_token(r"é\xff\\")
    b'\xc3\xa9\xff\\'
    """
    out, i = bytearray(), 0
    while (j := s.find("\\", i)) >= 0:
        out += s[i:j].encode("utf-8")
        if s[j + 1 : j + 2] == "\\":
            out.append(92)
            i = j + 2
        elif s[j + 1 : j + 2] == "x" and len(s[j + 2 : j + 4]) == 2 and set(s[j + 2 : j + 4]) <= _HEX:
            out.append(int(s[j + 2 : j + 4], 16))
            i = j + 4
        else:
            raise ValueError(f"bad escape in token {s!r}: expected \\\\ or \\xNN")
    out += s[i:].encode("utf-8")
    if not out:
        raise ValueError("empty token in merges")
    return bytes(out)
