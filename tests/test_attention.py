"""Causal attention: backward vs finite differences, causality of outputs and of
gradients, a naive per-head oracle, float32 discipline, and the KV cache's
exactness against the full forward."""
import math

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from tinygen import GPT, KVCache
from tinygen.attention import (
    attend, attention_probs, causal_attention_backward, causal_attention_forward, causal_mask, merge_heads,
    split_heads,
)
from tinygen.errors import TinygenError
from tinygen.layers import dropout_mask
from tinygen.gradient_check import THRESHOLD, check_layer
from tinygen.testing import configs, token_batches

# B, T, H, D: batch 1..3, time 1..6, heads 1..3, head width 1..4
shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 3), st.integers(1, 4))
seeds = st.integers(0, 2**16)


def naive_attention(qkv, n_head):
    """The definition, one batch row, head and query at a time."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    y = np.zeros((B, T, C))
    for b in range(B):
        for h in range(n_head):
            q = qkv[b, :, h * D:(h + 1) * D]
            k = qkv[b, :, C + h * D:C + (h + 1) * D]
            v = qkv[b, :, 2 * C + h * D:2 * C + (h + 1) * D]
            for t in range(T):
                s = k[: t + 1] @ q[t] / math.sqrt(D)  # keys 0..t only
                a = np.exp(s - s.max())
                y[b, t, h * D:(h + 1) * D] = (a / a.sum()) @ v[: t + 1]
    return y


@given(shapes, seeds)
@example((1, 1, 1, 1), 0).via("T=1, B=1, one head of width 1")
@example((2, 4, 1, 4), 1).via("one head, head width = C")
def test_attention_matches_naive_definition(shape, seed):
    B, T, H, D = shape
    qkv = np.random.default_rng(seed).standard_normal((B, T, 3 * H * D))
    y, cache = causal_attention_forward(qkv, H)
    np.testing.assert_allclose(y, naive_attention(qkv, H), rtol=1e-12, atol=1e-12)
    att = attention_probs(cache)
    assert y.shape == (B, T, H * D) and att.shape == (B, H, T, T)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-12)
    assert not att[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]].any()


@given(shapes, seeds, st.booleans())
@example((1, 1, 1, 1), 0, False).via("T=1, B=1")
@example((1, 1, 2, 3), 0, True).via("T=1, B=1, dropout")
@example((2, 4, 1, 4), 1, True).via("one head, head width = C")
def test_attention_backward_matches_finite_differences(shape, seed, with_dropout):
    B, T, H, D = shape
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * D))
    kwargs = {"n_head": H, "block": int(rng.integers(1, T + 1))}  # several query blocks, or one
    if with_dropout:  # a fixed attention-dropout mask
        kwargs["mask"] = dropout_mask((B, H, T, T), 0.3, rng, np.float64)
    errors = check_layer(causal_attention_forward, causal_attention_backward, [qkv], kwargs,
                         names=["qkv"], max_coords=32, seed=seed)
    assert errors["qkv"] < THRESHOLD, errors


@given(shapes, seeds, st.booleans(), st.data())
def test_query_blocks_compute_exactly_the_full_attention(shape, seed, with_dropout, data):
    """Any block size gives the output, probabilities and gradient of one T x T block
    (to rounding: only the lengths of the zero-padded sums differ)."""
    B, T, H, D = shape
    block = data.draw(st.integers(1, T))
    rng = np.random.default_rng(seed)
    qkv, dy = rng.standard_normal((B, T, 3 * H * D)), rng.standard_normal((B, T, H * D))
    mask = dropout_mask((B, H, T, T), 0.3, rng, np.float64) if with_dropout else None
    y_full, full = causal_attention_forward(qkv, H, mask=mask, block=T)
    y, blocks = causal_attention_forward(qkv, H, mask=mask, block=block)
    assert len(blocks.att) == -(-T // block) and len(full.att) == 1
    np.testing.assert_allclose(y, y_full, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(attention_probs(blocks), full.att[0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(causal_attention_backward(dy, blocks)[0], causal_attention_backward(dy, full)[0],
                               rtol=1e-12, atol=1e-13)


@given(shapes, seeds, st.data())
def test_attention_is_causal_in_outputs_and_gradients(shape, seed, data):
    """Changing positions after t leaves y[:, :t+1] exactly unchanged, and a
    gradient arriving only at positions <= t sends exactly nothing to later ones."""
    B, T, H, D = shape
    t = data.draw(st.integers(0, T - 1))
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * D))
    y, cache = causal_attention_forward(qkv, H)
    changed = qkv.copy()
    changed[:, t + 1:] = 100 * rng.standard_normal(changed[:, t + 1:].shape)
    y2, _ = causal_attention_forward(changed, H)
    np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])
    dy = rng.standard_normal(y.shape)
    dy[:, t + 1:] = 0.0
    (dqkv,) = causal_attention_backward(dy, cache)
    assert not dqkv[:, t + 1:].any()


def test_attention_single_position_returns_v():
    qkv = np.random.default_rng(0).standard_normal((2, 1, 12))
    y, cache = causal_attention_forward(qkv, 2)
    np.testing.assert_array_equal(attention_probs(cache), 1.0)
    np.testing.assert_allclose(y, qkv[:, :, 8:], rtol=1e-15)


def test_causal_mask_for_cached_queries():
    m = causal_mask(2, 4, np.float64)  # queries at absolute positions 2 and 3
    np.testing.assert_array_equal(np.isinf(m), [[False, False, False, True], [False] * 4])
    assert causal_mask(3, 3, np.float32).dtype == np.float32
    np.testing.assert_array_equal(np.isinf(causal_mask(3, 3, np.float64)), np.triu(np.ones((3, 3), bool), 1))


def test_split_and_merge_heads_are_inverse():
    qkv = np.arange(2 * 3 * 12, dtype=np.float64).reshape(2, 3, 12)
    q, k, v = split_heads(qkv, 2)
    assert q.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(np.concatenate([merge_heads(a) for a in (q, k, v)], -1), qkv)


@given(shapes, seeds)
@example((1, 1, 1, 1), 0).via("T=1, B=1, one head of width 1")
@example((2, 4, 1, 4), 1).via("one head, head width = C")
def test_attention_float32_stays_float32(shape, seed):
    B, T, H, D = shape
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * D))
    mask = dropout_mask((B, H, T, T), 0.2, rng, np.float32)
    for m in (None, mask):
        y32, c32 = causal_attention_forward(qkv.astype(np.float32), H, mask=m)
        y64, c64 = causal_attention_forward(qkv, H, mask=m)
        dy = rng.standard_normal(y64.shape)
        (g32,) = causal_attention_backward(dy.astype(np.float32), c32)
        (g64,) = causal_attention_backward(dy, c64)
        for a in [y32, g32, c32.q, c32.k, c32.v, *c32.att, *([] if m is None else [c32.mask])]:
            assert a.dtype == np.float32
        np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-4)


def test_attention_dropout_is_seeded():
    qkv = np.random.default_rng(0).standard_normal((2, 4, 6))
    y1, c1 = causal_attention_forward(qkv, 2, 0.5, np.random.default_rng(3))
    y2, c2 = causal_attention_forward(qkv, 2, 0.5, np.random.default_rng(3))
    np.testing.assert_array_equal(y1, y2)
    assert c1.mask is not None and c1.mask.shape == (2, 2, 4, 4)
    np.testing.assert_array_equal(c1.mask, c2.mask)
    y0, c0 = causal_attention_forward(qkv, 2, 0.5, None)  # no rng: evaluation
    assert c0.mask is None and not np.array_equal(y0, y1)


# ------------------------------------------------------------------ KV cache
@given(configs(dtype=None), st.data())
def test_kv_cache_in_random_chunks_equals_full_forward(config, data):
    idx = data.draw(token_batches(config))
    B, T = idx.shape
    model = GPT(config, seed=data.draw(st.integers(0, 100)))
    full = model.forward(idx)
    kv = KVCache(config, B)
    pieces, start = [], 0
    while start < T:
        size = data.draw(st.integers(1, T - start), label="chunk")
        pieces.append(model.forward(idx[:, start:start + size], kv=kv))
        start += size
        assert kv.length == start
    cached = np.concatenate(pieces, axis=1)
    assert cached.dtype == full.dtype == config.np_dtype
    tol = 1e-4 if config.dtype == "float32" else 1e-10
    np.testing.assert_allclose(cached, full, rtol=tol, atol=tol)


def test_kv_cache_beyond_block_size_raises():
    from tinygen import GPTConfig

    config = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = GPT(config)
    kv = KVCache(config, 1)
    model.forward(np.array([[1, 2, 3]]), kv=kv)
    with pytest.raises(TinygenError, match="block_size"):
        model.forward(np.array([[1, 2]]), kv=kv)
    with pytest.raises(TinygenError, match="batch size 1"):  # not a silent broadcast to B=2
        model.forward(np.array([[1]]), kv=KVCache(config, 2))


@given(configs(dtype=None), st.data())
def test_model_is_causal(config, data):
    """Changing tokens after position t leaves logits at positions <= t exactly unchanged."""
    idx = data.draw(token_batches(config))
    t = data.draw(st.integers(0, idx.shape[1] - 1))
    changed = idx.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + data.draw(st.integers(0, 100))) % config.vocab_size
    model = GPT(config)
    np.testing.assert_array_equal(model.forward(changed)[:, : t + 1], model.forward(idx)[:, : t + 1])
