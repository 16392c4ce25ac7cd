"""tiktoken's public surface on tinygen's Tokenizer, with tiktoken's behaviour as the specification.

The expected values below were recorded from tiktoken 0.14 on the very same
vocabulary (`tiktoken.Encoding("t", pat_str=GPT2_PATTERN, mergeable_ranks=RANKS,
special_tokens=SPECIALS)`); `test_same_answers_as_tiktoken` recomputes them
with tiktoken itself when it is installed (it is never a dependency). The
property tests are ported from tiktoken's own test suite (tests/test_encoding.py,
tests/test_offsets.py, tests/test_pickle.py).
"""
import multiprocessing
import operator
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygen.errors import TinygenError
from tinygen.tokenizer import ENDOFTEXT, GPT2_PATTERN, TokenNotFound, Tokenizer
from tinygen.tokenizer.split import Splitter

RANKS = {**{bytes([b]): b for b in range(256)}, b"ab": 256, b"abc": 257}
SPECIALS = {ENDOFTEXT: 300, "<|x|>": 258}  # ids 259..299 unused, as tiktoken allows


def _numpy_bool_is_an_index():
    """np.bool_.__index__ is deprecated, then gone (NumPy 2.3+); tiktoken and tinygen both follow it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return operator.index(np.bool_(True)) == 1
        except TypeError:
            return False


BOOL_IS_INDEX = _numpy_bool_is_an_index()
TEXT = ("The quick brown fox: naïve café, 日本語, 😀👍🏽, Ελληνικά.\n"
        "def f(x):\n    return x ** 2  # 12345\r\n") * 4


@pytest.fixture(scope="module")
def small():
    return Tokenizer(RANKS, "gpt2", SPECIALS)


@pytest.fixture(scope="module")
def trained():
    """A vocabulary with multi-byte tokens that split UTF-8 characters, and special tokens."""
    return Tokenizer.train(TEXT, 330, pattern="gpt4", special_tokens=[ENDOFTEXT, "<|fim_prefix|>"])


# ---- the answers tiktoken 0.14 gives on the same vocabulary ---------------------------------------
# (name, call, expected value or exception type); a few differ on purpose: see DIFFERENCES.
CASES = [
    ("decode strict", lambda e: e.decode([195], errors="strict"), UnicodeDecodeError),
    ("decode ignore", lambda e: e.decode([195, 97], errors="ignore"), "a"),
    ("decode replace", lambda e: e.decode([195, 97]), "\ufffda"),
    ("decode backslashreplace", lambda e: e.decode([195, 97], errors="backslashreplace"), "\\xc3a"),
    ("decode bad handler", lambda e: e.decode([195, 97], errors="bogus"), LookupError),
    ("decode float", lambda e: e.decode([1.0]), TypeError),
    ("decode str id", lambda e: e.decode(["a"]), TypeError),
    ("decode None id", lambda e: e.decode([None]), TypeError),
    ("decode np.float64 id", lambda e: e.decode([np.float64(97)]), TypeError),
    ("decode np.bool_ id", lambda e: e.decode([np.bool_(True)]), "\x01" if BOOL_IS_INDEX else TypeError),
    ("decode float array", lambda e: e.decode(np.array([97.0, 98.0])), TypeError),
    ("decode bool array", lambda e: e.decode(np.array([True, False])), TypeError),
    ("decode 2-D array", lambda e: e.decode(np.array([[97, 98]])), TypeError),
    ("decode True", lambda e: e.decode([True, 98]), "\x01b"),
    ("decode np.int64", lambda e: e.decode([np.int64(97)]), "a"),
    ("decode uint8 array", lambda e: e.decode(np.array([97, 98], dtype=np.uint8)), "ab"),
    ("decode tuple", lambda e: e.decode((97, 98)), "ab"),
    ("decode bytes", lambda e: e.decode(b"ab"), "ab"),
    ("decode str", lambda e: e.decode("ab"), TypeError),
    ("decode int", lambda e: e.decode(97), TypeError),
    ("decode unused id", lambda e: e.decode([299]), KeyError),
    ("decode_bytes empty", lambda e: e.decode_bytes([]), b""),
    ("decode_bytes special", lambda e: e.decode_bytes([256, 300]), b"ab<|endoftext|>"),
    ("decode_single_token_bytes special", lambda e: e.decode_single_token_bytes(300), b"<|endoftext|>"),
    ("decode_single_token_bytes unused", lambda e: e.decode_single_token_bytes(299), KeyError),
    ("decode_single_token_bytes float", lambda e: e.decode_single_token_bytes(1.0), TypeError),
    ("decode_single_token_bytes True", lambda e: e.decode_single_token_bytes(True), b"\x01"),
    ("decode_single_token_bytes np.int64", lambda e: e.decode_single_token_bytes(np.int64(5)), b"\x05"),
    ("encode_single_token str", lambda e: e.encode_single_token("abc"), 257),
    ("encode_single_token bytes", lambda e: e.encode_single_token(b"abc"), 257),
    ("encode_single_token special", lambda e: e.encode_single_token("<|x|>"), 258),
    ("encode_single_token special bytes", lambda e: e.encode_single_token(b"<|endoftext|>"), 300),
    ("encode_single_token missing", lambda e: e.encode_single_token("zz"), KeyError),
    ("encode_single_token bytearray", lambda e: e.encode_single_token(bytearray(b"ab")), TypeError),
    ("encode_single_token int", lambda e: e.encode_single_token(5), TypeError),
    ("encode_single_token surrogate", lambda e: e.encode_single_token("\ud800"), UnicodeEncodeError),
    ("decode_tokens_bytes", lambda e: e.decode_tokens_bytes([256, 300, 195]), [b"ab", b"<|endoftext|>", b"\xc3"]),
    ("decode_with_offsets", lambda e: e.decode_with_offsets([256, 32, 300]), ("ab <|endoftext|>", [0, 2, 3])),
    ("decode_with_offsets split char", lambda e: e.decode_with_offsets([104, 195, 169, 33]), ("hé!", [0, 1, 1, 2])),
    ("decode_with_offsets invalid", lambda e: e.decode_with_offsets([195]), UnicodeDecodeError),
    ("decode_with_offsets empty", lambda e: e.decode_with_offsets([]), ("", [])),
    ("token_byte_values ends", lambda e: e.token_byte_values()[:2] + e.token_byte_values()[-2:],
     [b"\x00", b"\x01", b"\xfe", b"\xff"]),
    ("token_byte_values middle", lambda e: e.token_byte_values()[97:100], [b"a", b"ab", b"abc"]),
    ("token_byte_values size", lambda e: len(e.token_byte_values()), 258),
    ("is_special_token special", lambda e: e.is_special_token(300), True),
    ("is_special_token byte", lambda e: e.is_special_token(5), False),
    ("is_special_token unknown", lambda e: e.is_special_token(999), False),
    ("n_vocab", lambda e: e.n_vocab, 301),
    ("max_token_value", lambda e: e.max_token_value, 300),
    ("eot_token", lambda e: e.eot_token, 300),
    ("special_tokens_set", lambda e: e.special_tokens_set, {ENDOFTEXT, "<|x|>"}),
    ("encode_to_numpy", lambda e: e.encode_to_numpy("abc ab<|x|>", allowed_special="all").tolist(), [257, 32, 256, 258]),
    ("encode_to_numpy dtype", lambda e: e.encode_to_numpy("abc").dtype, np.dtype(np.uint32)),
    ("encode_to_numpy disallowed", lambda e: e.encode_to_numpy("<|x|>"), ValueError),
    ("encode_ordinary_batch", lambda e: e.encode_ordinary_batch(["abc", "ab<|x|>"]), [[257], [256, 60, 124, 120, 124, 62]]),
    ("encode_batch", lambda e: e.encode_batch(["abc", "ab<|x|>"], allowed_special="all"), [[257], [256, 258]]),
    ("encode_batch disallowed", lambda e: e.encode_batch(["abc", "ab<|x|>"]), ValueError),
    ("encode_batch no threads", lambda e: e.encode_batch(["abc"], num_threads=0), ValueError),
    ("encode_batch one thread", lambda e: e.encode_batch(["abc", "ab"], num_threads=1), [[257], [256]]),
    ("encode_batch empty", lambda e: e.encode_batch([]), []),
    ("decode_batch", lambda e: e.decode_batch([[256], [195, 97]]), ["ab", "\ufffda"]),
    ("decode_batch strict", lambda e: e.decode_batch([[256], [195, 97]], errors="strict"), UnicodeDecodeError),
    ("decode_bytes_batch", lambda e: e.decode_bytes_batch([[256], [195, 97]]), [b"ab", b"\xc3a"]),
    ("encode allowed non-special", lambda e: e.encode("abc foo", allowed_special={"foo"}), [257, 32, 102, 111, 111]),
    ("encode disallowed non-special", lambda e: e.encode("abc foo", disallowed_special={"foo"}), ValueError),
    ("encode special", lambda e: e.encode("ab <|endoftext|>", allowed_special={ENDOFTEXT}), [256, 32, 300]),
    ("encode bytes", lambda e: e.encode(b"abc"), TypeError),
    ("encode_ordinary None", lambda e: e.encode_ordinary(None), TypeError),
    ("encode surrogate", lambda e: e.encode("a\ud800"), [97, 239, 191, 189]),
]

# Where tinygen answers differently on purpose (docs/tokenizer.md, "Differences from tiktoken"):
# name -> tinygen's answer, tiktoken's answer
DIFFERENCES = {
    "decode negative id": (lambda e: e.decode([-1]), KeyError, OverflowError),
    "decode id >= 2**32": (lambda e: e.decode([2**32]), KeyError, OverflowError),
    "decode generator": (lambda e: e.decode(iter([97, 98])), "ab", TypeError),
    "is_special_token np.int64": (lambda e: e.is_special_token(np.int64(300)), True, AssertionError),
    "encode positional": (lambda e: e.encode("ab<|x|>", "all"), [256, 258], TypeError),
    "encode allowed list": (lambda e: e.encode("ab<|x|>", allowed_special=["<|x|>"]), [256, 258], TypeError),
    "encode allowed str": (lambda e: e.encode("ab<|x|>", allowed_special="<|x|>"), ValueError, TypeError),
}


def outcome(call, enc):
    try:
        return call(enc)
    except Exception as e:  # noqa: BLE001 - the exception is the answer being compared
        return e


def matches(got, expected):
    if isinstance(expected, type) and issubclass(expected, BaseException):
        return isinstance(got, expected)
    return not isinstance(got, BaseException) and type(got) is type(expected) and got == expected


@pytest.mark.parametrize("name, call, expected", CASES, ids=[c[0] for c in CASES])
def test_tiktoken_answers(small, name, call, expected):
    got = outcome(call, small)
    assert matches(got, expected), f"{name}: got {got!r}, tiktoken gives {expected!r}"


@pytest.mark.parametrize("name", sorted(DIFFERENCES))
def test_documented_differences(small, name):
    call, ours, _ = DIFFERENCES[name]
    got = outcome(call, small)
    assert matches(got, ours), f"{name}: got {got!r}, expected {ours!r}"


def test_unknown_ids_and_bytes_are_both_key_and_value_errors(small):
    for call in (lambda: small.decode([299]), lambda: small.encode_single_token("zz"),
                 lambda: small.decode_single_token_bytes(-1)):
        with pytest.raises(TokenNotFound) as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, TinygenError)
        assert not str(info.value).startswith("'")  # the message as written, not KeyError's repr


def test_eot_token_without_endoftext_raises_key_error():
    tok = Tokenizer(RANKS, "gpt2")
    assert tok.eot_id is None
    with pytest.raises(KeyError, match="no <|endoftext|>"):
        tok.eot_token


def test_mergeable_ranks_is_the_read_only_rank_table(small):
    assert dict(small.mergeable_ranks) == RANKS and small.mergeable_ranks[b"abc"] == 257
    with pytest.raises(TypeError):
        small.mergeable_ranks[b"zz"] = 1
    assert ENDOFTEXT.encode() not in small.mergeable_ranks  # special tokens are apart, as in tiktoken


# ---- tiktoken's own property tests, on tinygen ---------------------------------------------------
def test_single_token_roundtrip(small, trained):
    # tiktoken tests/test_encoding.py::test_single_token_roundtrip
    for enc in (small, trained):
        seen = 0
        for token in range(enc.n_vocab):
            try:
                token_bytes = enc.decode_single_token_bytes(token)
            except KeyError:
                continue
            assert enc.encode_single_token(token_bytes) == token
            seen += 1
        assert seen == len(enc.mergeable_ranks) + len(enc.special_tokens)


@given(st.text())
def test_hyp_special_ordinary(trained, text):
    # tiktoken tests/test_encoding.py::test_hyp_special_ordinary
    assert trained.encode_ordinary(text) == trained.encode(text, disallowed_special=())


@given(st.lists(st.lists(st.sampled_from(list("ab é日😀\n") + [ENDOFTEXT]), max_size=12).map("".join), max_size=6))
def test_hyp_batch_roundtrip(trained, batch):
    # tiktoken tests/test_encoding.py::test_hyp_batch_roundtrip
    encoded = trained.encode_batch(batch, allowed_special="all")
    assert encoded == [trained.encode(t, allowed_special="all") for t in batch]
    assert trained.decode_batch(encoded) == batch
    assert trained.decode_bytes_batch(encoded, num_threads=2) == [t.encode() for t in batch]
    assert trained.encode_ordinary_batch(batch, num_threads=3) == [trained.encode_ordinary(t) for t in batch]


def _token_offsets_reference(enc, tokens):
    """tiktoken tests/test_offsets.py: the offset of token i is the common prefix of the
    text and the strictly decoded prefix of tokens[:i] (ignoring incomplete characters)."""
    text = enc.decode(tokens, errors="strict")
    res = []
    for i in range(len(tokens)):
        prefix = enc.decode(tokens[:i], errors="ignore")
        n = 0
        while n < len(text) and n < len(prefix) and text[n] == prefix[n]:
            n += 1
        res.append(n)
    return res


@given(st.data())
def test_hyp_offsets(trained, data):
    # tiktoken tests/test_offsets.py::test_hyp_offsets
    tokens = data.draw(st.lists(st.integers(0, trained.n_vocab - 1), min_size=1, max_size=20))
    tokens = trained.encode(trained.decode(tokens, errors="ignore"), allowed_special="all")
    text, offsets = trained.decode_with_offsets(tokens)
    assert text == trained.decode(tokens) and offsets == _token_offsets_reference(trained, tokens)


def test_offsets_of_tokens_that_split_characters(trained):
    text = "naïve 日本語 😀"
    tokens = trained.encode(text)
    assert any(0x80 <= b[0] < 0xC0 for b in trained.decode_tokens_bytes(tokens))  # some token starts mid-character
    assert trained.decode_with_offsets(tokens) == (text, _token_offsets_reference(trained, tokens))
    assert trained.decode_with_offsets(np.array(tokens)) == trained.decode_with_offsets(tokens)


def test_encode_to_numpy_equals_encode(trained):
    arr = trained.encode_to_numpy(TEXT + ENDOFTEXT, allowed_special="all")
    assert arr.dtype == np.uint32 and arr.tolist() == trained.encode(TEXT + ENDOFTEXT, allowed_special="all")


# ---- pickling and processes ----------------------------------------------------------------------
def test_pickle_round_trip(trained):
    # tiktoken tests/test_pickle.py: a custom encoding with its own special token
    custom = trained.with_special_tokens({"<|pickle|>": 100_000})
    custom.encode(TEXT)  # fill the cache: it is not pickled
    back = pickle.loads(pickle.dumps(custom))
    assert back._cache == {} and back.merges == custom.merges and back.pattern == custom.pattern
    assert back.encode(TEXT) == custom.encode(TEXT)
    assert back.encode("<|pickle|>", allowed_special="all") == custom.encode("<|pickle|>", allowed_special="all") \
        == [100_000]
    assert len(pickle.dumps(custom)) < 2 * len(pickle.dumps(dict(custom.mergeable_ranks)))
    custom.cache_size = 7
    assert pickle.loads(pickle.dumps(custom)).cache_size == 7


def test_splitter_pickles_as_its_arguments():
    split = Splitter(GPT2_PATTERN, block=8, possessive=False)
    back = pickle.loads(pickle.dumps(split))
    assert (back.pattern, back.block, back.possessive) == (GPT2_PATTERN, 8, False)
    assert back(TEXT) == split(TEXT)


def test_tokenizer_in_a_process_pool(trained):
    texts = [TEXT[k:] for k in range(0, 200, 25)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # spawn: nothing is inherited, all is pickled
        assert pool.map(trained.encode_ordinary, texts) == [trained.encode_ordinary(t) for t in texts]


def test_threads_share_the_cache_safely(trained):
    tok = pickle.loads(pickle.dumps(trained))
    tok.cache_size = 5  # the cache is replaced often while other threads read it
    texts = [TEXT[k : k + 90] for k in range(0, len(TEXT), 7)]
    expected = [trained.encode(t) for t in texts]
    for _ in range(3):
        assert tok.encode_batch(texts, num_threads=4) == expected


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_num_threads_is_checked(small, bad):
    with pytest.raises(TinygenError, match="num_threads"):
        small.encode_batch(["a", "b"], num_threads=bad)


# ---- special tokens added to a trained tokenizer ------------------------------------------------
def test_with_special_tokens(trained, tmp_path):
    chat = trained.with_special_tokens(["<|im_start|>", "<|im_end|>"])
    n = trained.n_vocab
    assert chat.special_tokens == {**trained.special_tokens, "<|im_start|>": n, "<|im_end|>": n + 1}
    assert chat.n_vocab == n + 2 and trained.n_vocab == n  # the original is unchanged
    text = "<|im_start|>user\n" + TEXT + "<|im_end|>"
    ids = chat.encode(text, allowed_special="all")
    assert ids == [n] + trained.encode("user\n" + TEXT) + [n + 1] and chat.decode(ids) == text
    assert chat.encode_ordinary(TEXT) == trained.encode_ordinary(TEXT)
    with pytest.raises(ValueError, match="<|im_start|>"):
        chat.encode(text)
    chat.save(tmp_path / "chat.json")
    assert Tokenizer.load(tmp_path / "chat.json").encode(text, allowed_special="all") == ids
    # tiktoken's way: a new tokenizer from the rank table, the pattern and more special tokens
    same = Tokenizer(trained.mergeable_ranks, trained.pattern, {**trained.special_tokens, "<|im_start|>": n})
    assert same.encode("<|im_start|>x", allowed_special="all") == [n] + trained.encode("x")
    assert trained.with_special_tokens({"<|sep|>": 5000}).encode_single_token("<|sep|>") == 5000


def test_with_special_tokens_rejects_clashes(trained):
    with pytest.raises(TinygenError, match="already in this tokenizer"):
        trained.with_special_tokens([ENDOFTEXT])
    with pytest.raises(TinygenError, match="unused non-negative id"):
        trained.with_special_tokens({"<|new|>": 65})


# ---- directly against tiktoken, when it is installed -------------------------------------------
def test_same_answers_as_tiktoken(small, trained):
    tiktoken = pytest.importorskip("tiktoken")
    theirs = tiktoken.Encoding("t", pat_str=GPT2_PATTERN, mergeable_ranks=RANKS, special_tokens=SPECIALS)
    for name, call, expected in CASES:
        got = outcome(call, theirs)
        assert matches(got, expected), f"{name}: tiktoken {tiktoken.__version__} gives {got!r}, recorded {expected!r}"
    for name, (call, ours, tiktokens) in DIFFERENCES.items():
        assert matches(outcome(call, theirs), tiktokens), name
    big = tiktoken.Encoding("trained", pat_str=trained.pattern, mergeable_ranks=dict(trained.mergeable_ranks),
                            special_tokens=trained.special_tokens)
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = rng.integers(0, trained.n_vocab, rng.integers(1, 12)).tolist()
        text = trained.decode(tokens, errors="ignore")
        ids = big.encode(text, allowed_special="all")
        assert trained.encode(text, allowed_special="all") == ids
        assert trained.decode_with_offsets(ids) == big.decode_with_offsets(ids)
        assert trained.decode_tokens_bytes(tokens) == big.decode_tokens_bytes(tokens)
        for errors in ("replace", "ignore", "backslashreplace"):
            assert trained.decode(tokens, errors=errors) == big.decode(tokens, errors=errors)
    assert trained.token_byte_values() == big.token_byte_values()
    assert pickle.loads(pickle.dumps(big)).encode(TEXT) == pickle.loads(pickle.dumps(trained)).encode(TEXT)
