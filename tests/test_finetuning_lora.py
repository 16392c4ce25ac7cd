"""LoRA: the layer pair and the linear part against finite differences, the model at
initialisation equals its base exactly, merged equals unmerged, and the spec's validation."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygen import GPT, GPTConfig
from tinygen.errors import TinygenError
from tinygen.layers import dropout_mask
from tinygen.finetuning.lora import (LoraSpec, count, init_lora, lora_linear, lora_linear_backward, lora_linear_forward,
                                     merge, target_weights)
from tinygen.gradient_check import THRESHOLD, check_layer, check_model, check_part
from tinygen.parts import GPT2, LINEAR, make_context

CONFIG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")
ALL = ("c_attn", "c_proj", "c_fc")


@settings(max_examples=15)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3),
       st.booleans(), st.integers(0, 1000))
def test_lora_linear_gradients(B, T, C_in, N, r, with_dropout, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C_in))
    args = [x, rng.standard_normal((C_in, N)), rng.standard_normal(N),
            rng.standard_normal((C_in, r)), rng.standard_normal((r, N))]
    kwargs = {"scale": 1.5}
    if with_dropout:
        kwargs["mask"] = dropout_mask(x.shape, 0.4, rng, x.dtype)
    errors = check_layer(lora_linear_forward, lora_linear_backward, args, kwargs, ["x", "w", "b", "A", "B"])
    assert max(errors.values()) < THRESHOLD, errors


def test_lora_forward_is_base_plus_low_rank_update():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    A, B = rng.standard_normal((4, 2)), rng.standard_normal((2, 5))
    out, _ = lora_linear_forward(x, w, b, A, B, scale=0.5)
    np.testing.assert_allclose(out, x @ w + b + 0.5 * x @ A @ B, rtol=1e-12)


@settings(max_examples=15)
@given(st.sampled_from(["h.0.attn.c_attn", "h.0.attn.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]),
       st.sampled_from([("c_attn",), ("c_proj", "c_fc"), ALL]), st.sampled_from([0.0, 0.4]), st.integers(0, 1000))
def test_lora_linear_part_gradients(name, targets, dropout, seed):
    """On a target projection the part returns the gradients of weight, bias, lora_A and lora_B;
    on any other it is the base part (weight and bias only). Dropout masks are replayed."""
    spec = LoraSpec(rank=2, alpha=3.0, dropout=dropout, targets=targets)
    rng = np.random.default_rng(seed)
    params = GPT(CONFIG, seed=seed).params
    params.update({k: rng.standard_normal(v.shape) for k, v in init_lora(params, spec, rng).items()})
    x = rng.standard_normal((2, 3, params[name + ".weight"].shape[0]))
    part = lora_linear(spec, LINEAR)
    errors = check_part(part, x, params, name, make_context(CONFIG, rng=np.random.default_rng(seed)))
    lora = name.split(".")[-1] in targets
    assert set(errors) == {"x", name + ".weight", name + ".bias"} | ({name + ".lora_A", name + ".lora_B"} if lora else set())
    assert max(errors.values()) < THRESHOLD, errors


def test_lora_linear_part_on_a_target_is_the_layer_and_elsewhere_the_base():
    spec = LoraSpec(rank=2, alpha=4.0, targets=("c_fc",))
    rng = np.random.default_rng(0)
    params = GPT(CONFIG).params
    params.update({k: rng.standard_normal(v.shape) for k, v in init_lora(params, spec, rng).items()})
    x = rng.standard_normal((2, 3, 8))
    ctx = make_context(CONFIG)
    out, _ = lora_linear(spec, LINEAR).forward(x, params, "h.0.mlp.c_fc", ctx)
    p = {k[len("h.0.mlp.c_fc."):]: v for k, v in params.items() if k.startswith("h.0.mlp.c_fc.")}
    np.testing.assert_allclose(out, x @ p["weight"] + p["bias"] + 2.0 * x @ p["lora_A"] @ p["lora_B"], rtol=1e-12)
    out, _ = lora_linear(spec, LINEAR).forward(x, params, "h.0.attn.c_attn", ctx)
    assert np.array_equal(out, LINEAR.forward(x, params, "h.0.attn.c_attn", ctx)[0])


def lora_parts(spec):
    return GPT2._replace(linear=lora_linear(spec, GPT2.linear))


def lora_model(targets=ALL, seed=0, perturb=True):
    base = GPT(CONFIG, seed=seed)
    spec = LoraSpec(rank=2, alpha=4.0, targets=targets)
    params = dict(base.params)
    rng = np.random.default_rng(seed + 1)
    params.update(init_lora(params, spec, rng))
    if perturb:
        for k in params:
            if k.endswith(".lora_B"):
                params[k] = rng.normal(0, 0.1, params[k].shape)
    return base, GPT(CONFIG, params=params, parts=lora_parts(spec)), spec


def test_model_with_lora_at_init_equals_base_exactly():
    base, model, _ = lora_model(perturb=False)
    idx = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 7))
    assert np.array_equal(model.forward(idx), base.forward(idx))


def test_merged_lora_equals_unmerged():
    _, model, spec = lora_model()
    merged = merge(model.params, spec)
    assert not any(".lora_" in k for k in merged)
    assert set(merged) == set(GPT(CONFIG).params)
    idx = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (3, 8))
    np.testing.assert_allclose(GPT(CONFIG, params=merged).forward(idx), model.forward(idx), rtol=1e-10, atol=1e-12)
    # and the merge really changed the weights (the test is not vacuous) without touching the input
    assert not np.allclose(merged["h.0.attn.c_attn.weight"], model.params["h.0.attn.c_attn.weight"])


def test_model_gradients_with_lora():
    _, model, _ = lora_model(targets=("c_attn", "c_fc"))
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6))
    names = [k for k in model.params if ".lora_" in k] + ["h.1.mlp.c_fc.weight", "wte.weight"]
    errors = check_model(model, idx, targets, max_coords=6, names=names)
    assert max(errors.values()) < THRESHOLD, errors


def test_lora_dropout_changes_training_forward_only():
    base = GPT(CONFIG, seed=0)
    spec = LoraSpec(rank=2, alpha=2.0, dropout=0.5, targets=("c_attn",))
    params = {**base.params, **init_lora(base.params, spec, np.random.default_rng(0))}
    for k in params:
        if k.endswith(".lora_B"):
            params[k] = np.ones_like(params[k])
    model = GPT(CONFIG, params=params, parts=lora_parts(spec))
    idx = np.zeros((1, 4), dtype=np.int64)
    l1, _ = model.loss_and_grads(idx, idx, rng=np.random.default_rng(1))
    l2, _ = model.loss_and_grads(idx, idx, rng=np.random.default_rng(2))
    assert l1 != l2  # different dropout masks
    assert model.loss(idx, idx) == model.loss(idx, idx)  # evaluation: no dropout


def test_targets_and_count():
    params = GPT(CONFIG).params
    assert target_weights(params, ("c_proj",)) == ["h.0.attn.c_proj.weight", "h.0.mlp.c_proj.weight",
                                                  "h.1.attn.c_proj.weight", "h.1.mlp.c_proj.weight"]
    new = init_lora(params, LoraSpec(rank=3, targets=("c_attn",)), np.random.default_rng(0))
    assert new["h.0.attn.c_attn.lora_A"].shape == (8, 3) and new["h.0.attn.c_attn.lora_B"].shape == (3, 24)
    assert not new["h.0.attn.c_attn.lora_B"].any()
    assert count(new) == 2 * 3 * (8 + 24)


def test_lora_part_without_lora_tensors_names_the_missing_one():
    model = GPT(CONFIG, parts=lora_parts(LoraSpec(targets=("c_fc",))))
    with pytest.raises(KeyError, match="h.0.mlp.c_fc.lora_A"):
        model.forward(np.zeros((1, 2), dtype=np.int64))


@pytest.mark.parametrize("kwargs, field", [({"rank": 0}, "rank"), ({"rank": True}, "rank"), ({"alpha": -1.0}, "alpha"),
                                           ({"dropout": 1.0}, "dropout"), ({"targets": ("q_proj",)}, "targets"),
                                           ({"targets": ()}, "targets")])
def test_spec_validation(kwargs, field):
    with pytest.raises(TinygenError, match=f"LoraSpec.{field}"):
        LoraSpec(**kwargs)
    assert LoraSpec(targets="c_fc").targets == LoraSpec(targets=["c_fc"]).targets == ("c_fc",)
