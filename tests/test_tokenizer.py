"""Byte-level BPE: roundtrips, special tokens, training against a brute-force trainer, files."""
import json
import random
import time
import warnings

import numpy as np
import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from tinygen.tokenizer.bpe import (LONG_PIECE, NO_PAIR, PairTable, _encode_long, encode_piece, encode_pieces,
                                   train_merges)
from tinygen.errors import TinygenError
from tinygen.tokenizer.split import (COVERED_CODES, Splitter, _covered_twin, _safe_point_after, _safe_point_before,
                                     greedy, splitter)
from tinygen.tokenizer import ENDOFTEXT, GPT2_PATTERN, GPT4_PATTERN, Tokenizer
from tinygen.tokenizer.files import escape_token as _escape, unescape_token as _unescape

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2024; don't panic!\n"
    "def tokenize(text):\n    return [t for t in text.split() if t]\n\n"
    "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, русский текст, 😀👍🏽 emoji.\n"
    "   whitespace  runs\t\ttabs\r\nwindows lines\r\n  1234567 3.14159 0xFF\n"
) * 8

# Text that exercises the split patterns: emoji, CJK, combining marks, whitespace runs, \r\n.
PIECES = ["a", "Z", "é", "e\u0301", "ß", "日本", "😀", "👨\u200d👩\u200d👧", "\u0308", "١٢", "12345",
          " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "'s", "'LL", ".", "!?", "<|", "|>", "'"]
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(st.characters(blacklist_categories=("Cs",)),
                                                            max_size=8)), max_size=30).map("".join)


def reference_train(chunk_counts, vocab_size):
    """Obviously correct BPE: recount every pair before every merge.

    Same rule as tinygen.tokenizer.bpe: highest count, ties to the smallest (left, right) ids.
    """
    vocab = [bytes([i]) for i in range(256)]
    words = [(list(chunk), n) for chunk, n in chunk_counts.items()]
    merges = []
    while len(vocab) < vocab_size:
        counts = {}
        for word, n in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        new = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merges.append(best)
        for k, (word, n) in enumerate(words):
            out, i = [], 0
            while i < len(word):
                if tuple(word[i : i + 2]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[k] = (out, n)
    return merges, vocab


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, 400, special_tokens=[ENDOFTEXT, "<|pad|>"])


@pytest.fixture(scope="module")
def tok2():
    return Tokenizer.train(CORPUS.split("\n"), 350, pattern="gpt2", special_tokens=[ENDOFTEXT])


def test_known_answer_wikipedia_example():
    # "aaabdaaabac": aa -> Z (4 times), then ab and Za tie at 2: (97, 98) < (256, 97), so ab -> Y; then ZY -> X.
    tok = Tokenizer.train("aaabdaaabac", 259, pattern=r"[\s\S]+")
    assert tok.merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]


@given(texts)
def test_roundtrip(tok, tok2, s):
    for t in (tok, tok2):
        ids = t.encode_ordinary(s)
        assert t.decode(ids) == s
        assert all(0 <= i < t.vocab_size for i in ids)
        assert t.decode_bytes(ids) == s.encode("utf-8")


@given(st.binary(max_size=60))
def test_invalid_utf8_is_replaced_sanely(tok, b):
    s = b.decode("utf-8", errors="replace")
    assert tok.decode_bytes(tok.encode(s)) == s.encode("utf-8")
    assert tok.decode(tok.encode_ordinary(s)) == s


def test_decode_replaces_invalid_utf8(tok):
    ids = tok.encode_ordinary("é")  # two bytes, two tokens in a small vocabulary (or one)
    partial = [i for i in range(256) if tok.id_to_bytes(i) == b"\xc3"]
    assert tok.decode(partial) == "\ufffd"
    assert tok.decode_bytes(partial) == b"\xc3"
    assert tok.decode(ids) == "é"


@given(texts)
def test_chunks_concatenate_back(s):
    for pattern in ("gpt2", "gpt4"):
        tok = Tokenizer({bytes([b]): b for b in range(256)}, pattern)
        assert "".join(tok.split(s)) == s


MIXED = st.lists(st.sampled_from(list("ab1Z9 \n\n\r\t'.:)") + ["é", "日", "😀", "\u00a0", "\u3000", "\x85",
                                                                 "\u2028", "'ſ", "\u0301", "١", "\x1c", "ψ", "’",
                                                                 "“", "©", "–", "²", "\u2009"]),
                 max_size=60).map("".join)


@given(st.one_of(MIXED, texts), st.sampled_from([GPT2_PATTERN, GPT4_PATTERN]), st.sampled_from([4, 1 << 16]),
       st.sampled_from([None, False]))
def test_fast_split_equals_regex(s, pattern, block, possessive):
    # the built-in patterns run on `re` for ASCII stretches, cut at safe points (see split.Splitter);
    # possessive=False is the greedy `re` twin Python 3.10 uses, checked here on every Python
    split = Splitter(pattern, block, possessive)
    assert [c for b in split(s) for c in b] == regex.findall(pattern, s)
    if possessive is None:
        assert splitter(pattern, block)(s) == split(s)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_fast_split_cuts_at_spaces_next_to_uncovered_characters(pattern):
    # only the words around a character that the `re` twin does not cover (here the letter ψ) go to
    # `regex`; the cuts are spaces after a visible ASCII character, or newlines after a letter or digit,
    # wherever they fall next to other text
    cases = ["ab ψ", "x  ψ", "( ψ", "'s ψ", "I'll ψ", "a\n ψ", "ψ b", "a ψ b c", "1 ψ", "! ψ", "ψ", "ψ ",
             " ψ", "a\t ψ", "a\r\n ψ", "x!\nψ", "x\n\nψ", "a \u00a0ψ", "ψ\u00a0 b", "a.\n\n ψ\n", "9\n ψ",
             "é ψ", "’ ψ", "ψ’s", "a\u2028 ψ"]
    split = Splitter(pattern, 4)
    for case in cases:
        for text in (case, "word " * 3 + case + " more words\n" * 3):
            assert [c for b in split(text) for c in b] == regex.findall(pattern, text), text
    assert _safe_point_before("ab cd\u20ac", 5, 0) == 2 and _safe_point_after("\u20acab cd", 1, 6) == 3
    assert _safe_point_before("  x", 3, 0) == 0 and _safe_point_after("( \n", 0, 3) == 1
    assert _safe_point_after(" \n", 0, 2) == 2 and _safe_point_after("a\n", 0, 2) == 1


def test_fast_split_keeps_blocks_large():
    text = ("The \u03c8 caf\u00e9 is open. " * 20 + "\n") * 200  # a character `re` does not cover on every line
    blocks = Splitter(GPT2_PATTERN, 1 << 12)(text)
    assert [c for b in blocks for c in b] == regex.findall(GPT2_PATTERN, text)
    assert len(blocks) < len(text) / (1 << 12) * 2  # stretches are gathered into blocks, not one per word


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
@pytest.mark.parametrize("possessive", [None, False])
def test_covered_twin_on_every_covered_character(pattern, possessive):
    # the `re` twin is exact on text of covered characters: each of them, in contexts that exercise
    # every alternative of both patterns (words, digits, punctuation, contractions, whitespace runs)
    twin = _covered_twin(pattern, possessive)
    contexts = ["a{c}b", " {c}{c} ", "'{c}", "{c}'s", "'s{c}", "1{c}2", "x {c}\n", "{c}  \n", "\n{c}\r\n",
                "{c}", " {c}", "{c}  x", ".{c}.", "{c}\t", "123{c}45", "{c}ll {c}VE"]
    for c in map(chr, COVERED_CODES):
        text = "|".join(ctx.format(c=c) for ctx in contexts)
        assert twin.findall(text) == regex.findall(pattern, text), hex(ord(c))


def test_greedy_twin_of_the_possessive_patterns():
    assert greedy(r"\p{L}++|x{1,3}+|y?+|[a+]*+|\++") == r"\p{L}+|x{1,3}|y?|[a+]*|\++"
    assert greedy(GPT2_PATTERN) == r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s"""
    assert greedy(GPT4_PATTERN) == (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"""
                                    r"""[\r\n]*|\s+$|\s*[\r\n]|\s+(?!\S)|\s""")


def test_patterns_are_tiktokens():
    assert GPT2_PATTERN == r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    assert GPT4_PATTERN.startswith(r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+")
    tok = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4")
    assert tok.split("I'm 12345 ok\r\n\n  x") == ["I", "'m", " ", "123", "45", " ok", "\r\n\n", " ", " x"]


@given(texts)
def test_special_tokens_never_come_from_ordinary_text(tok, s):
    s = s + ENDOFTEXT + s[:3] + "<|pad|>"
    specials = set(tok.special_tokens.values())
    for ids in (tok.encode_ordinary(s), tok.encode(s, disallowed_special=())):
        assert not specials & set(ids)
        assert tok.decode(ids) == s


def test_special_token_semantics(tok):
    eot, pad = tok.special_tokens[ENDOFTEXT], tok.special_tokens["<|pad|>"]
    assert tok.eot_id == eot == tok.vocab_size - 2 and pad == tok.vocab_size - 1
    text = "hi" + ENDOFTEXT + " there<|pad|>"
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        tok.encode(text)
    with pytest.raises(ValueError, match=r"<\|pad\|>"):
        tok.encode(text, allowed_special={ENDOFTEXT})
    ids = tok.encode(text, allowed_special="all")
    assert ids == tok.encode("hi") + [eot] + tok.encode(" there") + [pad]
    ids = tok.encode(text, allowed_special={ENDOFTEXT}, disallowed_special=())
    assert eot in ids and pad not in ids and tok.decode(ids) == text
    assert tok.decode([eot]) == ENDOFTEXT and tok.id_to_bytes(pad) == b"<|pad|>"
    assert tok.encode_batch(["a", text], allowed_special="all") == [tok.encode("a"), tok.encode(text, "all")]
    with pytest.raises(TinygenError, match="expected 'all' or a set"):
        tok.encode("x", allowed_special=ENDOFTEXT)


def test_lone_surrogates_are_replaced_like_tiktoken(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    assert tok.decode(tok.encode_ordinary("\ud83d\ude00")) == "😀"  # a surrogate pair is joined
    assert tok.encode("x\udfff", allowed_special="all") == tok.encode("x\ufffd")


def test_long_decode_uses_numpy_and_still_checks_ids(tok):
    ids = tok.encode(CORPUS * 3)
    assert len(ids) > 512 and tok.decode(np.array(ids, dtype=np.uint16)) == tok.decode(ids) == CORPUS * 3
    gap = Tokenizer({bytes([b]): b for b in range(256)}, "gpt2", {ENDOFTEXT: 300})  # ids 256..299 unused
    assert gap.vocab_size == 301 and gap.decode([104, 300] * 400) == ("h" + ENDOFTEXT) * 400
    for bad in (280, -1, 301):
        with pytest.raises(TinygenError, match=f"token id {bad} is not in the vocabulary"):
            gap.decode([104] * 600 + [bad])
    with pytest.raises(TinygenError, match="not in the vocabulary"):
        gap.decode(np.array([104] * 600 + [280]))


def test_unknown_ids_raise(tok):
    for bad in (tok.vocab_size, -1, 10**9, np.int64(tok.vocab_size)):
        with pytest.raises(TinygenError, match="not in the vocabulary"):
            tok.decode([1, bad])
        with pytest.raises(KeyError, match="not in the vocabulary"):  # tiktoken raises KeyError
            tok.decode([1, bad])
    with pytest.raises(TinygenError, match=str(tok.vocab_size)):
        tok.id_to_bytes(tok.vocab_size)


@pytest.mark.parametrize("bad", [1.0, 104.0, "a", None, b"h", [104], np.float64(104)])
def test_non_integer_ids_raise_type_error_like_tiktoken(tok, bad):
    # tiktoken: decode([1.0]) -> TypeError "'float' object cannot be interpreted as an integer"
    for ids in ([104, bad], [104] * 600 + [bad]):  # the short path and the NumPy path
        with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
            tok.decode(ids)
    with pytest.raises(TypeError):
        tok.id_to_bytes(bad)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.bool_, np.complex64])
def test_non_integer_arrays_are_rejected(tok, dtype):
    for n in (3, 600):
        with pytest.raises(TypeError, match="1-D array of integers"):
            tok.decode(np.ones(n, dtype=dtype))
    with pytest.raises(TypeError, match="1-D array of integers"):
        tok.decode(np.full((1, 3), 104))
    for dtype in (np.int8, np.uint16, np.int64, np.uint64):  # every integer dtype decodes
        assert tok.decode(np.full(600, 104, dtype=dtype)) == "h" * 600
    assert tok.decode([True, 104]) == "\x01h"  # bool is an int in Python, and in tiktoken


def test_deterministic(tok):
    again = Tokenizer.train(CORPUS, 400, special_tokens=[ENDOFTEXT, "<|pad|>"])
    assert again.merges == tok.merges
    assert again.encode(CORPUS) == tok.encode(CORPUS) == tok.encode(CORPUS)


@given(st.lists(st.text("ab c\n", max_size=12), min_size=1, max_size=8), st.integers(257, 300),
       st.sampled_from(["gpt2", "gpt4", r"[\s\S]+"]))
def test_training_matches_brute_force(docs, vocab_size, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = Tokenizer.train(docs, vocab_size, pattern=pattern)
    counts = {}
    for doc in docs:
        for chunk in tok.split(doc):
            counts[chunk.encode()] = counts.get(chunk.encode(), 0) + 1
    merges, vocab = reference_train(counts, vocab_size)
    assert tok.merges == [(vocab[a], vocab[b]) for a, b in merges]
    assert [tok.id_to_bytes(i) for i in range(len(vocab))] == vocab


def test_training_matches_brute_force_many_random_texts():
    rng = random.Random(0)
    for _ in range(200):
        alphabet = rng.choice(["ab", "abc", "aab ", "xyz\n"])
        counts = {}
        for _ in range(rng.randint(1, 6)):
            word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))).encode()
            counts[word] = counts.get(word, 0) + rng.randint(1, 5)
        vocab_size = 256 + rng.randint(1, 40)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = train_merges(counts, vocab_size)
        assert got == reference_train(counts, vocab_size)
        assert len(set(got[1])) == len(got[1])  # every merge builds a new byte string


def test_training_on_documents_never_spans_them():
    with pytest.warns(UserWarning, match="stopped at 257 tokens"):
        tok = Tokenizer.train(["ab", "ab", "ab"], 300, pattern=r"[\s\S]+")
    assert tok.merges == [(b"a", b"b")]  # "ab" + "ab" would need "ba" across documents


def test_training_progress_and_early_stop():
    calls = []
    with pytest.warns(UserWarning, match="stopped at 258 tokens"):
        tok = Tokenizer.train("abc", 300, pattern=r"[\s\S]+", progress=lambda d, t: calls.append((d, t)))
    assert tok.vocab_size == 258 and calls == []
    Tokenizer.train(CORPUS, 300, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (44, 44) and calls[0][0] == 16


def test_training_errors():
    with pytest.raises(TinygenError, match="vocab_size"):
        Tokenizer.train("abc", 255)
    with pytest.raises(TinygenError, match="vocab_size"):
        Tokenizer.train("abc", 256, special_tokens=[ENDOFTEXT])
    with pytest.raises(TinygenError, match="not a valid regex"):
        Tokenizer.train("abc", 300, pattern="(")
    with pytest.raises(TinygenError, match="capturing groups"):
        Tokenizer.train("abc", 300, pattern=r"(\w+)|\s")
    with pytest.raises(TinygenError, match="skipped characters"):
        Tokenizer.train("ab cd", 300, pattern=r"\w+")
    with pytest.raises(TinygenError, match="iterable of str"):
        Tokenizer.train([b"bytes"], 300)
    with pytest.raises(TinygenError, match="non-empty strings"):
        Tokenizer.train("abc", 300, special_tokens=[""])
    with pytest.warns(UserWarning, match="stopped at 258"):  # the special token follows the merges made
        assert Tokenizer.train("abc", 300, special_tokens=["<s>", "<s>"]).special_tokens == {"<s>": 258}


def test_special_tokens_are_cut_out_of_training_text():
    with pytest.warns(UserWarning, match="stopped"):
        tok = Tokenizer.train("ab" + ENDOFTEXT + "ab", 300, pattern=r"[\s\S]+", special_tokens=[ENDOFTEXT])
    assert tok.merges == [(b"a", b"b")] and tok.special_tokens == {ENDOFTEXT: 257}


@given(st.one_of(st.binary(max_size=3 * LONG_PIECE), st.text(" aeht\n", max_size=3 * LONG_PIECE).map(str.encode)))
def test_long_piece_merge_equals_simple_loop(tok, piece):
    expected = _simple_bpe(piece, tok._ranks)
    assert _encode_long(piece, tok._ranks) == expected
    assert encode_piece(piece, tok._ranks) == expected


def _simple_bpe(piece, ranks):
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while True:
        scored = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not scored:
            return [ranks[p] for p in parts]
        _, i = min(scored)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


@st.composite
def rank_tables(draw):
    """A rank table that need not come from BPE training: bytes under shuffled ids, then multi-byte
    tokens over a small alphabet with arbitrary distinct ids, so that concatenations of tokens
    that no merge built, and gaps in the ids, both occur."""
    byte_ids = draw(st.permutations(range(256)))
    ranks = {bytes([b]): i for b, i in zip(range(256), byte_ids)}
    words = draw(st.lists(st.binary(min_size=2, max_size=6).map(lambda w: bytes(97 + c % 3 for c in w)),
                          unique=True, max_size=40))
    ids = draw(st.lists(st.integers(256, 400), min_size=len(words), max_size=len(words), unique=True))
    ranks.update(zip(words, ids))
    return ranks


def token_bytes_of(ranks):
    table = [None] * (max(ranks.values()) + 1)
    for b, i in ranks.items():
        table[i] = b
    return table


@given(rank_tables(), st.lists(st.binary(min_size=1, max_size=12).map(lambda w: bytes(97 + c % 4 for c in w)),
                               max_size=80), st.sampled_from([1, 2, 64]))
def test_encode_pieces_equals_one_piece_at_a_time(ranks, pieces, finish_below):
    # the rounds of encode_pieces make each piece's merges in encode_piece's order, whatever the mix of pieces
    expected = [_simple_bpe(p, ranks) for p in pieces]
    assert encode_pieces(pieces, ranks, token_bytes_of(ranks), finish_below) == expected
    assert [encode_piece(p, ranks) for p in pieces] == expected


@given(rank_tables())
def test_pair_table_finds_every_token_made_of_two(ranks):
    # PairTable answers "is token_bytes[left] + token_bytes[right] a token, of which rank?" as the bytes
    # lookup does, for every pair of tokens (not only the merges that built them) and every pair of bytes
    table, token_bytes = PairTable(ranks), token_bytes_of(ranks)
    ids = np.array(sorted(ranks.values()))
    left, right = np.repeat(ids, len(ids)), np.tile(ids, len(ids))
    expected = [ranks.get(token_bytes[a] + token_bytes[b], NO_PAIR) for a, b in zip(left.tolist(), right.tolist())]
    assert table.ranks(left, right).tolist() == expected
    pairs = [ranks.get(bytes([a, b]), NO_PAIR) for a in range(256) for b in range(256)]
    assert table.byte_pairs.tolist() == pairs


def test_pair_table_limits_and_sharing(tok):
    with pytest.raises(ValueError, match="below 2"):
        PairTable({b"a": 1 << 21})
    # the table is built once per vocabulary and shared; the chunk cache is each tokenizer's own
    # (among the last few vocabularies built: other tests may have pushed `tok`'s out)
    first = Tokenizer(tok.mergeable_ranks, tok.pattern, tok.special_tokens)
    fresh = Tokenizer(dict(tok.mergeable_ranks), tok.pattern, tok.special_tokens)
    assert fresh._pairs is first._pairs and fresh._cache is not first._cache
    first.encode_ordinary("cached words here")
    assert fresh._cache == {} and first._cache
    other = Tokenizer({bytes([b]): b for b in range(256)}, "gpt2")
    assert other._pairs is not tok._pairs and len(other._pairs.keys) == 1  # no token of two: only the sentinel


def test_encode_pieces_on_a_trained_vocabulary_and_its_limits(tok):
    words = sorted(set(regex.findall(r" ?\w+", CORPUS)))
    pieces = [(w + v).encode() for w in words for v in ("", "ing", "s the")] + [b"x" * LONG_PIECE, bytes(range(200))]
    got = encode_pieces(pieces, tok._ranks, token_bytes_of(tok._ranks), finish_below=1)
    assert got == [_simple_bpe(p, tok._ranks) for p in pieces] and len(pieces) > 64
    with pytest.raises(ValueError, match="at most"):
        encode_pieces([b"x" * (LONG_PIECE + 1)], tok._ranks, token_bytes_of(tok._ranks), finish_below=1)


def test_cold_and_warm_encoding_agree_with_per_chunk_bpe(tok):
    # a fresh tokenizer encodes all new chunks of a text together (encode_pieces): the same ids
    # (with chunks longer than LONG_PIECE among them, which go one by one)
    text = " ".join(f"w{k}x{k * 7 % 13}zq{k % 5}" for k in range(300)) + CORPUS + " " + "ab" * 300 + " " + "=" * 300
    fresh = Tokenizer(tok.mergeable_ranks, tok.pattern, tok.special_tokens)
    expected = [i for chunk in fresh.split(text) for i in _simple_bpe(chunk.encode(), tok._ranks)]
    assert fresh.encode_ordinary(text) == expected  # cold
    assert fresh.encode_ordinary(text) == expected  # every chunk cached


def test_token_ids_must_fit_a_character():
    with pytest.raises(TinygenError, match="too large"):
        Tokenizer({**{bytes([b]): b for b in range(256)}, b"ab": 0x110000}, "gpt2")
    big = Tokenizer({**{bytes([b]): b for b in range(256)}, b"ab": 0x10FFFF, b"cd": 0xD800}, "gpt2")
    assert big.encode("abab cd") == [0x10FFFF, 0x10FFFF, 32, 0xD800] and big.decode([0x10FFFF]) == "ab"
    # ids in the surrogate range (cl100k has 2,048 of them) are characters like any other
    assert big.encode(" ".join(["cd"] * 200 + [f"cd{k}" for k in range(200)]))[:3] == [0xD800, 32, 0xD800]


def test_pathological_input_is_linear(tok):
    t0 = time.perf_counter()
    tok.encode_ordinary("a" * 2_000)
    small = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = tok.encode_ordinary("a" * 100_000)
    big = time.perf_counter() - t0
    assert tok.decode(ids) == "a" * 100_000
    assert big < 5.0 and big < 50 * 10 * max(small, 1e-3)  # 50x the input, far from 2500x


def test_save_load_roundtrip(tok, tok2, tmp_path):
    for t in (tok, tok2):
        t.save(tmp_path / "tok.json")
        back = Tokenizer.load(tmp_path / "tok.json")
        assert back.merges == t.merges and back.special_tokens == t.special_tokens
        assert back.pattern == t.pattern and back.vocab_size == t.vocab_size
        assert back.encode(CORPUS + ENDOFTEXT, allowed_special="all") == t.encode(CORPUS + ENDOFTEXT, "all")
    data = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert data["format"] == "tinygen-tokenizer" and data["version"] == 1


def test_save_escapes_non_utf8_and_backslashes(tmp_path):
    tok = Tokenizer.train(["\\\\x41 é\\é" * 3, "😀😀"], 270, pattern=r"[\s\S]+")
    tok.save(tmp_path / "t.json")
    text = (tmp_path / "t.json").read_text(encoding="utf-8")
    assert '"\\\\xf0"' in text or '"\\\\x9f"' in text  # a lone byte of 😀 is written \xNN
    back = Tokenizer.load(tmp_path / "t.json")
    assert [back.id_to_bytes(i) for i in range(270)] == [tok.id_to_bytes(i) for i in range(270)]


@given(st.binary(min_size=1, max_size=12))
def test_file_escape_roundtrips(b):
    assert _unescape(_escape(b)) == b
    assert _escape("é\\".encode()) == "é\\\\" and _escape(b"\xc3") == "\\xc3"


def test_load_rejects_corrupt_truncated_foreign(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    good = path.read_text(encoding="utf-8")
    cases = {
        "truncated": good[: len(good) // 2],
        "not a tinygen": json.dumps({"model": {"type": "BPE"}, "version": "1.0"}),
        "version": good.replace('"version": 1', '"version": 99'),
        "both sides must be tokens": good.replace('"merges": [\n  [', '"merges": [\n  ["\\u00ff\\u00ff", "z"], ['),
        "does not match": good.replace(f'"vocab_size": {tok.vocab_size}', '"vocab_size": 7'),
        "byte_order": good.replace('"byte_order": [0, 1,', '"byte_order": [1, 1,'),
        "bad escape": good.replace('"merges": [\n  [', '"merges": [\n  ["\\\\q", "a"], ['),
        "special token": good.replace('"<|pad|>": 399', '"<|pad|>": 3'),
    }
    for expected, content in cases.items():
        path.write_text(content, encoding="utf-8")
        with pytest.raises(TinygenError, match=expected):
            Tokenizer.load(path)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(TinygenError, match="not a tinygen tokenizer"):
        Tokenizer.load(path)


def test_custom_pattern_and_cache_bound(tok):
    t = Tokenizer.train(CORPUS, 300, pattern=r"\w+|\s+|[^\w\s]+")
    assert t.decode(t.encode(CORPUS)) == CORPUS
    t.cache_size = 10
    assert t.encode(CORPUS) == t.encode(CORPUS) and len(t._cache) <= 10
