"""Layers and loss: the forward/backward contract over the shared table of layer pairs
(dout and caches untouched, float32 kept), invariances, numerical care at extreme
inputs, dropout's seeded mask. Gradients vs finite differences over drawn shapes:
tests/test_gradient_check.py, over the same table."""
import math

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from tinygen.errors import TinygenError
from tinygen.layers import (
    GELU_A, GELU_K, PIECE, dropout_backward, dropout_forward, embedding_backward, embedding_forward,
    gelu_backward, gelu_forward, in_pieces, layernorm_backward, layernorm_forward, row_pieces, softmax,
)
from tinygen.loss import IGNORE, cross_entropy_backward, cross_entropy_forward
from tinygen.gradient_check import THRESHOLD, check_layer, layer_cases
from tinygen.testing import arrays, float_arrays

CASES = [case.name for case in layer_cases(np.random.default_rng(0))]  # every pair of the shared table

# B, T, C: batch 1..3, time 1..5 (T=1 and B=1 included), width 1..8
dims = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 8))
seeds = st.integers(0, 2**16)


def assert_checks(errors):
    """Every tensor of a check_layer result is below THRESHOLD."""
    assert errors and all(e < THRESHOLD for e in errors.values()), errors


def upstream(out, rng):
    """A random dout of out's shape; 1.0 for a scalar output (the loss)."""
    return 1.0 if np.ndim(out) == 0 else rng.standard_normal(np.shape(out))


# Every layer pair's gradients against finite differences, over drawn shapes, is the
# shared table's test: tests/test_gradient_check.py. Here: the rest of the contract.

@given(dims, seeds)
def test_layernorm_backward_at_gpt2_init_scale(dims, seed):
    """Inputs of scale 0.02, as the first layer norm sees at GPT-2's init."""
    B, T, C = dims
    rng = np.random.default_rng(seed)
    args = [0.02 * rng.standard_normal((B, T, C)), np.ones(C), np.zeros(C)]
    assert_checks(check_layer(layernorm_forward, layernorm_backward, args, max_coords=24, seed=seed))


def test_embedding_backward_adds_repeated_ids():
    ids = np.array([[3, 3, 0], [3, 1, 0]])
    dout = np.random.default_rng(0).standard_normal((2, 3, 4))
    (dw,) = embedding_backward(dout, embedding_forward(ids, np.zeros((5, 4)))[1])
    expected = np.zeros((5, 4))
    for b in range(2):
        for t in range(3):
            expected[ids[b, t]] += dout[b, t]
    np.testing.assert_allclose(dw, expected, rtol=1e-15)
    assert not dw[2].any() and not dw[4].any()  # unused rows get no gradient
    np.testing.assert_allclose(dw[3], dout[0, 0] + dout[0, 1] + dout[1, 0])


def test_embedding_backward_gradcheck_all_one_id():
    ids = np.zeros((2, 4), dtype=np.int64)  # every position reads row 0
    w = np.random.default_rng(1).standard_normal((3, 2))
    assert_checks(check_layer(embedding_forward, embedding_backward, [ids, w]))


@pytest.mark.parametrize("name", CASES)
def test_backward_leaves_dout_and_cache_unchanged(name):
    """The contract of every pair in the table (layers.py's docstring): backward never
    modifies dout or the cache."""
    rng = np.random.default_rng(0)
    (case,) = [c for c in layer_cases(rng, 2, 3, 4) if c.name == name]
    out, cache = case.forward(*case.args, **case.kwargs)
    dout = upstream(out, rng)
    before = [np.copy(a) for a in float_arrays(cache)]
    dout_before = np.copy(dout)
    case.backward(dout, cache)
    np.testing.assert_array_equal(dout, dout_before, err_msg=name)
    for a, b in zip(float_arrays(cache), before):
        np.testing.assert_array_equal(a, b, err_msg=name)


# ----------------------------------------------------------------- both dtypes
@pytest.mark.parametrize("name", CASES)
@given(dims, seeds)
@example((1, 1, 1), 0).via("T=1, B=1, C=1")
def test_float32_layers_stay_float32_and_agree_with_float64(name, dims, seed):
    """Outputs, caches and gradients of every pair in the table stay float32 in float32
    mode, and the float32 backward agrees with the float64 one to float32 precision."""
    B, T, C = dims
    (c32,) = [c for c in layer_cases(np.random.default_rng(seed), B, T, C, np.float32) if c.name == name]
    (c64,) = [c for c in layer_cases(np.random.default_rng(seed), B, T, C, np.float64) if c.name == name]
    out32, cache32 = c32.forward(*c32.args, **c32.kwargs)
    out64, cache64 = c64.forward(*c64.args, **c64.kwargs)
    dout = upstream(out64, np.random.default_rng(seed))
    grads32 = c32.backward(dout if np.isscalar(dout) else dout.astype(np.float32), cache32)
    grads64 = c64.backward(dout, cache64)
    for a in float_arrays(out32) + float_arrays(cache32) + float_arrays(grads32):
        assert a.dtype == np.float32, (name, a.dtype)
    np.testing.assert_allclose(out32, out64, rtol=1e-5, atol=1e-5, err_msg=name)
    for g32, g64 in zip(grads32, grads64):
        np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-5 * (1 + np.abs(g64).max()), err_msg=name)


def test_softmax_keeps_float32():
    x = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    assert softmax(x).dtype == np.float32


# ------------------------------------------------------------------ layer norm
@given(arrays(st.tuples(st.integers(1, 4), st.integers(2, 8))), st.floats(-100, 100), st.floats(0.01, 100))
def test_layernorm_invariant_to_row_shift_and_positive_scale(x, shift, scale):
    std = x.std(axis=-1)
    spread = np.abs(x - x.mean(axis=-1, keepdims=True)).max(axis=-1)
    x = x[(std > 0.1) & (spread < 10 * std)]  # rows whose statistics are well resolved
    if x.size == 0:
        return
    C = x.shape[-1]
    w, b = np.linspace(0.5, 2, C), np.linspace(-1, 1, C)
    out, _ = layernorm_forward(x, w, b, eps=0.0)
    shifted, _ = layernorm_forward(x + shift, w, b, eps=0.0)
    scaled, _ = layernorm_forward(x * scale, w, b, eps=0.0)
    np.testing.assert_allclose(shifted, out, atol=1e-9)
    np.testing.assert_allclose(scaled, out, atol=1e-9)
    # with GPT-2's eps the invariance holds up to eps / var
    out_eps, _ = layernorm_forward(x, w, b)
    np.testing.assert_allclose(layernorm_forward(x + shift, w, b)[0], out_eps, atol=1e-6)


def test_layernorm_normalises_rows():
    x = np.random.default_rng(0).normal(3.0, 5.0, (4, 16))
    out, cache = layernorm_forward(x, np.ones(16), np.zeros(16))
    np.testing.assert_allclose(out.mean(axis=-1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=-1), 1, rtol=1e-5)  # var / (var + eps)
    assert cache.rstd.shape == (4, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [0.0, 0.1, -3.0, 1e4])
def test_layernorm_finite_for_constant_rows(dtype, value):
    x = np.full((2, 3, 8), value, dtype=dtype)
    w, b = np.full(8, 2.0, dtype), np.linspace(-1, 1, 8).astype(dtype)
    out, cache = layernorm_forward(x, w, b)
    assert np.isfinite(out).all() and out.dtype == dtype
    if value != 1e4:  # a 1e4 row's mean carries float32 rounding of ~1e-3
        np.testing.assert_allclose(out, np.broadcast_to(b, out.shape), atol=1e-5)
    grads = layernorm_backward(np.ones_like(x), cache)
    assert all(np.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------ GELU
def test_gelu_known_values():
    x = np.array([-10.0, -1.0, 0.0, 1.0, 10.0])
    out, _ = gelu_forward(x)
    expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(out, expected, rtol=1e-14, atol=1e-30)
    assert out[2] == 0.0 and out[4] == 10.0 and abs(out[0]) < 1e-20
    np.testing.assert_allclose(out[3], 0.8411919906082768, rtol=1e-12)  # tanh-GELU(1)


# --------------------------------------------------------------------- dropout
def test_dropout_same_seed_same_mask():
    x = np.ones((4, 5, 6))
    out1, c1 = dropout_forward(x, 0.3, np.random.default_rng(7))
    out2, c2 = dropout_forward(x, 0.3, np.random.default_rng(7))
    out3, _ = dropout_forward(x, 0.3, np.random.default_rng(8))
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(c1.mask, c2.mask)
    assert not np.array_equal(out1, out3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_mask_values_and_expectation(dtype):
    p = 0.25
    x = np.random.default_rng(0).standard_normal((20_000,)).astype(dtype)
    out, cache = dropout_forward(x, p, np.random.default_rng(1))
    assert out.dtype == dtype and cache.mask.dtype == dtype
    np.testing.assert_allclose(np.unique(cache.mask), [0.0, 1 / (1 - p)], rtol=1e-7)
    assert abs((cache.mask == 0).mean() - p) < 0.01
    # E[out] = x: average many independent masks of the same x
    x = np.linspace(-2, 2, 10).astype(dtype)
    out, _ = dropout_forward(np.tile(x, (20_000, 1)), p, np.random.default_rng(2))  # 20k masks at once
    mean = out.mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(mean, x, atol=0.05)


def test_dropout_p0_and_no_rng_are_identity():
    x = np.random.default_rng(0).standard_normal((3, 4))
    out, cache = dropout_forward(x, 0.0, np.random.default_rng(0))
    assert out is x and cache.mask is None
    out, cache = dropout_forward(x, 0.5, None)  # evaluation: no rng, no dropout
    assert out is x and cache.mask is None
    dout = np.ones_like(x)
    assert dropout_backward(dout, cache)[0] is dout  # the identity returns dout itself (layers.py's contract)


# ------------------------------------------------------------ softmax and loss
@given(arrays(st.tuples(st.integers(1, 4), st.integers(1, 10)), elements=st.floats(-1e4, 1e4)))
def test_softmax_rows_sum_to_one(x):
    p = softmax(x)
    assert np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_cross_entropy_at_logits_1e4(dtype):
    logits = np.array([[[1e4, 0.0, -1e4], [1e4, 1e4, -1e4]]], dtype=dtype)  # (1, 2, 3)
    p = softmax(logits)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[0, 1], [0.5, 0.5, 0.0])
    loss, cache = cross_entropy_forward(logits, np.array([[1, 0]]))
    (dlogits,) = cross_entropy_backward(1.0, cache)
    assert np.isfinite(loss) and np.isfinite(dlogits).all() and dlogits.dtype == dtype
    # position 0 misses by 1e4 nats, position 1 is a coin flip: mean (1e4 + log 2) / 2
    assert loss == pytest.approx((1e4 + math.log(2)) / 2, rel=1e-6)
    loss, _ = cross_entropy_forward(-logits, np.array([[2, 2]]))
    assert loss == pytest.approx(0.0, abs=1e-6)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 50), st.floats(-100, 100))
def test_cross_entropy_of_uniform_logits_is_log_v(B, T, V, value):
    logits = np.full((B, T, V), value)
    targets = np.random.default_rng(V).integers(0, V, (B, T))
    loss, _ = cross_entropy_forward(logits, targets)
    assert loss == pytest.approx(math.log(V), abs=1e-12)


def test_cross_entropy_matches_direct_formula_and_ignores():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4))
    targets = np.array([[0, IGNORE, 3], [IGNORE, 1, 2]])
    loss, _ = cross_entropy_forward(logits, targets)
    terms = [np.log(np.exp(logits[b, t]).sum()) - logits[b, t, targets[b, t]]
             for b in range(2) for t in range(3) if targets[b, t] != IGNORE]
    assert loss == pytest.approx(np.mean(terms), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_all_ignored_is_zero_with_zero_grads(dtype):
    logits = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(dtype)
    loss, cache = cross_entropy_forward(logits, np.full((2, 3), IGNORE))
    (dlogits,) = cross_entropy_backward(1.0, cache)
    assert loss == 0.0 and dlogits.dtype == dtype and dlogits.shape == logits.shape
    assert not dlogits.any()


def test_cross_entropy_rejects_bad_targets():
    logits = np.zeros((2, 3, 4))
    with pytest.raises(TinygenError, match="shape"):
        cross_entropy_forward(logits, np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(TinygenError, match="vocabulary"):
        cross_entropy_forward(logits, np.full((2, 3), 4))
    with pytest.raises(TinygenError, match="vocabulary"):
        cross_entropy_forward(logits, np.full((2, 3), -2))


# ------------------------------------------------ cache-sized pieces (layers.PIECE)
def _reference_layers(x, w, b, dout, targets):
    """The whole-array math of gelu, layer norm and the cross-entropy, float64, no pieces."""
    u = GELU_K * (x + GELU_A * x**3)
    s = 0.5 * (1 + np.tanh(u))
    gelu, dgelu = x * s, dout * (s + x * 2 * s * (1 - s) * GELU_K * (1 + 3 * GELU_A * x**2))
    xc = x - x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt((xc**2).mean(-1, keepdims=True) + 1e-5)
    xhat = xc * rstd
    g = dout * w
    dln = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    m = x.max(-1, keepdims=True)
    probs = np.exp(x - m) / np.exp(x - m).sum(-1, keepdims=True)
    loss = np.mean(np.log(np.exp(x - m).sum(-1)) + m[..., 0] - np.take_along_axis(x, targets[..., None], -1)[..., 0])
    dlogits = probs.copy()
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(probs, targets[..., None], -1) - 1, -1)
    return gelu, dgelu, xhat * w + b, dln, loss, dlogits / targets.size


@pytest.mark.parametrize("layout", ["C", "F", "sliced"])
def test_layers_in_pieces_equal_the_whole_array_math(layout):
    """Arrays spanning several pieces (a partial last one included), and inputs that are not
    C-contiguous, give the whole-array results: the pieces cover every element once, in order."""
    rng = np.random.default_rng(0)
    B, T, C = 3, 7, PIECE // 9 + 5  # 21 rows, 2.3 pieces of elements; 9 rows a run of rows
    x = rng.standard_normal((B, T + 2, C))[:, 1:-1] if layout == "sliced" else rng.standard_normal((B, T, C))
    x = np.asfortranarray(x) if layout == "F" else x
    dout = rng.standard_normal((B, T, C))
    w, b, targets = rng.standard_normal(C), rng.standard_normal(C), rng.integers(0, C, (B, T))
    gelu, dgelu, ln, dln, loss, dlogits = _reference_layers(np.ascontiguousarray(x), w, b, dout, targets)
    out, cache = gelu_forward(x)
    np.testing.assert_allclose(out, gelu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gelu_backward(dout, cache)[0], dgelu, rtol=1e-12, atol=1e-14)
    out, cache = layernorm_forward(x, w, b)
    np.testing.assert_allclose(out, ln, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layernorm_backward(dout, cache)[0], dln, rtol=1e-10, atol=1e-12)
    value, cache = cross_entropy_forward(x, targets)
    assert value == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(cross_entropy_backward(1.0, cache)[0], dlogits, rtol=1e-12, atol=1e-15)


def test_pieces_cover_every_element_once():
    seen = np.zeros(2 * PIECE + 3, dtype=int)
    in_pieces(lambda piece: np.add(piece, 1, out=piece), seen)
    assert (seen == 1).all()
    assert row_pieces(7, PIECE // 3) == [(0, 3), (3, 6), (6, 7)]
    assert row_pieces(2, 2 * PIECE) == [(0, 1), (1, 2)]  # a row longer than a piece: one row a run
