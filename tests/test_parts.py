"""The parts mechanism: each plain part against finite differences, a custom part plugged
into the model without touching model.py, auxiliary losses, and the decoding fast path."""
import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygen import GPT, GPTConfig, KVCache
from tinygen.gradient_check import THRESHOLD, check_model, check_part
from tinygen.kv_decoding import Decoder
from tinygen.layers import linear_backward, linear_forward
from tinygen.model import block_backward, block_forward, gpt_backward, gpt_forward
from tinygen.parts import (CAUSAL_SELF_ATTENTION, GPT2, IDENTITY, LINEAR, MLP, TOKEN_EMBEDDING, Context, Part, Parts,
                           make_context, parts_for)
from tinygen.testing import configs

CONFIG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")


def random_params(config, seed):
    """Parameters away from the init's zeros and ones, so every term of a gradient matters."""
    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, 0.3, v.shape) for k, v in GPT(config, seed=seed).params.items()}


# ------------------------------------------------------------------ the plain parts
@settings(max_examples=10)
@given(configs(max_layers=1, max_heads=2, max_head_size=3, max_block=5), st.integers(1, 2), st.integers(0, 1000),
       st.sampled_from(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]))
def test_linear_part_gradients(config, B, seed, projection):
    params = random_params(config, seed)
    name = "h.0." + projection
    x = np.random.default_rng(seed).standard_normal((B, config.block_size, params[name + ".weight"].shape[0]))
    errors = check_part(LINEAR, x, params, name, make_context(config))
    assert set(errors) == {"x", name + ".weight", name + ".bias"}
    assert max(errors.values()) < THRESHOLD, errors


@settings(max_examples=10)
@given(configs(max_layers=1, max_heads=2, max_head_size=3, max_block=5), st.integers(1, 2), st.integers(0, 1000),
       st.sampled_from([MLP, CAUSAL_SELF_ATTENTION]), st.booleans())
def test_attention_and_mlp_part_gradients(config, B, seed, part, with_dropout):
    """The sublayers' backward, through the linear part for their projections; the attention
    part with attention dropout too (ctx.rng is replayed, so the masks stay fixed)."""
    config = dataclasses.replace(config, dropout=0.3 if with_dropout else 0.0)
    params = random_params(config, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, config.block_size, config.n_embd))
    name, projections = ("h.0.mlp", ("c_fc", "c_proj")) if part is MLP else ("h.0.attn", ("c_attn", "c_proj"))
    errors = check_part(part, x, params, name, make_context(config, rng=rng))
    assert set(errors) == {"x"} | {f"{name}.{p}.{w}" for p in projections for w in ("weight", "bias")}
    assert max(errors.values()) < THRESHOLD, errors


def test_identity_and_token_embedding_parts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8))
    out, cache = IDENTITY.forward(x, {}, "h.0.adapter_attn", make_context(CONFIG))
    assert out is x and IDENTITY.backward(x, cache) == (x, {})
    params = random_params(CONFIG, 0)
    idx = np.array([[1, 1, 4], [0, 12, 1]])  # repeated ids add up
    tok, _ = TOKEN_EMBEDDING.forward(idx, params, "wte", make_context(CONFIG))
    assert np.array_equal(tok, params["wte.weight"][idx])
    errors = check_part(TOKEN_EMBEDDING, idx, params, "wte", make_context(CONFIG))
    assert set(errors) == {"wte.weight"} and errors["wte.weight"] < THRESHOLD


def test_block_pair_mirrors_itself():
    """block_backward against finite differences of block_forward, every parameter of block 1."""
    params = random_params(CONFIG, 1)
    x = np.random.default_rng(1).standard_normal((2, 5, 8))
    ctx = make_context(CONFIG)
    block = Part(lambda x, p, name, ctx: block_forward(x, p, 1, ctx), lambda d, cache: block_backward(d, cache))
    errors = check_part(block, x, params, "h.1", ctx)
    assert set(errors) == {"x"} | {k for k in params if k.startswith("h.1.")}
    assert max(errors.values()) < THRESHOLD, errors


def test_parts_default_to_the_configs_own():
    assert parts_for(CONFIG) is GPT2 and GPT(CONFIG).parts is GPT2
    idx = np.array([[1, 2, 3]])
    params = random_params(CONFIG, 2)
    assert np.array_equal(gpt_forward(params, idx, CONFIG)[0], gpt_forward(params, idx, CONFIG, GPT2)[0])
    with pytest.raises(ValueError, match="parts must be"):
        GPT(CONFIG, parts=(LINEAR,))


# ------------------------------------------------------------------ a custom part
class ReluMlpCache(NamedTuple):
    name: str
    x: np.ndarray  # (B,T,C) input
    h: np.ndarray  # (B,T,4C) relu(x @ c_fc)
    w_fc: np.ndarray  # (C,4C)
    w_proj: np.ndarray  # (4C,C)


def relu_mlp_forward(x, params, name, ctx):
    """A ReLU MLP without biases, written from scratch (no linear part): x (B,T,C) -> (B,T,C)."""
    w_fc, w_proj = params[name + ".c_fc.weight"], params[name + ".c_proj.weight"]
    h = np.maximum(x @ w_fc, 0.0)
    return h @ w_proj, ReluMlpCache(name, x, h, w_fc, w_proj)


def relu_mlp_backward(dout, cache):
    n, x, h, w_fc, w_proj = cache
    dh = (dout @ w_proj.T) * (h > 0)
    return dh @ w_fc.T, {n + ".c_fc.weight": np.einsum("btc,btn->cn", x, dh),
                         n + ".c_proj.weight": np.einsum("btn,btc->nc", h, dout),
                         n + ".c_fc.bias": np.zeros_like(w_fc[0]), n + ".c_proj.bias": np.zeros_like(w_proj[0])}


RELU_MLP = Part(relu_mlp_forward, relu_mlp_backward)


def test_a_custom_mlp_part_plugs_in_and_its_model_passes_the_gradient_check():
    params = random_params(CONFIG, 3)
    model = GPT(CONFIG, params=params, parts=GPT2._replace(mlp=RELU_MLP))
    idx = np.random.default_rng(3).integers(0, 13, (2, 6))
    logits = model.forward(idx)
    assert not np.allclose(logits, GPT(CONFIG, params=params).forward(idx))  # the part is really used
    errors = check_model(model, idx, np.roll(idx, -1, axis=1), max_coords=5)
    assert set(errors) == set(params) and max(errors.values()) < THRESHOLD, errors
    assert not Decoder(model, 2).fast  # decoding takes the general path, with the same tokens
    np.testing.assert_array_equal(model.generate(idx[:, :3], 4, temperature=0),
                                  model.generate(idx[:, :3], 4, temperature=0, use_cache=False))


# ------------------------------------------------------------------ auxiliary losses
class PenaltyCache(NamedTuple):
    mlp: tuple  # the MLP part's cache
    out: np.ndarray  # (B,T,C)
    coef: float  # the loss's coefficient times ctx.aux_scale: the weight of its gradient


COEF = 0.05


def penalized_mlp_forward(x, params, name, ctx):
    """GPT-2's MLP plus the auxiliary loss COEF * mean(out^2), as an expert router's balancing loss would be."""
    out, mlp = MLP.forward(x, params, name, ctx)
    ctx.aux.append((name + ".penalty", COEF * float(np.mean(out * out))))
    return out, PenaltyCache(mlp, out, COEF * ctx.aux_scale)


def penalized_mlp_backward(dout, cache):
    return MLP.backward(dout + cache.coef * 2.0 * cache.out / cache.out.size, cache.mlp)


PENALIZED_MLP = Part(penalized_mlp_forward, penalized_mlp_backward)


def test_auxiliary_losses_join_the_loss_and_the_gradient():
    params = random_params(CONFIG, 4)
    model = GPT(CONFIG, params=params, parts=GPT2._replace(mlp=PENALIZED_MLP))
    plain = GPT(CONFIG, params=params)
    rng = np.random.default_rng(4)
    idx, targets = rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6))
    loss, grads, aux = model.loss_and_grads(idx, targets, return_aux=True)
    assert set(aux) == {"h.0.mlp.penalty", "h.1.mlp.penalty"} and all(v > 0 for v in aux.values())
    assert loss == pytest.approx(plain.loss(idx, targets) + sum(aux.values()), rel=1e-12)
    assert model.loss(idx, targets) == pytest.approx(loss, rel=1e-12)
    errors = check_model(model, idx, targets, max_coords=5)  # finite differences of loss + aux
    assert max(errors.values()) < THRESHOLD, errors
    x = rng.standard_normal((2, 3, 8))
    ctx = make_context(CONFIG, aux_scale=3.0)  # the part's own check includes its auxiliary loss
    assert max(check_part(PENALIZED_MLP, x, params, "h.0.mlp", ctx).values()) < THRESHOLD
    _, scaled = model.loss_and_grads(idx, targets, scale=3.0)  # scale weighs the auxiliary gradient too
    for k in grads:
        np.testing.assert_allclose(scaled[k], 3.0 * grads[k], rtol=1e-10, atol=1e-14, err_msg=k)


# ------------------------------------------------------------------ the KV cache through the parts
def test_attention_part_with_kv_buffers_equals_the_full_forward():
    """gpt_forward with a KVCache hands each block's buffers to the attention part (ctx.kv) and
    the position offset (ctx.start); three calls give the full forward's logits."""
    params = random_params(CONFIG, 5)
    idx = np.random.default_rng(5).integers(0, 13, (2, 7))
    full, _ = gpt_forward(params, idx, CONFIG)
    kv = KVCache(CONFIG, 2)
    pieces = [gpt_forward(params, idx[:, a:b], CONFIG, kv=kv)[0] for a, b in ((0, 3), (3, 4), (4, 7))]
    assert kv.length == 7
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-12, atol=1e-12)


def test_context_fields_and_the_gpt_cache():
    ctx = make_context(CONFIG)
    assert isinstance(ctx, Context) and ctx.parts is GPT2 and ctx.aux == [] and ctx.start == 0 and ctx.kv is None
    assert make_context(CONFIG).aux is not ctx.aux  # a fresh list each time
    params = random_params(CONFIG, 6)
    logits, cache = gpt_forward(params, np.array([[1, 2]]), CONFIG)
    assert cache.parts is GPT2 and cache.aux == [] and cache.extra == 0
    assert set(gpt_backward(np.ones_like(logits), cache)) == set(params)
    assert Parts._fields == ("linear", "attention", "mlp", "branch", "embed")
    x, lc = linear_forward(np.ones((1, 2)), np.ones((2, 3)), np.zeros(3))  # the layer under LINEAR
    out, pc = LINEAR.forward(np.ones((1, 2)), {"p.weight": np.ones((2, 3)), "p.bias": np.zeros(3)}, "p", ctx)
    assert np.array_equal(x, out) and np.array_equal(linear_backward(x, lc)[1], LINEAR.backward(x, pc)[1]["p.weight"])
