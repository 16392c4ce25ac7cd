"""tiktoken's names and batch forms, written over the `Tokenizer`'s own methods.

Code written for tiktoken's `Encoding` runs on a tinygen `Tokenizer`: the
batch methods (`encode_batch`, `decode_batch`, ... with `num_threads`),
`encode_to_numpy`, `decode_with_offsets`, `decode_tokens_bytes`, and
tiktoken's names for what tinygen calls `vocab_size`, `eot_id`,
`special_tokens` and `id_to_bytes`. Each method has tiktoken's semantics;
docs/tokenizer.md lists them beside tiktoken's and the few deliberate
differences.

`TiktokenMethods` is a mixin: it needs `encode`, `encode_ordinary`, `decode`,
`decode_bytes`, `id_to_bytes`, `vocab_size`, `eot_id` and `special_tokens`
from the class it is mixed into, and keeps no state of its own.
"""
import functools
import numbers
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import TinygenError


class TokenNotFound(TinygenError, KeyError):
    """A token id or token bytes that the vocabulary does not have.

    Both a KeyError, as tiktoken raises for these, and a TinygenError (a
    ValueError), as tinygen raises for bad input, so either `except` works.
    """

    __str__ = TinygenError.__str__  # the message as written, not KeyError's repr of it


class TiktokenMethods:
    """tiktoken `Encoding`'s methods and names, for a class with tinygen's core methods."""

    # ---- encoding --------------------------------------------------------------------
    def encode_to_numpy(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """`encode` as a (T,) uint32 array, the dtype tiktoken returns (writable here)."""
        return np.array(self.encode(text, allowed_special, disallowed_special), dtype=np.uint32)

    def encode_ordinary_batch(self, texts, *, num_threads=8):
        """`encode_ordinary` of each text, on `num_threads` threads: a list of lists of ids."""
        return thread_map(self.encode_ordinary, texts, num_threads)

    def encode_batch(self, texts, allowed_special=frozenset(), disallowed_special="all", *, num_threads=8):
        """`encode` of each text, on `num_threads` threads: a list of lists of ids.

        A disallowed special token in any text raises, as `encode` does.
        """
        encode = functools.partial(self.encode, allowed_special=allowed_special,
                                   disallowed_special=disallowed_special)
        return thread_map(encode, texts, num_threads)

    # ---- decoding --------------------------------------------------------------------
    def decode_single_token_bytes(self, token):
        """tiktoken's name for `id_to_bytes`: one token's bytes, special tokens included."""
        return self.id_to_bytes(token)

    def decode_tokens_bytes(self, tokens):
        """Each token's bytes: [31373, 995] -> [b"hello", b" world"] (GPT-2's ids)."""
        return list(map(self.id_to_bytes, tokens.tolist() if isinstance(tokens, np.ndarray) else tokens))

    def decode_with_offsets(self, tokens):
        """(text, offsets): offsets[k] is where token k starts in text, in characters.

        tiktoken's rule: a token that starts inside a character (its first byte
        is a UTF-8 continuation byte, 0x80..0xBF) gets the index of that
        character. As tiktoken does, raises UnicodeDecodeError when the tokens'
        bytes are not valid UTF-8.

        >>> from tinygen.tokenizer import Tokenizer
        >>> Tokenizer({bytes([b]): b for b in range(256)}, "gpt2").decode_with_offsets([104, 195, 169, 33])
        ('hé!', [0, 1, 1, 2])
        """
        token_bytes = self.decode_tokens_bytes(tokens)
        offsets, n_chars = [], 0
        for b in token_bytes:
            offsets.append(max(0, n_chars - (0x80 <= b[0] < 0xC0)))
            n_chars += sum(1 for c in b if not 0x80 <= c < 0xC0)  # the bytes that start a character
        return b"".join(token_bytes).decode("utf-8", errors="strict"), offsets

    def decode_batch(self, batch, *, errors="replace", num_threads=8):
        """`decode` of each list of ids, on `num_threads` threads: a list of str."""
        return thread_map(functools.partial(self.decode, errors=errors), batch, num_threads)

    def decode_bytes_batch(self, batch, *, num_threads=8):
        """`decode_bytes` of each list of ids, on `num_threads` threads: a list of bytes."""
        return thread_map(self.decode_bytes, batch, num_threads)

    # ---- tiktoken's names ------------------------------------------------------------
    @property
    def n_vocab(self):
        """tiktoken's name for `vocab_size`: the largest id + 1."""
        return self.vocab_size

    @property
    def max_token_value(self):
        """The largest id (tiktoken's name)."""
        return self.vocab_size - 1

    @property
    def eot_token(self):
        """tiktoken's name for `eot_id`; raises TokenNotFound (a KeyError, as tiktoken) without <|endoftext|>."""
        if self.eot_id is None:
            raise TokenNotFound("this tokenizer has no <|endoftext|> special token")
        return self.eot_id

    @property
    def special_tokens_set(self):
        """The special tokens' names, as a new set (tiktoken's name)."""
        return set(self.special_tokens)


def thread_map(fn, items, num_threads):
    """list(map(fn, items)), on up to `num_threads` threads as tiktoken's batch methods run.

    Results come back in the order of `items` whatever the threads do. tinygen
    encodes in Python, which holds the GIL, so on a standard CPython the
    threads take turns: `num_threads` is accepted for tiktoken's signature and
    1 skips the pool.
    """
    if not isinstance(num_threads, numbers.Integral) or isinstance(num_threads, bool) or num_threads < 1:
        raise TinygenError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    items = list(items)
    if num_threads == 1 or len(items) < 2:
        return list(map(fn, items))
    with ThreadPoolExecutor(min(num_threads, len(items))) as pool:
        return list(pool.map(fn, items))
