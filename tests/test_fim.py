"""Fill-in-the-middle: the cut and the two orders (every arrangement puts the same text back
together), windows and batches (rate 0 is plain next-token batches, bit for bit), fine-tuning
examples, infill prompts, and `tinygen pretrain --fim-rate` / `tinygen sample --suffix` end to end."""
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinygen import TinygenError
from tinygen.checkpoint import load_model
from tinygen.cli import main
from tinygen.data import DataConfig, RandomBatches
from tinygen.fim import (FIM_TOKENS, SPM_RATE, FimBatches, arrange, check_rate, fim_window, infill_prompt,
                         rearrange, split_points)
from tinygen.finetuning.tasks import Example, encode_examples, fim_encode_examples
from tinygen.loss import IGNORE
from tinygen.pretrain import special_tokens
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

from shared import word_corpus

PRE, MID, SUF, EOT = 256, 257, 258, 259
BYTES = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", dict(zip(FIM_TOKENS + (ENDOFTEXT,), (PRE, MID, SUF, EOT))))


def pieces(ids):
    """(prefix, middle, suffix) text of one PSM or SPM arrangement."""
    ids = list(ids)
    decode = lambda part: BYTES.decode(part)  # noqa: E731
    if ids[1] == SUF:  # SPM: <pre> <suf> suffix <mid> prefix+middle
        m = ids.index(MID)
        return None, decode(ids[m + 1:]), decode(ids[2:m])
    s, m = ids.index(SUF), ids.index(MID)
    return decode(ids[1:s]), decode(ids[m + 1:]), decode(ids[s + 1:m])


@given(n=st.integers(0, 50), seed=st.integers(0, 2**16))
def test_split_points_are_ordered_and_in_range(n, seed):
    i, j = split_points(n, np.random.default_rng(seed))
    assert 0 <= i <= j <= n


@given(text=st.text(min_size=0, max_size=40), seed=st.integers(0, 2**16))
def test_every_arrangement_puts_the_document_back_together(text, seed):
    ids, n_context = rearrange(BYTES, text, np.random.default_rng(seed))
    prefix, rest, suffix = pieces(ids)
    assert ids.count(PRE) == ids.count(MID) == ids.count(SUF) == 1 and EOT not in ids
    assert (rest if prefix is None else prefix + rest) + suffix == text
    assert ids[n_context - 1] == MID or ids[1] == SUF  # the context ends at <|fim_middle|> (PSM) or in SPM's prefix


def test_psm_and_spm_orders_and_the_spm_rate():
    assert arrange(BYTES, "ab", "c", "d", spm=False) == ([PRE, 97, 98, SUF, 100, MID, 99], 6)
    assert arrange(BYTES, "ab", "c", "d", spm=True) == ([PRE, SUF, 100, MID, 97, 98, 99], 6)
    rng = np.random.default_rng(0)
    spm = [rearrange(BYTES, "some text", rng)[0][1] == SUF for _ in range(2000)]
    # <pre> <suf> second: SPM, or PSM with an empty prefix (the smaller of two cuts in 0..9 is 0)
    expected = SPM_RATE + (1 - SPM_RATE) * (1 - (9 / 10) ** 2)
    assert abs(np.mean(spm) - expected) < 5 * np.sqrt(0.25 / 2000)
    assert infill_prompt(BYTES, "def f(", "):") == [PRE, *b"def f(", SUF, *b"):", MID]
    assert infill_prompt(BYTES, "a", "b", spm=True) == [PRE, SUF, 98, MID, 97]


def test_a_window_keeps_its_documents_and_separators():
    text = [b"first document", b"second one", b"third"]
    window = np.array(list(text[0]) + [EOT] + list(text[1]) + [EOT] + list(text[2]))
    assert np.array_equal(fim_window(BYTES, window, 0.0, np.random.default_rng(0), EOT), window)
    out = fim_window(BYTES, window, 1.0, np.random.default_rng(1), EOT)
    assert len(out) == len(window)  # cut back to T + 1 (three sentinels per fragment were added)
    real = out[out != IGNORE]
    documents = np.split(real, np.flatnonzero(real == EOT))
    first, rest, suffix = pieces(documents[0])
    assert (rest if first is None else first + rest) + suffix == "first document"
    assert documents[1][0] == EOT and PRE in documents[1]
    # a fragment cut inside a UTF-8 character is left as it is
    broken = np.array(list("é".encode()) + list(b"abc"))[1:]
    assert np.array_equal(fim_window(BYTES, broken, 1.0, np.random.default_rng(0), EOT), broken)


def test_fim_batches_at_rate_0_are_randombatches_and_at_rate_1_rearranged():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(97, 123, rng.integers(5, 40))) + [EOT] for _ in range(200)]
    ids = np.array([t for d in docs for t in d])
    plain = RandomBatches(ids, 4, 32, seed=5)
    zero, one = FimBatches(ids, 4, 32, 5, BYTES, 0.0), FimBatches(ids, 4, 32, 5, BYTES, 1.0)
    for step in (0, 7):
        assert all(np.array_equal(a, b) for a, b in zip(zero(step), plain(step)))
        x, y = one(step)
        assert x.shape == y.shape == (4, 32) and np.array_equal(x[:, 1:][y[:, :-1] >= 0], y[:, :-1][y[:, :-1] >= 0])
        assert (x == PRE).any() and all(np.array_equal(a, b) for a, b in zip(one(step), (x, y)))
        assert not (x == IGNORE).any()
    short = FimBatches(np.array(list(b"ab") * 40), 2, 8, 0, BYTES, 1.0)(0)  # one long document: no EOT at all
    assert (short[0] == PRE).any()


@pytest.mark.parametrize("rate", [-0.1, 1.5, True, "0.5"])
def test_rates_outside_zero_one_are_refused(rate):
    with pytest.raises(TinygenError, match="fim_rate must be a number in \\[0, 1\\]"):
        check_rate(rate) if not isinstance(rate, float) else DataConfig(fim_rate=rate)
    with pytest.raises(TinygenError, match="fim_rate must be a number in \\[0, 1\\]"):
        check_rate(rate)


def test_the_objective_adds_fim_tokens_before_endoftext_only_when_the_rate_is_positive():
    assert special_tokens(DataConfig()) == [ENDOFTEXT]  # today's tokenizer, bit for bit
    assert special_tokens(DataConfig(fim_rate=0.5)) == list(FIM_TOKENS) + [ENDOFTEXT]
    with pytest.raises(TinygenError, match="fim_rate must be 0 with objective 'mlm'"):
        DataConfig(objective="mlm", fim_rate=0.1)


def plain(encoded):
    return [(e.ids.tolist(), e.n_prompt, e.task) for e in encoded]


def test_fim_fine_tuning_examples_learn_the_middle():
    examples = [Example("name:\nReturn the sum\n=>", " add", "name"), Example("args:\n=>", " a, b", "args")] * 20
    assert plain(fim_encode_examples(examples, BYTES, 64, 0.0)) == plain(encode_examples(examples, BYTES, 64))
    encoded = fim_encode_examples(examples, BYTES, 64, 1.0, seed=3)
    assert plain(encoded) == plain(fim_encode_examples(examples, BYTES, 64, 1.0, seed=3))  # fixed by the seed
    for e, example in zip(encoded, examples):
        ids = e.ids.tolist()
        assert ids[-1] == EOT and MID in ids[:e.n_prompt]
        prefix, rest, suffix = pieces(ids[:-1])
        assert (rest if prefix is None else prefix + rest) + suffix == example.prompt + example.completion
        assert e.task == example.task
    too_long = fim_encode_examples(examples, BYTES, 20, 1.0)  # 3 sentinels no longer fit: plain examples
    assert all(PRE not in e.ids for e in too_long if len(e.ids) > 17)


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_corpus(tmp_path_factory.mktemp("corpus"))


SMALL = ["--preset", "tiny", "--vocab-size", "300", "--block-size", "32", "--n-layer", "1", "--n-embd", "32",
         "--batch-size", "4", "--eval-batches", "1", "--eval-interval", "3", "--checkpoint-interval", "2",
         "--samples", "0"]


def test_pretrain_with_fim_then_infill(corpus, tmp_path, capsys):
    fim, plain = tmp_path / "fim", tmp_path / "plain"
    assert main(["pretrain", *SMALL, "--data", corpus, "--out", str(fim), "--max-steps", "6", "--fim-rate", "0.5"]) == 0
    tok = Tokenizer.load_dir(fim)
    assert list(tok.special_tokens) == list(FIM_TOKENS) + [ENDOFTEXT] and tok.eot_id == tok.vocab_size - 1
    assert load_model(fim).config.causal and json.loads((fim / "config.json").read_text())["model_type"] == "gpt2"
    # rate 0 with the same tokenizer: the same validation batches (plain text), so the same step-0 loss
    assert main(["pretrain", *SMALL, "--data", corpus, "--out", str(plain), "--max-steps", "6",
                 "--tokenizer", str(fim)]) == 0
    rows = [json.loads(line) for line in (fim / "metrics.jsonl").read_text().splitlines()]
    rows0 = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_loss"] == rows0[0]["val_loss"] and rows[1]["train_loss"] != rows0[1]["train_loss"]
    # resuming a FIM run reproduces the uninterrupted one
    assert main(["pretrain", *SMALL, "--data", corpus, "--out", str(tmp_path / "half"), "--max-steps", "3",
                 "--lr-decay-steps", "6", "--fim-rate", "0.5"]) == 0
    assert main(["pretrain", "--resume", str(tmp_path / "half"), "--max-steps", "6", "--samples", "0"]) == 0
    a, b = load_model(fim).params, load_model(tmp_path / "half").params
    assert all(np.array_equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["sample", "--model", str(fim), "--prompt", "def f(", "--suffix", "):\n", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("def f(") and shown.endswith("):\n\n")
    assert main(["sample", "--model", str(plain), "--prompt", "def f(", "--suffix", "):"]) == 0  # same tokenizer
    capsys.readouterr()
    no_fim = Tokenizer(tok.mergeable_ranks, tok.pattern, {ENDOFTEXT: tok.vocab_size - 1})  # same size, no FIM tokens
    no_fim.save(tmp_path / "t.json")
    assert main(["pretrain", *SMALL, "--data", corpus, "--out", str(tmp_path / "x"), "--fim-rate", "0.5",
                 "--tokenizer", str(tmp_path / "t.json")]) == 2
    assert "has no <|fim_prefix|> special token" in capsys.readouterr().err
    # fine-tuning data takes --fim-rate too, on a base that has the FIM tokens
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}: value", "completion": f" data {i}"}) + "\n" for i in range(30)))
    common = ["--data", str(data), "--method", "full", "--max-steps", "2", "--batch-size", "4", "--eval-examples", "1",
              "--fim-rate", "0.5"]
    assert main(["finetune", "--base", str(fim), "--out", str(tmp_path / "ft"), *common]) == 0
    assert main(["finetune", "--base", str(tmp_path / "x-base"), "--out", str(tmp_path / "ft2"), *common]) == 2
    Tokenizer.load_dir(plain)  # plain was pretrained with the FIM tokenizer; a base without the tokens:
    no_fim.save(plain / "tokenizer.json")
    assert main(["finetune", "--base", str(plain), "--out", str(tmp_path / "ft3"), *common]) == 2
    assert "has no <|fim_prefix|> special token" in capsys.readouterr().err
    assert main(["finetune", "--base", str(fim), "--out", str(tmp_path / "ft4"), *common[:-1], "1.5"]) == 2
    assert "FinetuneConfig.fim_rate must be a number in [0, 1], got 1.5" in capsys.readouterr().err


def test_middle_losses_score_the_same_middle_tokens_in_every_mode():
    from tinygen import GPT, GPTConfig
    from tinygen.fim import middle_losses, middle_sequence

    model = GPT(GPTConfig(vocab_size=260, block_size=24, n_layer=1, n_head=2, n_embd=16, dtype="float64"), seed=0)
    triples = [([97, 98], [99, 100, 101], [102]), ([], [103], [104, 105]), ([106], [107, 108], [])]
    ids = (PRE, MID, SUF)
    for mode in ("psm", "spm", "prefix"):
        stats = middle_losses(model, triples, ids, EOT, mode, batch_size=2)
        for (p, m, s), (total, count) in zip(triples, stats):
            seq, start = middle_sequence(p, m, s, ids, EOT, mode)
            first = max(start, 1)
            x, y = np.array([seq[:-1]]), np.full((1, len(seq) - 1), IGNORE)
            y[0, first - 1:start + len(m) - 1] = seq[first:start + len(m)]
            assert count == (y >= 0).sum() == len(m) - (start == 0)
            if count:
                assert total == pytest.approx(model.loss(x, y) * count, rel=1e-10)
    with pytest.raises(TinygenError, match="mode must be one of psm, spm, prefix"):
        middle_losses(model, triples, ids, EOT, "mps")
