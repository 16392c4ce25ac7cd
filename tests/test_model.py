"""The whole model: gradients vs finite differences, HF names and init statistics,
dtype discipline end to end, input validation, and an overfitting smoke test; the
bidirectional model (causal=False): its gradients, the causal one's where T = 1."""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from tinygen import GPT, GPTConfig, KVCache
from tinygen.errors import TinygenError
from tinygen.loss import IGNORE, cross_entropy_backward, cross_entropy_forward
from tinygen.model import gpt_backward, gpt_forward, init_params, param_shapes
from tinygen.gradient_check import EPS, THRESHOLD, check_model, gradcheck
from tinygen.testing import configs, float_arrays, token_batches

SMALL = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dtype="float64")


# ---------------------------------------------------- gradients of the whole model
# Finite differences with step EPS can confirm a gradient to THRESHOLD only where the loss varies
# on scales well above EPS. A layer norm varies on the scale of its input row's spread,
# 1 / rstd = sqrt(var + 1e-5), and its k-th derivative grows like rstd^k. At n_embd 2 or 3 the
# spread of a row (not the size of its entries, 0.02 at init) is often far below 0.02: for two
# entries it is |x1 - x2| / 2, near 0 with a probability that grows linearly with the bound. rstd
# then nears its cap 1/sqrt(1e-5) = 316, and the five-point stencil's truncation error,
# ~(EPS * rstd)^4, reaches 1e-5 while the analytic gradient is right (the error falls 81-fold
# when EPS falls 3-fold, the h^4 of truncation; measured on the failing draws). Over 4000 draws
# of this test, every one with EPS * rstd <= 0.015 checked below 1.5e-7; 0.8% of the n_embd=2
# draws and 0.4% of the n_embd=3 ones failed, all at rstd > 200. So the test draws only models
# whose layer norms are resolved by the step. n_embd = 1 always passes: the one entry is its
# own mean, so the layer norm is exactly flat (rstd = 316 with nothing to resolve).
RESOLVED_RSTD = 0.015 / EPS  # 150 for EPS = 1e-4


def layernorm_rstd(model, idx):
    """The largest rstd (1 / the spread of an input row) of any layer norm of the forward on idx."""
    _, cache = gpt_forward(model.params, idx, model.config)
    norms = [cache.ln_f] + [ln for block in cache.blocks for ln in (block.ln_1, block.ln_2)]
    return max(float(ln.rstd.max()) for ln in norms)


@settings(max_examples=10)  # each example runs ~100s of forwards
@given(configs(max_layers=2, max_heads=2, max_head_size=4, max_vocab=12, max_block=6), st.data())
def test_model_gradients_match_finite_differences(config, data):
    idx = data.draw(token_batches(config, max_batch=2))
    targets = data.draw(hnp.arrays(np.int64, idx.shape, elements=st.integers(0, config.vocab_size - 1)))
    targets[data.draw(st.integers(0, idx.shape[0] - 1)), 0] = IGNORE  # ignored positions count for nothing
    model = GPT(config, seed=data.draw(st.integers(0, 100)))
    if data.draw(st.booleans(), label="move away from the init's zeros and ones"):
        rng = np.random.default_rng(0)
        model.params = {k: p + rng.normal(0, 0.1, p.shape) for k, p in model.params.items()}
    assume(config.n_embd == 1 or layernorm_rstd(model, idx) <= RESOLVED_RSTD)  # see the comment above
    # A loss flat in every parameter (n_embd=1 with balanced targets) is covered by
    # gradcheck's absolute floor: see docs/gradcheck.md.
    errors = check_model(model, idx, targets, max_coords=3, seed=1)
    assert set(errors) == set(model.params)
    assert max(errors.values()) < THRESHOLD, errors


def test_an_unresolved_layer_norm_is_the_step_not_the_gradient():
    """A draw the test above skips (n_embd 2, a layer norm at rstd ~200): at step EPS the check
    fails, at EPS / 10 the same analytic gradient agrees to 1e-8, as the stencil's h^4 predicts."""
    config = GPTConfig(vocab_size=2, block_size=4, n_layer=2, n_head=1, n_embd=2, dtype="float64")
    model = GPT(config, seed=56)
    rng = np.random.default_rng(0)
    model.params = {k: p + rng.normal(0, 0.1, p.shape) for k, p in model.params.items()}
    idx, targets = np.array([[0, 0], [1, 1]]), np.array([[IGNORE, 0], [0, 0]])
    assert layernorm_rstd(model, idx) > RESOLVED_RSTD
    _, grads = model.loss_and_grads(idx, targets)
    wte = {"wte.weight": model.params["wte.weight"]}
    coarse = gradcheck(lambda: model.loss(idx, targets), wte, grads)["wte.weight"]
    fine = gradcheck(lambda: model.loss(idx, targets), wte, grads, eps=EPS / 10)["wte.weight"]
    assert coarse > THRESHOLD and fine < 1e-8, (coarse, fine)


def test_model_gradients_with_dropout_match_finite_differences():
    """With dropout the masks come from rng: replaying the same seed replays them (in one stream:
    shards draw their masks from generators spawned from rng, tinygen.sharding)."""
    config = dataclasses.replace(SMALL, dropout=0.2, n_layer=1)
    model = GPT(config, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (2, 6))
    targets = rng.integers(0, config.vocab_size, (2, 6))
    _, grads = model.loss_and_grads(idx, targets, rng=np.random.default_rng(5), workers=1)

    def loss():
        logits, _ = gpt_forward(model.params, idx, config, rng=np.random.default_rng(5))
        return cross_entropy_forward(logits, targets)[0]

    errors = gradcheck(loss, model.params, grads, max_coords=4)
    assert max(errors.values()) < THRESHOLD, errors
    assert loss() != model.loss(idx, targets)  # dropout really was on


def test_loss_and_grads_shapes_and_loss():
    model = GPT(SMALL, seed=1)
    idx = np.random.default_rng(0).integers(0, 11, (3, 6))
    loss, grads = model.loss_and_grads(idx, idx)
    assert list(grads) != [] and set(grads) == set(model.params)
    assert all(grads[k].shape == model.params[k].shape for k in grads)
    assert loss == pytest.approx(model.loss(idx, idx), rel=1e-12)
    # GPT-2's init gives near-uniform predictions: loss ~ log V
    assert abs(loss - math.log(SMALL.vocab_size)) < 0.1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_all_targets_ignored_gives_zero_loss_and_zero_grads(dtype):
    model = GPT(dataclasses.replace(SMALL, dtype=dtype))
    idx = np.ones((2, 4), dtype=np.int64)
    loss, grads = model.loss_and_grads(idx, np.full((2, 4), IGNORE))
    assert loss == 0.0
    assert all(not g.any() and g.dtype == np.dtype(dtype) for g in grads.values())


# ---------------------------------------------------------- names, shapes, init
def test_hf_parameter_names_and_shapes():
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=12)
    expected = {"wte.weight": (50, 12), "wpe.weight": (16, 12)}
    for i in range(2):
        expected.update({
            f"h.{i}.ln_1.weight": (12,), f"h.{i}.ln_1.bias": (12,),
            f"h.{i}.attn.c_attn.weight": (12, 36), f"h.{i}.attn.c_attn.bias": (36,),
            f"h.{i}.attn.c_proj.weight": (12, 12), f"h.{i}.attn.c_proj.bias": (12,),
            f"h.{i}.ln_2.weight": (12,), f"h.{i}.ln_2.bias": (12,),
            f"h.{i}.mlp.c_fc.weight": (12, 48), f"h.{i}.mlp.c_fc.bias": (48,),
            f"h.{i}.mlp.c_proj.weight": (48, 12), f"h.{i}.mlp.c_proj.bias": (12,),
        })
    expected.update({"ln_f.weight": (12,), "ln_f.bias": (12,)})
    assert param_shapes(config) == expected
    assert list(param_shapes(config)) == list(expected)  # Hugging Face's order
    model = GPT(config)
    assert {k: v.shape for k, v in model.params.items()} == expected
    assert model.num_params == sum(math.prod(s) for s in expected.values())


def test_gpt2_init_statistics():
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=64, dtype="float64")
    params = init_params(config, np.random.default_rng(0))
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in params.items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            np.testing.assert_array_equal(p, 1.0, err_msg=name)
        elif name.endswith(".bias"):
            np.testing.assert_array_equal(p, 0.0, err_msg=name)
        else:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            # the sample std of n normals errs by ~std / sqrt(2n); allow 5 of those
            assert abs(p.std() - std) < 5 * std / math.sqrt(2 * p.size), (name, p.std(), std)
            assert abs(p.mean()) < 5 * std / math.sqrt(p.size), name
    assert GPT(config, seed=3).params["wte.weight"].dtype == np.float64
    assert GPT(dataclasses.replace(config, dtype="float32")).params["wte.weight"].dtype == np.float32


def test_same_seed_same_params_and_params_roundtrip():
    a, b = GPT(SMALL, seed=4), GPT(SMALL, seed=4)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.array_equal(a.params["wte.weight"], GPT(SMALL, seed=5).params["wte.weight"])
    c = GPT(dataclasses.replace(SMALL, dtype="float32"), params=a.params)
    assert all(p.dtype == np.float32 for p in c.params.values())


# ------------------------------------------------------------------ dtypes
def test_float32_mode_never_promotes_to_float64():
    """Logits, every gradient, and every cached intermediate of every layer stay float32."""
    config = dataclasses.replace(SMALL, dtype="float32", dropout=0.1)
    model = GPT(config)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (2, 5))
    targets = rng.integers(0, config.vocab_size, (2, 5))
    targets[0, 0] = IGNORE
    logits, cache = gpt_forward(model.params, idx, config, rng=np.random.default_rng(1))
    assert logits.dtype == np.float32
    cached = float_arrays(cache)
    assert len(cached) > 30 and all(a.dtype == np.float32 for a in cached)
    _, ce = cross_entropy_forward(logits, targets)
    (dlogits,) = cross_entropy_backward(1.0, ce)
    assert dlogits.dtype == np.float32
    grads = gpt_backward(dlogits, cache)
    assert all(g.dtype == np.float32 for g in grads.values())
    _, grads = model.loss_and_grads(idx, targets, rng=np.random.default_rng(1))
    assert {k: g.dtype for k, g in grads.items()} == {k: np.dtype(np.float32) for k in model.params}
    kv = KVCache(config, 2)
    assert model.forward(idx[:, :3], kv=kv).dtype == np.float32
    assert model.forward(idx[:, 3:], kv=kv).dtype == np.float32
    assert kv.k.dtype == kv.v.dtype == np.float32


@settings(max_examples=15)
@given(configs(dtype="float64"), st.data())
def test_float32_and_float64_forwards_agree(config, data):
    idx = data.draw(token_batches(config))
    m64 = GPT(config, seed=data.draw(st.integers(0, 100)))
    m32 = GPT(dataclasses.replace(config, dtype="float32"), params=m64.params)
    l32, l64 = m32.forward(idx), m64.forward(idx)
    assert l32.dtype == np.float32 and l64.dtype == np.float64
    np.testing.assert_allclose(l32, l64, rtol=1e-4, atol=1e-5)
    targets = data.draw(hnp.arrays(np.int64, idx.shape, elements=st.integers(0, config.vocab_size - 1)))
    (loss32, g32), (loss64, g64) = m32.loss_and_grads(idx, targets), m64.loss_and_grads(idx, targets)
    assert loss32 == pytest.approx(loss64, rel=1e-5, abs=1e-6)
    for k in g64:
        np.testing.assert_allclose(g32[k], g64[k], rtol=1e-3, atol=1e-5 * (1 + np.abs(g64[k]).max()), err_msg=k)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("block_size", -1), ("n_layer", 1.5), ("n_head", True), ("n_embd", "8"),
    ("n_embd", 7), ("dropout", 1.0), ("dropout", -0.1), ("dropout", float("nan")), ("dtype", "float16"),
])
def test_config_validation_names_the_field(field, value):
    good = dict(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=8)
    with pytest.raises(TinygenError, match=f"GPTConfig.{field}") as info:
        GPTConfig(**{**good, field: value})
    assert isinstance(info.value, ValueError)
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("idx, match", [
    (np.zeros((1, 7), dtype=np.int64), "block_size"),  # T > block_size
    (np.array([[1, 11]]), "vocabulary"),  # id == V
    (np.array([[-1, 2]]), "vocabulary"),
    (np.zeros((1, 3)), "integer"),  # float dtype
    (np.array([True, False])[None], "integer"),
    (np.array([1, 2, 3]), "shape"),  # wrong rank
    (np.zeros((1, 2, 3), dtype=np.int64), "shape"),
    (np.zeros((1, 0), dtype=np.int64), "empty"),
])
def test_bad_idx_raises(idx, match):
    model = GPT(SMALL)
    with pytest.raises(TinygenError, match=match):
        model.forward(idx)
    with pytest.raises(TinygenError, match=match):
        model.loss_and_grads(idx, idx)


def test_bad_targets_raise():
    model = GPT(SMALL)
    idx = np.zeros((2, 4), dtype=np.int64)
    for targets in (np.zeros((2, 3), dtype=np.int64), np.zeros((1, 4), dtype=np.int64)):
        with pytest.raises(TinygenError, match="shape"):
            model.loss_and_grads(idx, targets)
        with pytest.raises(TinygenError, match="shape"):
            model.loss(idx, targets)
    with pytest.raises(TinygenError, match="targets"):
        model.loss_and_grads(idx, np.full((2, 4), 11))
    with pytest.raises(TinygenError, match="integer"):
        model.loss_and_grads(idx, np.zeros((2, 4)))


def test_bad_model_arguments_raise():
    with pytest.raises(TinygenError, match="GPTConfig"):
        GPT({"vocab_size": 11})
    params = GPT(SMALL).params
    with pytest.raises(TinygenError, match="missing"):
        GPT(SMALL, params={k: v for k, v in params.items() if k != "ln_f.bias"})
    with pytest.raises(TinygenError, match="wpe.weight"):
        GPT(SMALL, params={**params, "wpe.weight": np.zeros((5, 8))})
    with pytest.raises(ValueError, match="float64"):
        check_model(GPT(dataclasses.replace(SMALL, dtype="float32")), np.zeros((1, 2), int), np.zeros((1, 2), int))


def test_inputs_are_not_mutated():
    model = GPT(SMALL)
    idx = np.array([[1, 2, 3]])
    targets = np.array([[2, 3, IGNORE]])
    before = {k: v.copy() for k, v in model.params.items()}
    model.loss_and_grads(idx, targets)
    np.testing.assert_array_equal(idx, [[1, 2, 3]])
    np.testing.assert_array_equal(targets, [[2, 3, IGNORE]])
    assert all(np.array_equal(model.params[k], before[k]) for k in before)


# ------------------------------------------------------------------ smoke test
def test_tiny_model_overfits_one_batch_with_adam():
    """A hand-written Adam drives a 2-layer model below 0.05 nats on one batch."""
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16, dtype="float32")
    model = GPT(config, seed=0)
    data = np.random.default_rng(0).integers(0, 16, (4, 9))
    idx, targets = data[:, :-1], data[:, 1:]
    m = {k: np.zeros_like(v) for k, v in model.params.items()}
    v = {k: np.zeros_like(p) for k, p in model.params.items()}
    lr, b1, b2 = 1e-2, 0.9, 0.999
    first = model.loss(idx, targets)
    for step in range(1, 301):
        _, grads = model.loss_and_grads(idx, targets)
        for k, p in model.params.items():
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] * grads[k]
            p -= lr * (m[k] / (1 - b1**step)) / (np.sqrt(v[k] / (1 - b2**step)) + 1e-8)
    assert first > 2.5  # started near log(16) = 2.77
    assert model.loss(idx, targets) < 0.05
    assert all(p.dtype == np.float32 for p in model.params.values())


# ------------------------------------------------------------------ the bidirectional model (causal=False)
@settings(max_examples=15, deadline=None)
@given(configs(max_layers=2, max_heads=2, max_head_size=3, max_block=6), st.data())
def test_bidirectional_model_gradients_match_finite_differences(config, data):
    config = dataclasses.replace(config, causal=False)
    model = GPT(config, seed=data.draw(st.integers(0, 100)))
    idx = data.draw(token_batches(config, max_batch=2))
    keep = data.draw(hnp.arrays(bool, idx.shape))
    targets = np.where(keep, idx, -1)  # a masked language model's targets: the token at its own position
    errors = check_model(model, idx, targets, max_coords=6)
    assert set(errors) == set(model.params) and max(errors.values()) < THRESHOLD, errors


@settings(max_examples=25, deadline=None)
@given(configs(max_block=6), st.integers(1, 3), st.data())
def test_bidirectional_model_equals_causal_where_the_mask_does_not_matter(config, B, data):
    """One position (T = 1): the same parameters give the same logits and gradients either way."""
    seed = data.draw(st.integers(0, 100))
    causal = GPT(config, seed=seed)
    bidirectional = GPT(dataclasses.replace(config, causal=False), params=causal.params)
    idx = data.draw(hnp.arrays(np.int64, (B, 1), elements=st.integers(0, config.vocab_size - 1)))
    np.testing.assert_allclose(bidirectional.forward(idx), causal.forward(idx), rtol=1e-12, atol=1e-12)
    loss_c, g_c = causal.loss_and_grads(idx, idx)
    loss_b, g_b = bidirectional.loss_and_grads(idx, idx)
    assert loss_c == pytest.approx(loss_b, rel=1e-12)
    for name in g_c:
        np.testing.assert_allclose(g_b[name], g_c[name], rtol=1e-10, atol=1e-12)


def test_bidirectional_model_sees_the_future():
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=8, dtype="float64", causal=False)
    model = GPT(config, seed=0)
    idx = np.array([[1, 2, 3, 4]])
    later = np.array([[1, 2, 3, 9]])
    assert not np.allclose(model.forward(idx)[:, 0], model.forward(later)[:, 0])
    causal = GPT(dataclasses.replace(config, causal=True), params=model.params)
    assert np.array_equal(causal.forward(idx)[:, 0], causal.forward(later)[:, 0])


def test_backward_can_free_the_activations_as_it_goes_and_then_refuses_the_spent_cache():
    """free_activations gives the same gradients, empties the blocks' caches, and a second
    backward through the spent cache raises instead of computing without them."""
    config = dataclasses.replace(SMALL, n_layer=2)
    model = GPT(config, seed=0)
    idx = np.random.default_rng(0).integers(0, config.vocab_size, (2, 5))
    logits, cache = gpt_forward(model.params, idx, config)
    dlogits = np.random.default_rng(1).normal(size=logits.shape).astype(logits.dtype)
    kept = gpt_backward(dlogits, cache)
    again = gpt_backward(dlogits, cache)  # the default keeps the cache usable
    freed = gpt_backward(dlogits, cache, free_activations=True)
    assert all(np.array_equal(kept[k], again[k]) and np.array_equal(kept[k], freed[k]) for k in kept)
    assert cache.blocks == [None, None]
    with pytest.raises(TinygenError, match="freed by an earlier"):
        gpt_backward(dlogits, cache)
