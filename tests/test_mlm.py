"""Masked language modelling: BERT's masking recipe (counts, proportions, what is never
touched), batches as a pure function of the step, fill_mask's ranking and refusals, and
`tinygen pretrain --objective mlm` end to end (a bidirectional model that resumes bit for bit)."""
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from tinygen import GPT, GPTConfig, TinygenError
from tinygen.checkpoint import load_model
from tinygen.cli import main
from tinygen.data import RandomBatches
from tinygen.layers import softmax
from tinygen.loss import IGNORE
from tinygen.mlm import (MASK, MASK_RATE, MaskedBatches, fill_in, fill_mask, fixed_masked_batches, mask_tokens,
                         masking_ids)
from tinygen.pretrain import special_tokens
from tinygen.data import DataConfig
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

from shared import word_corpus

MASK_ID, EOT = 256, 257
BYTES = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {MASK: MASK_ID, ENDOFTEXT: EOT})
ORDINARY = np.arange(256)


# ------------------------------------------------------------------ the recipe
@given(ids=hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 40)), elements=st.integers(0, 257)),
       seed=st.integers(0, 2**16))
def test_masking_invariants(ids, seed):
    """Per row exactly max(1, round(0.15 n)) of the n non-special positions are chosen (none if n = 0);
    targets are the original tokens there and -1 elsewhere; elsewhere x is the input; specials
    are never chosen; replacements are <|mask|> or an ordinary token."""
    x, y = mask_tokens(ids, np.random.default_rng(seed), MASK_ID, ORDINARY, (MASK_ID, EOT))
    eligible = ~np.isin(ids, [MASK_ID, EOT])
    chosen = y != IGNORE
    n = eligible.sum(axis=1)
    expected = np.where(n > 0, np.maximum(1, np.round(MASK_RATE * n)), 0)
    assert np.array_equal(chosen.sum(axis=1), expected)
    assert not (chosen & ~eligible).any()
    assert np.array_equal(y[chosen], ids[chosen]) and np.array_equal(x[~chosen], ids[~chosen])
    changed = chosen & (x != ids)
    assert np.isin(x[changed], np.append(ORDINARY, MASK_ID)).all()


def test_masking_proportions_are_berts():
    """Of the chosen positions 80% become <|mask|>, 10% a random token, 10% stay (binomial
    bounds of 5 standard deviations over ~19,000 chosen positions)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, (1000, 128))  # ids < 200: a random replacement is told apart from a kept one
    x, y = mask_tokens(ids, rng, MASK_ID, np.arange(200, 256), ())  # random tokens drawn from 200..255
    chosen = y != IGNORE
    assert chosen.sum() == 1000 * 19  # round(0.15 * 128)
    masked, random_, kept = (x[chosen] == MASK_ID).mean(), (x[chosen] >= 200).mean() - (x[chosen] == MASK_ID).mean(), \
        (x[chosen] == ids[chosen]).mean()
    sd = lambda p: 5 * np.sqrt(p * (1 - p) / chosen.sum())  # noqa: E731
    assert abs(masked - 0.8) < sd(0.8) and abs(random_ - 0.1) < sd(0.1) and abs(kept - 0.1) < sd(0.1)
    assert abs(masked + random_ + kept - 1) < 1e-12


def test_masked_batches_are_a_pure_function_of_the_step_over_randombatches_windows():
    ids = np.random.default_rng(1).integers(0, 256, 5000)
    batches = MaskedBatches(ids, 4, 32, seed=7, mask_id=MASK_ID, ordinary_ids=ORDINARY, special_ids=(MASK_ID, EOT))
    x, y = batches(3)
    x2, y2 = batches(3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and x.shape == y.shape == (4, 32)
    windows, _ = RandomBatches(ids, 4, 32, seed=7)(3)  # the same windows, unshifted
    assert np.array_equal(np.where(y >= 0, y, x), np.where(y >= 0, windows, x))
    assert np.array_equal(x[y < 0], windows[y < 0])
    assert not np.array_equal(batches(4)[1], y)
    val = fixed_masked_batches(ids, 2, 4, 32, 7, MASK_ID, ORDINARY, (MASK_ID, EOT))
    assert len(val) == 2 and all((v[1] >= 0).any() for v in val)


def test_the_objective_adds_its_special_token_before_endoftext():
    assert special_tokens(DataConfig(objective="mlm")) == [MASK, ENDOFTEXT]
    assert masking_ids(BYTES)[0] == MASK_ID and MASK_ID not in masking_ids(BYTES)[1]
    with pytest.raises(TinygenError, match="no <\\|mask\\|> special token"):
        masking_ids(Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256}))


# ------------------------------------------------------------------ fill_mask
def mlm_model(seed=0, block=16):
    return GPT(GPTConfig(vocab_size=258, block_size=block, n_layer=1, n_head=2, n_embd=16, causal=False), seed=seed)


def test_fill_mask_ranks_the_softmax_of_each_mask_position():
    model = mlm_model()
    text = "a<|mask|>c<|mask|>"
    found = fill_mask(model, BYTES, text, top_k=4)
    logits = model.forward(np.array([BYTES.encode(text, allowed_special="all")]))[0]
    assert len(found) == 2
    for position, candidates in zip((1, 3), found):
        probs = softmax(logits[position, :256].astype(np.float64))  # special tokens are no candidates
        best = np.argsort(-probs, kind="stable")[:4]
        assert [c.id for c in candidates] == best.tolist()
        assert [c.probability for c in candidates] == pytest.approx(probs[best].tolist())
        assert [c.text for c in candidates] == [BYTES.decode([int(i)]) for i in best]
    assert fill_in(text, found) == "a" + found[0][0].text + "c" + found[1][0].text


@pytest.mark.parametrize("model, text, top_k, message", [
    (GPT(GPTConfig(vocab_size=258, block_size=16, n_layer=1, n_head=2, n_embd=16)), "a<|mask|>", 3,
     "causal .* fill-mask needs a masked language model"),
    (mlm_model(), "no blank here", 3, "the text has no <\\|mask\\|>"),
    (mlm_model(block=4), "abcdef<|mask|>", 3, "7 tokens, more than the model's context of 4"),
    (mlm_model(), "a<|mask|>", 0, "top_k must be a positive integer"),
])
def test_fill_mask_refuses(model, text, top_k, message):
    with pytest.raises(TinygenError, match=message):
        fill_mask(model, BYTES, text, top_k)


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_corpus(tmp_path_factory.mktemp("corpus"))


SMALL = ["--preset", "tiny", "--vocab-size", "300", "--block-size", "16", "--n-layer", "1", "--n-embd", "32",
         "--batch-size", "4", "--eval-batches", "1", "--eval-interval", "3", "--checkpoint-interval", "2"]


def test_pretrain_objective_mlm_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "mlm"
    assert main(["pretrain", *SMALL, "--data", corpus, "--out", str(out), "--max-steps", "6", "--objective", "mlm",
                 "--samples", "1", "--prompt", "return <|mask|> value"]) == 0
    printed = capsys.readouterr().out
    assert "nats per masked token" in printed and "mask 1:" in printed and "filled: return" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tinygen_bidirectional" and load_model(out).config.causal is False
    tok = Tokenizer.load_dir(out)
    assert list(tok.special_tokens) == [MASK, ENDOFTEXT] and tok.eot_id == tok.vocab_size - 1 == config["eos_token_id"]
    # resuming a masked-language-model run reproduces the uninterrupted one
    assert main(["pretrain", *SMALL, "--data", corpus, "--out", str(tmp_path / "half"), "--max-steps", "3",
                 "--lr-decay-steps", "6", "--objective", "mlm", "--samples", "0"]) == 0
    assert main(["pretrain", "--resume", str(tmp_path / "half"), "--max-steps", "6", "--samples", "0"]) == 0
    a, b = load_model(out).params, load_model(tmp_path / "half").params
    assert all(np.array_equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["fill-mask", "--model", str(out), "--text", "def <|mask|>(self):", "--top-k", "2"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "mask 1:" and len(shown) == 4 and shown[-1].startswith("filled: def ")
    assert main(["sample", "--model", str(out), "--prompt", "def"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot generate left to right" in err
