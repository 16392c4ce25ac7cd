"""Prompt tuning: the concat pair and the embed part against finite differences, virtual
positions carry no logits and no loss, the context limit counts them, and KV-cache decoding agrees."""
import dataclasses
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygen import GPT, GPTConfig, KVCache
from tinygen.errors import TinygenError
from tinygen.model import gpt_forward
from tinygen.gradient_check import THRESHOLD, check_layer, check_model, check_part
from tinygen.finetuning.prompt_tuning import NAME, init_prompt, prompt_backward, prompt_embed, prompt_forward
from tinygen.parts import GPT2, TOKEN_EMBEDDING, make_context

CONFIG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")


@settings(max_examples=15)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 3), st.integers(0, 1000))
def test_prompt_gradients(B, T, C, n, seed):
    rng = np.random.default_rng(seed)
    errors = check_layer(prompt_forward, prompt_backward, [rng.standard_normal((B, T, C)), rng.standard_normal((n, C))],
                         names=["tok", "prompt"])
    assert max(errors.values()) < THRESHOLD, errors


@settings(max_examples=10)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(0, 1000))
def test_prompt_embed_part_gradients(B, T, n, seed):
    """Both the virtual tokens and the token rows read get their gradients (ids get none)."""
    rng = np.random.default_rng(seed)
    params = {**GPT(CONFIG, seed=seed).params, NAME: rng.standard_normal((n, CONFIG.n_embd))}
    idx = rng.integers(0, CONFIG.vocab_size, (B, T))
    x, _ = prompt_embed(TOKEN_EMBEDDING).forward(idx, params, "wte", make_context(CONFIG))
    assert x.shape == (B, n + T, CONFIG.n_embd)
    errors = check_part(prompt_embed(TOKEN_EMBEDDING), idx, params, "wte", make_context(CONFIG))
    assert set(errors) == {NAME, "wte.weight"}
    assert max(errors.values()) < THRESHOLD, errors


def test_prompt_embed_part_prepends_nothing_after_the_first_decoding_call():
    params = {**GPT(CONFIG).params, NAME: np.ones((2, CONFIG.n_embd))}
    ctx = make_context(CONFIG)._replace(start=3)
    x, cache = prompt_embed(TOKEN_EMBEDDING).forward(np.array([[4]]), params, "wte", ctx)
    assert np.array_equal(x, params["wte.weight"][[[4]]])
    _, grads = prompt_embed(TOKEN_EMBEDDING).backward(np.ones_like(x), cache)
    assert set(grads) == {"wte.weight"}


PROMPT_PARTS = GPT2._replace(embed=prompt_embed(GPT2.embed))


def prompt_model(n=3, seed=0):
    base = GPT(CONFIG, seed=seed)
    params = {**base.params, **init_prompt(base.params["wte.weight"], n, np.random.default_rng(seed))}
    return base, GPT(CONFIG, params=params, parts=PROMPT_PARTS)


def test_virtual_positions_are_prepended_and_their_logits_dropped():
    base, model = prompt_model(n=3)
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    logits = model.forward(idx)
    assert logits.shape == (2, 3, 13)
    # the same as the base reading three real tokens whose embeddings are the prompt's
    P = model.params[NAME]
    wte = base.params["wte.weight"]
    fake = np.vstack([wte, P])  # ids 13, 14, 15 are the virtual tokens
    config = dataclasses.replace(CONFIG, vocab_size=16)
    full, _ = gpt_forward({**base.params, "wte.weight": fake}, np.hstack([np.tile([13, 14, 15], (2, 1)), idx]), config)
    # the tied head would also score the 3 fake rows: compare the real vocabulary only
    np.testing.assert_allclose(logits, full[:, 3:, :13], rtol=1e-12, atol=1e-12)


def test_prompt_positions_carry_no_loss():
    """Changing the targets of ignored positions, or where the virtual tokens sit, changes nothing."""
    _, model = prompt_model()
    idx = np.array([[3, 4, 5, 6]])
    t1 = np.array([[-1, -1, 7, 8]])
    loss1, g1 = model.loss_and_grads(idx, t1)
    logits = model.forward(idx)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss1, -(logp[0, 2, 7] + logp[0, 3, 8]) / 2, rtol=1e-12)
    assert g1[NAME].any()  # the prompt is trained through the counted positions


def test_context_limit_counts_virtual_tokens():
    _, model = prompt_model(n=3)
    model.forward(np.zeros((1, 5), dtype=np.int64))  # 3 + 5 = 8 = block_size: fine
    with pytest.raises(TinygenError, match=r"\(3 virtual tokens \+ 6 tokens\) exceed block_size=8"):
        model.forward(np.zeros((1, 6), dtype=np.int64))


def test_kv_cache_decoding_matches_full_forward():
    _, model = prompt_model(n=2)
    idx = np.random.default_rng(0).integers(0, 13, (2, 5))
    full = model.forward(idx)
    kv = KVCache(model.config, 2)
    first = model.forward(idx[:, :3], kv=kv)
    assert kv.length == 2 + 3
    steps = [model.forward(idx[:, t:t + 1], kv=kv) for t in (3, 4)]
    np.testing.assert_allclose(np.concatenate([first] + steps, axis=1), full, rtol=1e-10, atol=1e-12)


def test_model_gradients_with_prompt():
    _, model = prompt_model(n=2, seed=1)
    rng = np.random.default_rng(4)
    idx, targets = rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6))
    targets[:, :2] = -1
    errors = check_model(model, idx, targets, max_coords=8, names=[NAME, "wte.weight", "wpe.weight", "h.0.ln_1.bias"])
    assert max(errors.values()) < THRESHOLD, errors
