"""Exercise 12: BPE encoding of one chunk, as tiktoken does it.

`ranks` maps the bytes of every token to its id, and a token's id is its merge
rank: lower ids were learned first. Encoding one chunk:
1. start from its single bytes;
2. among the adjacent pairs whose concatenation is a token, merge the one with
   the lowest rank (the leftmost if it occurs more than once);
3. repeat until no adjacent pair is a token; return the ids.

    encode_chunk(b"aaab", {b"a": 0, b"b": 1, b"aa": 2, b"ab": 3, b"aab": 4})  ->  [2, 3]

Read first: docs/tokenizer.md. Check: tinygen exercises check DIR bpe_encode
"""


def encode_chunk(piece, ranks):
    """piece bytes, ranks {bytes: id} (every single byte included) -> list of ids."""
    raise NotImplementedError
