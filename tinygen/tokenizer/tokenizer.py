"""The tokenizer: text <-> token ids by byte-level BPE, with special tokens and file formats.

Text is split into chunks by a regex (GPT-2's or GPT-4's pattern, or yours), each
chunk's UTF-8 bytes are encoded by BPE (`tinygen.tokenizer.bpe`), and the ids are
joined. Special tokens such as "<|endoftext|>" are matched before the split and
never come out of ordinary text. Semantics follow tiktoken, so GPT-2's files and
cl100k's rank file encode token for token as OpenAI's tokenizers do, and the
`Tokenizer` answers to tiktoken's `Encoding` methods (encode_batch,
decode_with_offsets, encode_single_token, n_vocab, ...; docs/tokenizer.md lists
them and the few places tinygen is deliberately stricter).

    tok = Tokenizer.train("hello hello world", vocab_size=260, special_tokens=[ENDOFTEXT])
    ids = tok.encode("hello<|endoftext|>", allowed_special="all")
    tok.decode(ids) == "hello<|endoftext|>"

Ids: 0..255 are the single bytes (in some order), then one id per learned
token in merge order, then the special tokens. A token's id is its merge rank.
"""
import functools
import json
import numbers
import operator
import os
import types
from collections import Counter
from itertools import chain, compress, repeat

import numpy as np
import regex

from .bpe import LONG_PIECE, PairTable, encode_piece, merge_pieces, recover_merges, train_merges
from ..errors import TinygenError
from ..plumbing.fileio import atomic_write_text, parse_json
from .split import GPT2_PATTERN, GPT4_PATTERN, PATTERNS, splitter  # noqa: F401 (re-exported)
from .compat import TiktokenMethods, TokenNotFound
from .files import escape_token, read_gpt2, read_tiktoken, unescape_token

ENDOFTEXT = "<|endoftext|>"
CL100K_SPECIAL_TOKENS = {ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                         "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
FORMAT, VERSION = "tinygen-tokenizer", 1
MAX_PATTERN_CHARS = 10_000  # a split pattern read from a file; GPT-4's has 131
MAX_TOKEN_ID = 0x10FFFF  # the largest code point: the encoder keeps ids as characters (GPT-2 50256, o200k ~200k)


class Tokenizer(TiktokenMethods):
    """Byte-level BPE: `ranks` maps token bytes to ids; ids of special tokens come after.

    Build one with `train`, `load`, `load_dir`, `from_tiktoken` or `from_gpt2`;
    add special tokens to any of them with `with_special_tokens`.
    Encoding caches the ids of each distinct chunk (emptied after a call that
    leaves more than `cache_size`); each tokenizer has its own chunk cache. The
    vocabulary's tables for encoding (a `PairTable` and the tokens by their
    text, ~0.1 s to build for GPT-2's) are built once per process and shared by
    every tokenizer with the same ranks: they never change.
    A Tokenizer pickles as its vocabulary (not its caches), so it can be sent
    to a process pool.
    """

    cache_size = 200_000

    def __init__(self, ranks, pattern="gpt4", special_tokens=None, merges=None):
        self.pattern = PATTERNS.get(pattern, pattern)
        self._splitter = splitter(self.pattern)
        self._covers = self.pattern in PATTERNS.values()  # built-ins match every character
        if any(bytes([b]) not in ranks for b in range(256)) or b"" in ranks:
            raise TinygenError("a byte-level vocabulary needs all 256 single bytes as tokens, and no empty token")
        self._ranks = dict(ranks)
        self._id_bytes = {i: b for b, i in self._ranks.items()}
        if len(self._id_bytes) != len(self._ranks) or min(self._id_bytes) < 0:
            raise TinygenError("token ids must be distinct non-negative integers")
        if max(self._id_bytes) > MAX_TOKEN_ID:
            raise TinygenError(f"token id {max(self._id_bytes)} is too large: encoding stores ids as characters, "
                               f"so ordinary tokens need ids up to {MAX_TOKEN_ID} (special tokens may be larger)")
        self._token_bytes = [None] * (max(self._id_bytes) + 1)  # id -> bytes, a list for merge_pieces
        for b, i in self._ranks.items():
            self._token_bytes[i] = b
        # derived from the ranks, never changed: shared by every tokenizer with equal ranks
        self._pairs, self._text_ids = _vocabulary_tables(_Vocabulary(self._ranks))
        self.special_tokens = dict(special_tokens or {})
        for name, i in self.special_tokens.items():
            if not isinstance(name, str) or not name or not _is_int(i) or i < 0 or i in self._id_bytes:
                raise TinygenError(f"special token {name!r} -> {i!r}: expected a new non-empty string "
                                   "and an unused non-negative id")
            self._id_bytes[i] = name.encode("utf-8")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise TinygenError("special tokens must have distinct ids")
        self._special_ids = frozenset(self.special_tokens.values())
        self.vocab_size = max(self._id_bytes) + 1
        self.eot_id = self.special_tokens.get(ENDOFTEXT)
        self._merges = merges
        self._cache = {}  # chunk -> ids
        self._table = None  # for decoding with NumPy, built on first use

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)})"

    def __reduce__(self):
        """Pickle as the arguments that rebuild it: the vocabulary, not the caches."""
        state = {"cache_size": self.cache_size} if "cache_size" in self.__dict__ else None
        return type(self), (self._ranks, self.pattern, self.special_tokens, self._merges), state

    # ---- training ----------------------------------------------------------------
    @classmethod
    def train(cls, text, vocab_size, pattern="gpt4", special_tokens=None, progress=None):
        """Learn a vocabulary of `vocab_size` ids (special tokens included) from text.

        `text` is a str or an iterable of documents (chunks never span documents);
        special-token strings in it are cut out, not learned. Ties between pairs
        of equal count go to the smallest (left id, right id); see `tinygen.tokenizer.bpe`.
        Too little text for `vocab_size`: stops early with a warning.
        `progress` is a `Progress` (its `.update(done)`) or a callable (done, total).
        """
        specials = list(dict.fromkeys([special_tokens] if isinstance(special_tokens, str) else special_tokens or []))
        if not all(isinstance(name, str) and name for name in specials):
            raise TinygenError(f"special_tokens must be non-empty strings, got {specials!r}")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise TinygenError(f"vocab_size must be an int >= 256 + {len(specials)} special tokens, "
                               f"got {vocab_size!r}")
        tok = cls({bytes([b]): b for b in range(256)}, pattern)  # validates the pattern
        docs = [text] if isinstance(text, str) else text
        split = _special_regex(frozenset(specials)).split if specials else None
        counts = Counter()
        for doc in docs:
            if not isinstance(doc, str):
                raise TinygenError(f"training text must be a str or an iterable of str, got {type(doc).__name__}")
            for piece in split(doc)[::2] if split else (doc,):
                for chunks in tok._blocks(piece):
                    counts.update(chunks)
        chunk_counts = Counter()
        for chunk, n in counts.items():
            chunk_counts[_utf8(chunk)] += n
        if hasattr(progress, "update"):
            progress = functools.partial(_call_update, progress)
        merges, token_bytes = train_merges(chunk_counts, vocab_size - len(specials), progress)
        ranks = {b: i for i, b in enumerate(token_bytes)}
        named = {name: len(ranks) + k for k, name in enumerate(specials)}
        pairs = [(token_bytes[a], token_bytes[b]) for a, b in merges]
        return cls(ranks, pattern, named, pairs)

    def with_special_tokens(self, tokens):
        """A copy with more special tokens: {name: id}, or names that get the next ids from `n_vocab` up.

        Ordinary text encodes exactly as before (same ranks, pattern and merges).
        tiktoken's way, a new Encoding with `special_tokens={**old, name: id}`,
        works too: `Tokenizer(tok.mergeable_ranks, tok.pattern, {**tok.special_tokens, name: id})`.

        >>> tok = Tokenizer({bytes([b]): b for b in range(256)}, "gpt2", {ENDOFTEXT: 256})
        >>> tok.with_special_tokens(["<|im_start|>", "<|im_end|>"]).special_tokens
        {'<|endoftext|>': 256, '<|im_start|>': 257, '<|im_end|>': 258}
        """
        if isinstance(tokens, str):
            tokens = [tokens]
        if not isinstance(tokens, dict):
            tokens = {name: self.vocab_size + k for k, name in enumerate(dict.fromkeys(tokens))}
        for name in tokens:
            if name in self.special_tokens:
                raise TinygenError(f"special token {name!r} is already in this tokenizer "
                                   f"(id {self.special_tokens[name]})")
        return type(self)(self._ranks, self.pattern, {**self.special_tokens, **tokens}, self._merges)

    # ---- encoding ----------------------------------------------------------------
    def split(self, text):
        """The pattern's chunks of `text`: "hello world" -> ["hello", " world"]."""
        return list(chain.from_iterable(self._blocks(text)))

    def _blocks(self, text):
        """Lists of chunks for consecutive stretches of `text` (see split.Splitter)."""
        blocks = self._splitter(text)
        if not self._covers and sum(map(len, blocks[0])) != len(text):
            raise TinygenError("the split pattern skipped characters of the text; a custom pattern must "
                               r"match every character (end it with an alternative such as |\s|.)")
        return blocks

    def encode_ordinary(self, text):
        """Ids of `text`, with special-token strings encoded as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
        try:
            return self._encode_text(text)
        except UnicodeEncodeError:  # lone surrogates: replaced by U+FFFD, as tiktoken does
            return self._encode_text(_fix_surrogates(text))

    def _encode_text(self, text):
        """The ids of `text`, through the cache {chunk: its ids as a str of chr(id)}.

        "hello world" -> chunks ["hello", " world"] -> "\\u7a8d" + "\\u03e3" (GPT-2 ids 31373, 995 as characters).
        Storing ids as characters makes gathering them one C-level "".join per
        block, with no Python loop and no tuple per chunk; `_ids_of_chars` turns
        the str into ints at the end, all at once. The chunks not yet cached are
        found with one set difference and encoded together (`_add_to_cache`).
        """
        blocks = self._blocks(text)
        cache = self._cache  # this call's dict, even if another thread replaces self._cache meanwhile
        missing = set().union(*blocks).difference(cache)
        if missing:
            self._add_to_cache(missing, cache)
        ids = _ids_of_chars("".join(["".join(map(cache.__getitem__, chunks)) for chunks in blocks]))
        if len(cache) > self.cache_size:
            self._cache = {}  # a new dict, not cache.clear(): another thread may still be reading this one
        return ids

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Ids of `text`, tiktoken's special-token rules.

        By default a special token's text raises ValueError (TinygenError) naming it;
        `allowed_special="all"` or a set encodes those as their ids;
        `disallowed_special=()` encodes them as ordinary text.
        """
        allowed = self._allowed_specials(text, allowed_special, disallowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        pieces = _special_regex(allowed).split(text)  # text, special, text, special, ..., text
        for k, piece in enumerate(pieces):
            if k % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids += self.encode_ordinary(piece)
        return ids

    def _allowed_specials(self, text, allowed_special, disallowed_special):
        """The special tokens to encode as ids; raises if `text` holds a disallowed one."""
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
        for arg in (allowed_special, disallowed_special):
            if isinstance(arg, str) and arg != "all":
                raise TinygenError(f"allowed_special/disallowed_special: expected 'all' or a set of strings, "
                                   f"got {arg!r}")
        if allowed_special == "all":
            allowed_special = self.special_tokens.keys()
        allowed = frozenset(self.special_tokens.keys() & set(allowed_special))
        if disallowed_special == "all":
            disallowed_special = self.special_tokens.keys() - allowed
        if disallowed_special:
            found = _special_regex(frozenset(disallowed_special)).search(text)
            if found:
                name = found.group()
                raise TinygenError(f"text contains the special token {name!r}: pass allowed_special={{{name!r}}} "
                                   "to encode it as a special token, or disallowed_special=() to encode it as text")
        return allowed

    def encode_single_token(self, text_or_bytes):
        """The id of the one token whose text (a str) or bytes this is, special tokens included.

        Raises TokenNotFound (a KeyError, as in tiktoken) when no single token is exactly that.
        >>> Tokenizer({bytes([b]): b for b in range(256)}, "gpt2", {ENDOFTEXT: 256}).encode_single_token("h")
        104
        """
        if isinstance(text_or_bytes, str):
            text_or_bytes = text_or_bytes.encode("utf-8")
        elif not isinstance(text_or_bytes, bytes):
            raise TypeError(f"encode_single_token takes a str or bytes, got {type(text_or_bytes).__name__}")
        i = self._ranks.get(text_or_bytes)
        if i is None:
            i = self.special_tokens.get(text_or_bytes.decode("utf-8", "replace"))
            if i is None or self._id_bytes[i] != text_or_bytes:
                raise TokenNotFound(f"{text_or_bytes!r} is not a single token of this vocabulary")
        return i

    def _add_to_cache(self, chunks, cache):
        """cache[chunk] = its ids as a str of chr(id), for each of `chunks`.

        A chunk that is itself a token is one lookup, by its text; the others go through BPE,
        all together (`merge_pieces`), the few longer than LONG_PIECE bytes one by one.
        The ids of all pieces come back as one array, turned into one str at
        once and cut into each chunk's str (no list and no join per chunk).
        """
        if len(chunks) < 64:  # a short text: a plain loop costs less than setting up the passes below
            for chunk in chunks:
                i = self._text_ids.get(chunk)
                cache[chunk] = chr(i) if i is not None else "".join(map(chr, encode_piece(chunk.encode(), self._ranks)))
            return
        chunks = list(chunks)
        ids = list(map(self._text_ids.get, chunks))
        known = list(map(operator.is_not, ids, repeat(None)))  # the chunk is one token
        cache.update(zip(compress(chunks, known), map(chr, compress(ids, known))))  # in C: no loop per chunk
        chunks = list(compress(chunks, map(operator.not_, known)))
        pieces = list(map(str.encode, chunks))  # UTF-8
        if len(pieces) < 64:  # a few (a short text): NumPy's set-up would cost more than it saves
            alone = [True] * len(pieces)
        else:  # the long ones: encode_piece's heap
            alone = [len(p) > LONG_PIECE for p in pieces]
        for chunk, piece in zip(compress(chunks, alone), compress(pieces, alone)):
            cache[chunk] = "".join(map(chr, encode_piece(piece, self._ranks)))
        if not all(alone):
            together = list(map(operator.not_, alone))
            chunks, pieces = list(compress(chunks, together)), list(compress(pieces, together))
            which, ids, lens = merge_pieces(pieces, self._ranks, self._token_bytes, table=self._pairs)
            chars = ids.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
            ends = np.cumsum(lens)
            cuts = map(slice, (ends - lens).tolist(), ends.tolist())
            cache.update(zip(map(chunks.__getitem__, which.tolist()), map(chars.__getitem__, cuts)))

    # ---- decoding ----------------------------------------------------------------
    def decode_bytes(self, tokens):
        """The exact bytes of `tokens` (special tokens as their UTF-8 text); a list or 1-D NumPy array.

        Ids are integers (int, NumPy integers: anything with __index__), as in
        tiktoken: 1.0, "1" or a float array raise TypeError; an id outside the
        vocabulary raises TokenNotFound (a KeyError and a ValueError).
        """
        if isinstance(tokens, np.ndarray) and (tokens.dtype.kind not in "iuO" or tokens.ndim != 1):
            raise TypeError(f"token ids must be a 1-D array of integers, got a {tokens.ndim}-D {tokens.dtype} array")
        if not hasattr(tokens, "__len__"):
            tokens = list(tokens)
        if len(tokens) >= 512:  # long: gather the bytes with NumPy, ~3x faster than joining
            out = self._decode_numpy(tokens)
            if out is not None:
                return out
        tokens = tokens.tolist() if isinstance(tokens, np.ndarray) else tokens
        try:  # operator.index rejects 1.0, which would otherwise find id 1 in the dict
            return b"".join(map(self._id_bytes.__getitem__, map(operator.index, tokens)))
        except KeyError:
            for i in tokens:
                self.id_to_bytes(i)  # raises TokenNotFound naming the first unknown id
            raise

    def _decode_numpy(self, tokens):
        """decode_bytes of a long integer sequence by gathering from one byte table; None if not that."""
        if isinstance(tokens, np.ndarray):
            arr = tokens
        else:  # operator.index on each, so that 1.0 or np.bool_ is a TypeError here too, as in tiktoken
            try:
                arr = np.fromiter(map(operator.index, tokens), dtype=np.int64, count=len(tokens))
            except OverflowError:  # an id beyond int64: let the slow path name it
                return None
        if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= self.vocab_size:
            return None
        flat, starts, lens = self._decode_table()
        if lens[arr].min() < 0:  # an unused id: let the slow path name it
            return None
        blocks = np.split(arr, range(1 << 15, len(arr), 1 << 15))  # blocks that fit the CPU cache
        return b"".join(_gather(flat, starts[a], lens[a]) for a in blocks)

    def _decode_table(self):
        """All token bytes in one uint8 array, with each id's start and length (-1: unused id)."""
        if self._table is None:
            tokens = [self._id_bytes.get(i) for i in range(self.vocab_size)]
            lens = np.array([-1 if t is None else len(t) for t in tokens], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(np.maximum(lens, 0))[:-1]])
            flat = np.frombuffer(b"".join(t for t in tokens if t is not None), dtype=np.uint8)
            self._table = flat, starts, lens
        return self._table

    def decode(self, tokens, errors="replace"):
        """Text of `tokens`; bytes that are not valid UTF-8 are handled by `errors`
        (bytes.decode's: "replace", the default, gives U+FFFD; "strict" raises)."""
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)

    def id_to_bytes(self, i):
        """The bytes of one token, for streaming decoders: 104 -> b"h" (byte ids).

        tiktoken calls it `decode_single_token_bytes`. A non-integer raises
        TypeError, an unknown id TokenNotFound (a KeyError and a ValueError).
        """
        try:
            return self._id_bytes[operator.index(i)]
        except KeyError:
            raise TokenNotFound(f"token id {i!r} is not in the vocabulary (ids 0..{self.vocab_size - 1})") from None

    # ---- the vocabulary, also by tiktoken's names ----------------------------------
    @property
    def mergeable_ranks(self):
        """The rank table {token bytes: id} without special tokens, read-only (tiktoken's constructor argument)."""
        return types.MappingProxyType(self._ranks)

    def token_byte_values(self):
        """Every ordinary token's bytes, sorted (tiktoken's order): [b"\\x00", b"\\x01", ...]."""
        return sorted(self._ranks)

    def is_special_token(self, token):
        """True for the id of a special token."""
        return operator.index(token) in self._special_ids

    # ---- merges and files ----------------------------------------------------------
    @property
    def merges(self):
        """[(left bytes, right bytes)] that build the tokens above the 256 bytes, in order."""
        if self._merges is None:
            self._merges = recover_merges(self._ranks)
        return self._merges

    def to_dict(self):
        """The JSON-ready contents of a tinygen tokenizer file."""
        n = len(self._ranks)
        if sorted(self._ranks.values()) != list(range(n)) or any(len(self._id_bytes[i]) != 1 for i in range(256)):
            raise TinygenError("only vocabularies with ids 0..255 for the bytes and no gaps can be saved")
        return {"format": FORMAT, "version": VERSION, "pattern": self.pattern,
                "vocab_size": self.vocab_size, "special_tokens": self.special_tokens,
                "byte_order": [self._id_bytes[i][0] for i in range(256)],
                "merges": [[escape_token(a), escape_token(b)] for a, b in self.merges]}

    def save(self, path):
        """Write one human-readable JSON file (one field, then one merge, per line), atomically."""
        data = self.to_dict()
        merges = data.pop("merges")
        fields = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in data.items()]
        lines = ",\n".join("  " + json.dumps(m, ensure_ascii=False) for m in merges)
        atomic_write_text(path, "{\n" + "\n".join(fields) + '\n "merges": [\n' + lines + "\n ]\n}\n")

    @classmethod
    def load(cls, path):
        """Read a file written by `save`; a corrupt, truncated or foreign file raises TinygenError."""
        return cls.from_dict(_read_tokenizer_json(path), str(path))

    @classmethod
    def from_dict(cls, data, where="tokenizer"):
        """The inverse of `to_dict`, validating every field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TinygenError(f"{where}: not a tinygen tokenizer file (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise TinygenError(f"{where}: tokenizer format version {data.get('version')!r}, "
                               f"this tinygen reads version {VERSION}")
        try:
            order, pattern, specials = data["byte_order"], data["pattern"], data["special_tokens"]
            if sorted(order) != list(range(256)) or not isinstance(pattern, str) or not isinstance(specials, dict):
                raise ValueError("byte_order, pattern or special_tokens malformed")
            if len(pattern) > MAX_PATTERN_CHARS:  # compiling costs ~250 bytes per character
                raise ValueError(f"pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are read")
            ranks = {bytes([b]): i for i, b in enumerate(order)}
            merges = []
            for k, (left, right) in enumerate(data["merges"]):
                if not (isinstance(left, str) and isinstance(right, str)):
                    raise ValueError(f"merge {k}: expected two strings, got {[left, right]!r:.80}")
                a, b = unescape_token(left), unescape_token(right)
                if a not in ranks or b not in ranks or a + b in ranks:
                    raise ValueError(f"merge {k} {[left, right]}: both sides must be tokens defined before it, "
                                     "and their concatenation a new one")
                ranks[a + b] = len(ranks)
                merges.append((a, b))
            tok = cls(ranks, pattern, specials, merges)
            if tok.vocab_size != data["vocab_size"]:
                raise ValueError(f"vocab_size {data['vocab_size']!r:.40} does not match the merges ({tok.vocab_size})")
            _check_dense(tok)
        except TinygenError as e:
            raise TinygenError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise TinygenError(f"{where}: corrupt tokenizer file: {type(e).__name__}: {str(e)[:200]}") from None
        return tok

    @classmethod
    def from_tiktoken(cls, path, pattern="gpt4", special_tokens=None):
        """A tiktoken rank file (lines "base64-token rank"), e.g. cl100k_base.tiktoken
        with pattern "gpt4" and `CL100K_SPECIAL_TOKENS`."""
        ranks = read_tiktoken(path)
        try:
            return _check_dense(cls(ranks, pattern, special_tokens))
        except TinygenError as e:
            raise TinygenError(f"{path}: {e}") from None

    @classmethod
    def from_gpt2(cls, vocab_json, merges_txt, pattern="gpt2"):
        """GPT-2's vocab.json + merges.txt (or OpenAI's encoder.json + vocab.bpe).

        Tokens are written with GPT-2's byte-to-unicode map (space is "Ġ");
        vocabulary entries that no merge builds, like "<|endoftext|>", are special.
        """
        ranks, specials, merges = read_gpt2(vocab_json, merges_txt)
        try:
            return _check_dense(cls(ranks, pattern, specials, merges))
        except TinygenError as e:
            raise TinygenError(f"{vocab_json}: {e}") from None

    @classmethod
    def load_dir(cls, path):
        """The tokenizer of a model directory: tinygen's tokenizer.json, else GPT-2's
        vocab.json + merges.txt (or encoder.json + vocab.bpe)."""
        own, foreign = os.path.join(path, "tokenizer.json"), None
        if os.path.isfile(own):
            data = _read_tokenizer_json(own)
            if isinstance(data, dict) and data.get("format") == FORMAT:
                return cls.from_dict(data, own)
            foreign = f"{own} is not a tinygen tokenizer file (a Hugging Face tokenizers file?)"
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if os.path.isfile(os.path.join(path, vocab)) and os.path.isfile(os.path.join(path, merges)):
                return cls.from_gpt2(os.path.join(path, vocab), os.path.join(path, merges))
        raise TinygenError((foreign + " and there is no vocab.json + merges.txt beside it") if foreign else
                           f"{path}: no tokenizer found: expected tinygen's tokenizer.json, or vocab.json + merges.txt")


def _read_tokenizer_json(path):
    """The parsed JSON of a tokenizer file; not UTF-8, not JSON, too deep, a repeated key -> TinygenError."""
    with open(path, "rb") as f:
        raw = f.read()
    return parse_json(raw, f"{path}: not a tinygen tokenizer file")


def _check_dense(tok):
    """`tok`, if its ids leave at most as many unused ids below vocab_size as it has tokens.

    A model gives every id below vocab_size a row of its embedding, so a
    file of a few bytes naming a special token id of 10**12 would otherwise
    make tinygen allocate terabytes. cl100k leaves 16 ids unused; none of
    tinygen's own files leave any.
    """
    used = len(tok._id_bytes)
    if tok.vocab_size - used > used:
        raise TinygenError(f"vocab_size {tok.vocab_size} leaves {tok.vocab_size - used} ids unused, more than "
                           f"the {used} tokens: is a token id (max {tok.vocab_size - 1}) corrupt?")
    return tok


class _Vocabulary:
    """A rank dict as a cache key: equal to another with the same contents.

    Hashes as its size; equality is dict ==, ~2 ms for GPT-2's 50k tokens,
    paid only against cached vocabularies of the same size.
    """

    __slots__ = ("ranks",)

    def __init__(self, ranks):
        self.ranks = ranks

    def __hash__(self):
        return len(self.ranks)

    def __eq__(self, other):
        return isinstance(other, _Vocabulary) and (self.ranks is other.ranks or self.ranks == other.ranks)


@functools.lru_cache(maxsize=4)
def _vocabulary_tables(vocabulary):
    """(PairTable, {token text: id}) of a vocabulary, built once per process (a few vocabularies are kept).

    The second holds the tokens whose bytes are valid UTF-8, by their text: a chunk that is one token
    is found without encoding it, by the hash its str already carries (~0.2 us less per chunk).
    """
    text_ids = {}
    for token, i in vocabulary.ranks.items():
        try:
            text_ids[token.decode("utf-8")] = i
        except UnicodeDecodeError:  # part of a character: no chunk is exactly this
            pass
    return PairTable(vocabulary.ranks), text_ids


@functools.lru_cache(maxsize=64)
def _special_regex(specials):
    """One regex matching any of `specials`, longest first, captured (for `split`)."""
    return regex.compile("(" + "|".join(map(regex.escape, sorted(specials, key=lambda s: (-len(s), s)))) + ")")


def _ids_of_chars(chars):
    """The ids of a str of chr(id), as a list of int: "\\x68\\u7a8d" -> [104, 31373].

    UTF-32 stores each character as its code point in 4 bytes, so the ids are
    that buffer read as uint32 ("surrogatepass": ids 0xD800..0xDFFF are code
    points like any other here).
    """
    if len(chars) < 64:  # short: NumPy's call overhead is more than the loop
        return list(map(ord, chars))
    return np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype="<u4").tolist()


def _gather(flat, starts, lens):
    """The bytes flat[starts[0]:starts[0]+lens[0]] + flat[starts[1]:...] + ..., without a Python loop."""
    ends = np.cumsum(lens)
    return flat[np.arange(ends[-1]) - np.repeat(ends - lens - starts, lens)].tobytes()


def _call_update(progress, done, total):
    progress.update(done)


def _fix_surrogates(text):
    """Join surrogate pairs and replace lone surrogates with U+FFFD (tiktoken's fix-up)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _utf8(chunk):
    try:
        return chunk.encode("utf-8")
    except UnicodeEncodeError:
        return _fix_surrogates(chunk).encode("utf-8")


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
