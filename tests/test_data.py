"""Data: corpus gathering, reading files with clear errors, the split, the token cache, batches."""
import os
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinygen import TinygenError
from tinygen import data as data_mod
from tinygen.data import (DataConfig, Document, RandomBatches, builtin_corpus, digest, encode_documents,
                          fixed_batches, load_token_cache, random_windows, read_documents, split_documents,
                          stdlib_module, stdlib_sources, text_slice, token_cache, token_dtype)
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

DOCS = [Document(f"doc{i}", f"def f{i}(x):\n    return x + {i}  # the number {i}\n" * (i + 1)) for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([d.text for d in DOCS], 280, special_tokens=[ENDOFTEXT])


def test_stdlib_sources_leave_out_tests():
    paths = stdlib_sources()
    assert paths == sorted(paths) and len(paths) > 100
    parts = {p for path in paths for p in path.split(os.sep)}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data"}
    assert not any(os.path.basename(p).startswith(("test_", "_sysconfigdata")) for p in paths)
    assert not any(p.endswith(os.path.join("html", "entities.py")) for p in paths)


def test_builtin_corpus_is_deterministic_and_capped():
    a = builtin_corpus(200_000)
    b = builtin_corpus(200_000)
    assert a == b
    assert sum(len(d.text.encode()) for d in a) <= 200_000
    assert all(d.name.startswith(("stdlib/", "pydoc_data/topics/")) for d in a)
    assert len({d.name for d in a}) == len(a)


def test_excluded_modules_leave_the_rest_of_the_capped_corpus_as_it_was():
    whole = builtin_corpus(300_000)
    modules = sorted({stdlib_module(d.name) for d in whole} - {None})[:3]
    kept = builtin_corpus(300_000, exclude_modules=set(modules))
    assert kept == [d for d in whole if stdlib_module(d.name) not in modules] and len(kept) < len(whole)


@pytest.mark.parametrize("field, value, message", [
    ("corpus_bytes", 0, "DataConfig.corpus_bytes must be a positive integer, got 0"),
    ("tokenizer_bytes", True, "DataConfig.tokenizer_bytes must be a positive integer, got True"),
    ("val_fraction", 1.0, r"DataConfig.val_fraction must be a number in \(0, 1\), got 1.0"),
    ("pattern", "", "DataConfig.pattern must be 'gpt2', 'gpt4' or a regex"),
    ("exclude_modules", " ", "DataConfig.exclude_modules must be a non-empty string"),
])
def test_data_config_names_the_bad_field(field, value, message):
    with pytest.raises(TinygenError, match=message):
        DataConfig(**{field: value})


def test_data_config_takes_numpy_integers_as_train_config_does():
    config = DataConfig(corpus_bytes=np.int64(1000), tokenizer_bytes=np.int32(500), exclude_modules="json, ast")
    assert config.corpus_bytes == 1000 and config.excluded == {"json", "ast"}
    assert DataConfig().excluded == frozenset() and DataConfig(corpus_bytes=None).corpus_bytes is None


def test_builtin_corpus_without_pydoc_data(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # import now raises ImportError
    notices = []
    docs = builtin_corpus(100_000, notice=notices.append)
    assert notices and "sources only" in notices[0]
    assert docs and all(d.name.startswith("stdlib/") for d in docs)


def test_read_documents_files_and_folders(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second")
    (tmp_path / "a.txt").write_text("\ufefffirst" + ENDOFTEXT + "third\n")
    (tmp_path / ".hidden").write_text("never")
    (tmp_path / "b" / "empty.txt").write_text("  \n")
    docs = read_documents([tmp_path])
    assert [d.text for d in docs] == ["first", "third\n", "second"]
    assert docs[0].name.endswith("a.txt#0")
    assert read_documents(tmp_path / "b" / "two.txt") == [Document(str(tmp_path / "b" / "two.txt"), "second")]


def test_undecodable_file_names_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(TinygenError, match=r"bad\.txt: not UTF-8 text: byte 0xff at byte offset 6.*--encoding-errors replace"):
        read_documents([bad])
    assert read_documents([bad], encoding_errors="replace")[0].text == "hello \ufffd world"
    with pytest.raises(TinygenError, match="no such file or folder"):
        read_documents([tmp_path / "missing.txt"])
    with pytest.raises(TinygenError, match="no text"):
        (tmp_path / "blank.txt").write_text("   ")
        read_documents([tmp_path / "blank.txt"])


@given(st.lists(st.text(min_size=1, max_size=50).filter(str.strip), min_size=2, max_size=30, unique=True),
       st.floats(0.01, 0.9))
def test_split_is_a_deterministic_partition(texts, fraction):
    docs = [Document(f"n{i}", t) for i, t in enumerate(texts)]
    train, val = split_documents(docs, fraction)
    assert train and val
    assert sorted(train + val) == sorted(docs)
    assert (train, val) == split_documents(docs, fraction)
    assert [d for d in docs if d in train] == train  # order kept


def test_split_holds_out_about_the_fraction_and_a_lone_document_is_cut():
    docs = [Document(f"n{i}", "x" * 100) for i in range(200)]
    _, val = split_documents(docs, 0.1)
    assert 18 <= len(val) <= 22
    (train,), (val,) = split_documents([Document("one", "line\n" * 100)], 0.1)
    assert train.text + val.text == "line\n" * 100 and val.text == "line\n" * 10


def test_text_slice():
    assert text_slice([Document("a", "hello"), Document("b", "world")], 7) == ["hello", "wo"]
    assert text_slice([Document("a", "h\u00e9llo")], 2) == ["h"]  # never half a character
    assert text_slice(DOCS) == [d.text for d in DOCS]


def test_token_dtype():
    assert token_dtype(2048) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(100_277) == np.uint32


def test_encode_documents_separates_by_endoftext(tok):
    ids = encode_documents(tok, [Document("a", "x = 1"), Document("b", "y" + ENDOFTEXT)])
    assert ids.dtype == np.uint16
    assert ids.tolist() == tok.encode_ordinary("x = 1") + [tok.eot_id] + tok.encode_ordinary("y" + ENDOFTEXT) + [tok.eot_id]
    assert list(ids).count(tok.eot_id) == 2  # a literal <|endoftext|> in text is ordinary text


def test_token_cache_builds_once_and_rebuilds_when_stale(tmp_path, tok, monkeypatch):
    train, val = DOCS[:10], DOCS[10:]
    data = token_cache(tmp_path, tok, train, val)
    assert isinstance(data.train, np.memmap) and not data.train.flags.writeable
    assert data.train.tolist() == encode_documents(tok, train).tolist()
    assert data.info["val_bytes"] == sum(len(d.text.encode()) for d in val)
    assert data.info["corpus_sha256"] == digest(train) + digest(val)

    def fail(*args, **kwargs):
        raise AssertionError("re-encoded a valid cache")

    monkeypatch.setattr(data_mod, "encode_documents", fail)
    again = token_cache(tmp_path, tok, train, val)
    assert np.array_equal(again.train, data.train)
    monkeypatch.undo()
    changed = token_cache(tmp_path, tok, train[:5], val)  # another corpus -> rebuilt
    assert changed.train.size < data.train.size
    other = Tokenizer.train([d.text for d in DOCS], 265, special_tokens=[ENDOFTEXT])
    assert load_token_cache(tmp_path, other) is None  # another tokenizer -> stale
    os.remove(tmp_path / "val.npy")
    assert load_token_cache(tmp_path, tok) is None  # a missing array -> rebuilt


def test_random_windows_are_shifted_pairs():
    ids = np.arange(100, dtype=np.uint16)
    x, y = random_windows(ids, 8, 10, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 10) and x.dtype == np.int64
    assert np.array_equal(y, x + 1) and x.min() >= 0 and y.max() <= 99
    x, y = random_windows(np.arange(11), 50, 10, np.random.default_rng(0))  # exactly one window
    assert (x == np.arange(10)).all() and (y == np.arange(1, 11)).all()
    with pytest.raises(TinygenError, match="shorter than one window"):
        random_windows(np.arange(10), 1, 10, np.random.default_rng(0))


def test_batches_are_a_function_of_the_step():
    ids = np.random.default_rng(1).integers(0, 50, 1000).astype(np.uint16)
    batches = RandomBatches(ids, 4, 16, seed=3)
    first = [batches(s)[0] for s in range(5)]
    backwards = [batches(s)[0] for s in reversed(range(5))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(first, backwards))
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(RandomBatches(ids, 4, 16, seed=4)(0)[0], first[0])
    val = fixed_batches(ids, 3, 4, 16, seed=3)
    assert len(val) == 3 and all(np.array_equal(a[0], b[0]) for a, b in zip(val, fixed_batches(ids, 3, 4, 16, 3)))
