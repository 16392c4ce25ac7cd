"""The mixture of experts: the layer (routing, capacity, the load-balancing loss, its backward
against finite differences), GPTConfig's expert fields, and a GPT with experts (parameters, the
block and whole-model checks, decoding, sampling, checkpoints ours and transformers', training:
metrics, resume, threads; LoRA; the command line)."""
import dataclasses
import doctest
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tinygen.moe
from tinygen import GPT, GPTConfig
from tinygen.beam import beam_search
from tinygen.cli import main
from tinygen.config import MOE_MODEL_TYPE
from tinygen.data import RandomBatches, fixed_batches
from tinygen.errors import TinygenError
from tinygen.finetuning.lora import LoraSpec, init_lora, lora_linear
from tinygen.gradient_check import EPS, THRESHOLD, check_layer, check_model, check_part, moe_model_check
from tinygen.layers import gelu_backward, gelu_forward, linear_backward, linear_forward, softmax
from tinygen.loss import cross_entropy_forward
from tinygen.model import KVCache, gpt_forward, param_shapes
from tinygen.moe import (
    NAMES, active_params, dispatch, expert_capacity, load_balancing_loss, moe_backward, moe_forward, moe_shapes,
    routing_margin, top_experts,
)
from tinygen.moe_check import (TIE_MARGIN, block_setup, draw_moe_layer, moe_with_aux_backward, moe_with_aux_forward,
                               part_setup)
from tinygen.optim import AdamW
from tinygen.parts import EXPERT_MLP, GPT2, parts_for
from tinygen.plumbing.metrics import read_metrics
from tinygen.plumbing.parallel import Workers
from tinygen.sampling import generate
from tinygen.train import TrainConfig, accumulate_grads, train

seeds = st.integers(0, 2**32 - 1)


@st.composite
def layer_shapes(draw, max_expert=5):
    """(B, T, C, E, k)"""
    E = draw(st.integers(1, max_expert))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5)), E, draw(st.integers(1, E)))


def dense_mlp(x, fc_w, fc_b, proj_w, proj_b):
    """GPT-2's MLP, from tinygen.layers: (out, backward(dout) -> (dx, dfc_w, dfc_b, dproj_w, dproj_b))."""
    h, fc = linear_forward(x, fc_w, fc_b)
    h, gelu = gelu_forward(h)
    out, proj = linear_forward(h, proj_w, proj_b)

    def backward(dout):
        dh, dproj_w, dproj_b = linear_backward(dout, proj)
        (dh,) = gelu_backward(dh, gelu)
        dx, dfc_w, dfc_b = linear_backward(dh, fc)
        return dx, dfc_w, dfc_b, dproj_w, dproj_b

    return out, backward


def test_docstring_examples():
    assert doctest.testmod(tinygen.moe).failed == 0


# ------------------------------------------------------------------ routing
@given(layer_shapes(), seeds)
def test_gates_of_each_token_sum_to_one_and_follow_the_top_probabilities(shape, seed):
    B, T, C, E, k = shape
    args = draw_moe_layer(np.random.default_rng(seed), B, T, C, E, k)
    y, cache = moe_forward(*args, top_k=k)
    assert y.shape == (B, T, C)
    np.testing.assert_allclose(cache.gates.sum(axis=1), 1.0, rtol=1e-12)
    assert (cache.gates > 0).all()
    for n in range(B * T):  # the chosen experts are distinct, best first, and no unchosen one beats them
        chosen = cache.probs[n, cache.top[n]]
        assert len(set(cache.top[n])) == k and (np.diff(chosen) <= 0).all()
        assert np.delete(cache.probs[n], cache.top[n]).max(initial=-1) <= chosen.min()
    np.testing.assert_allclose(cache.load.sum(), 1.0)
    assert cache.dropped == 0.0 and cache.keep.all()  # no capacity: nothing dropped


def test_top_experts_breaks_ties_towards_the_lower_index():
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1]])
    np.testing.assert_array_equal(top_experts(probs, 2), [[0, 1], [1, 2]])


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), seeds)
def test_one_expert_is_the_dense_mlp_with_the_same_weights(B, T, C, seed):
    rng = np.random.default_rng(seed)
    x, router_w, router_b, fc_w, fc_b, proj_w, proj_b = draw_moe_layer(rng, B, T, C, E=1, top_k=1)
    y, cache = moe_forward(x, router_w, router_b, fc_w, fc_b, proj_w, proj_b, top_k=1)
    dense, dense_backward = dense_mlp(x, fc_w[0], fc_b[0], proj_w[0], proj_b[0])
    np.testing.assert_allclose(y, dense, rtol=1e-12, atol=1e-14)
    assert cache.aux == 1.0  # E f P = 1 * 1 * 1
    dout = rng.standard_normal(y.shape)
    dx, drouter_w, drouter_b, dfc_w, dfc_b, dproj_w, dproj_b = moe_backward(dout, cache, daux=0.7)
    want = dense_backward(dout)
    for got, expected in zip((dx, dfc_w[0], dfc_b[0], dproj_w[0], dproj_b[0]), want):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)
    assert not drouter_w.any() and not drouter_b.any()  # softmax over one expert is the constant 1


@given(layer_shapes(max_expert=4), seeds)
def test_top_k_equal_to_experts_is_the_probability_weighted_sum_of_all(shape, seed):
    B, T, C, E, _ = shape
    x, router_w, router_b, *experts = draw_moe_layer(np.random.default_rng(seed), B, T, C, E, E)
    y, _ = moe_forward(x, router_w, router_b, *experts, top_k=E)
    p = softmax(x @ router_w + router_b)  # (B, T, E)
    want = sum(p[..., e:e + 1] * dense_mlp(x, *(w[e] for w in experts))[0] for e in range(E))
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)


@given(layer_shapes(), st.one_of(st.none(), st.floats(1.0, 4.0)), seeds)
def test_unlimited_capacity_drops_nothing(shape, factor, seed):
    """No factor, or one of at least E/k (then capacity >= N >= any expert's share): all kept."""
    B, T, C, E, k = shape
    args = draw_moe_layer(np.random.default_rng(seed), B, T, C, E, k)
    factor = None if factor is None else factor * E / k
    y, cache = moe_forward(*args, top_k=k, capacity_factor=factor)
    assert cache.keep.all() and cache.dropped == 0.0
    np.testing.assert_array_equal(y, moe_forward(*args, top_k=k)[0])


def two_groups(n=6, E=3):
    """x and a router sending tokens [0, n/2) to experts (0, 1) and [n/2, n) to (1, 0)."""
    x = np.zeros((1, n, 2))
    x[0, :n // 2, 0] = x[0, n // 2:, 1] = 1.0
    router_w = np.array([[5.0, 4.0] + [0.0] * (E - 2), [4.0, 5.0] + [0.0] * (E - 2)])
    return x, router_w, np.zeros(E)


def test_capacity_takes_first_choices_before_second_choices():
    """Experts 0 and 1 each get 3 first and 3 second choices; a capacity of 3 keeps the first."""
    x, router_w, router_b = two_groups()
    rng = np.random.default_rng(0)
    experts = [rng.standard_normal(s) for s in ((3, 2, 8), (3, 8), (3, 8, 2), (3, 2))]
    assert expert_capacity(6, 2, 3, 0.75) == 3
    y, cache = moe_forward(x, router_w, router_b, *experts, top_k=2, capacity_factor=0.75)
    assert cache.keep[:, 0].all() and not cache.keep[:, 1].any()
    assert cache.dropped == 0.5
    np.testing.assert_allclose(cache.load, [0.5, 0.5, 0.0])  # counted before the capacity
    first = [dense_mlp(x[0, n], *(w[cache.top[n, 0]] for w in experts))[0] for n in range(6)]
    np.testing.assert_allclose(y[0], cache.gates[:, :1] * np.array(first), rtol=1e-12)
    _, _, _, *expert_grads = moe_backward(np.ones_like(y), cache)
    assert all(not g[2].any() for g in expert_grads)  # expert 2 got no assignment: zero gradients
    assert all(g[0].any() for g in expert_grads)


def test_capacity_keeps_the_earlier_tokens_and_drops_the_rest_to_zero():
    x, router_w, router_b = two_groups(n=8, E=2)
    router_b = np.array([20.0, 0.0])  # every token's first choice: expert 0
    rng = np.random.default_rng(1)
    experts = [rng.standard_normal(s) for s in ((2, 2, 8), (2, 8), (2, 8, 2), (2, 2))]
    y, cache = moe_forward(x, router_w, router_b, *experts, top_k=1, capacity_factor=1.0)  # capacity 4
    np.testing.assert_array_equal(cache.keep[:, 0], [True] * 4 + [False] * 4)
    assert cache.dropped == 0.5 and (y[0, 4:] == 0).all() and (y[0, :4] != 0).all()
    dx, *grads = moe_backward(np.ones_like(y), cache)
    assert not dx[0, 4:].any()  # a dropped token gets no gradient through the experts (router: f_e only, here 0)


def test_dispatch_groups_by_expert_in_priority_order():
    top = np.array([[2, 0], [0, 2], [2, 1]])  # assignments a = j*3 + n
    order, starts, counts, kept, keep = dispatch(top, 3, capacity=1)
    np.testing.assert_array_equal(order, [1, 3, 5, 0, 2, 4])  # expert 0: a=1, 3; expert 1: a=5; expert 2: a=0, 2, 4
    np.testing.assert_array_equal(counts, [2, 1, 3])
    np.testing.assert_array_equal(kept, [1, 1, 1])
    np.testing.assert_array_equal(keep, [[True, False], [True, False], [False, True]])


# ------------------------------------------------------------------ the load-balancing loss
def test_load_balancing_loss_is_one_when_uniform_and_e_when_collapsed():
    E, N = 4, 8
    aux, f = load_balancing_loss(np.full((N, E), 1 / E), np.full(E, N))
    assert aux == pytest.approx(1.0) and np.allclose(f, 1 / E)
    collapsed = np.zeros((N, E))
    collapsed[:, 2] = 1.0
    assert load_balancing_loss(collapsed, np.array([0, 0, N, 0]))[0] == pytest.approx(E)


def test_aux_gradient_flows_through_the_mean_probabilities_only():
    """d aux / d p[n, e] = E f_e / N: with daux = 1 and dy = 0 the router gradient is that, through softmax."""
    rng = np.random.default_rng(3)
    args = draw_moe_layer(rng, E=3, top_k=1)
    y, cache = moe_forward(*args, top_k=1)
    dx, drouter_w, drouter_b, *rest = moe_backward(np.zeros_like(y), cache, daux=1.0)
    N, E = cache.probs.shape
    dp = np.broadcast_to(E * cache.load / N, (N, E))
    dz = cache.probs * (dp - np.sum(dp * cache.probs, axis=1, keepdims=True))
    np.testing.assert_allclose(drouter_b, dz.sum(axis=0), rtol=1e-12)
    assert all(not g.any() for g in rest)  # the experts do not enter aux


# ------------------------------------------------------------------ gradients
@given(layer_shapes(), st.sampled_from([None, 0.3, 0.7]), seeds)
def test_backward_matches_finite_differences(shape, factor, seed):
    """All seven gradients, aux's path included (the surrogate weighs aux by a random daux)."""
    B, T, C, E, k = shape
    rng = np.random.default_rng(seed)
    args = draw_moe_layer(rng, B, T, C, E, k)
    options = {"top_k": k, "capacity_factor": factor}
    errors = check_layer(moe_with_aux_forward, moe_with_aux_backward, args, options, ["x", *NAMES],
                         max_coords=24, seed=seed % 1000)
    assert max(errors.values()) < THRESHOLD, errors


def test_routing_margin_measures_the_gap_at_the_top_k_boundary():
    logits = np.array([[3.0, 1.0, 0.5, 2.9], [0.0, 0.0, 1.0, -1.0]])
    assert routing_margin(logits, 1) == pytest.approx(0.1)  # row 0: 3.0 vs 2.9
    assert routing_margin(logits, 2) == 0.0  # row 1: a tie between experts 0 and 1
    assert routing_margin(logits, 4) == math.inf
    assert routing_margin(logits, 2, ordered=True) == 0.0
    assert routing_margin(logits[:1], 2, ordered=True) == pytest.approx(0.1)  # 3.0 vs 2.9, first vs second
    assert routing_margin(logits[:1], 4, ordered=True) == pytest.approx(0.1)  # k = E: every gap still counts    assert TIE_MARGIN > 0


def test_float32_stays_float32():
    args = [a.astype(np.float32) for a in draw_moe_layer(np.random.default_rng(0))]
    y, cache = moe_forward(*args, top_k=2, capacity_factor=0.8)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in moe_backward(y, cache, daux=0.01))


def test_bad_arguments_are_named():
    args = draw_moe_layer(np.random.default_rng(0), E=2, top_k=1)
    with pytest.raises(TinygenError, match="top_k must be in \\[1, 2\\]"):
        moe_forward(*args, top_k=3)
    with pytest.raises(TinygenError, match="width 3"):
        moe_forward(args[0][..., :3], *args[1:], top_k=1)


def test_shapes_of_the_stacked_experts():
    assert moe_shapes(8, 4) == {"router.weight": (8, 4), "router.bias": (4,),
                                "experts.c_fc.weight": (4, 8, 32), "experts.c_fc.bias": (4, 32),
                                "experts.c_proj.weight": (4, 32, 8), "experts.c_proj.bias": (4, 8)}
    assert tuple(moe_shapes(8, 4)) == NAMES


# ------------------------------------------------------------------ configuration
BASE = dict(vocab_size=16, block_size=8, n_layer=4, n_head=2, n_embd=8)


@pytest.mark.parametrize("changes, field", [
    (dict(n_expert=-1), "n_expert"),
    (dict(n_expert=2, expert_top_k=3), "expert_top_k"),
    (dict(expert_top_k=0), "expert_top_k"),
    (dict(moe_every=0), "moe_every"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.5), "capacity_factor"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(n_expert=2.0), "n_expert"),
])
def test_bad_expert_settings_get_one_error_naming_the_field(changes, field):
    with pytest.raises(TinygenError, match=f"GPTConfig.{field}"):
        GPTConfig(**BASE, **changes)


def test_expert_blocks_are_every_moe_every_th():
    assert [GPTConfig(**BASE, n_expert=4).is_moe_block(i) for i in range(4)] == [False, True, False, True]
    assert [GPTConfig(**BASE, n_expert=4, moe_every=1).is_moe_block(i) for i in range(4)] == [True] * 4
    assert [GPTConfig(**BASE, n_expert=4, moe_every=3).is_moe_block(i) for i in range(4)] == [False, False, True, False]
    assert not any(GPTConfig(**BASE).is_moe_block(i) for i in range(4))  # n_expert = 0: dense


def test_dense_config_json_is_unchanged_and_moe_config_json_is_not_gpt2():
    dense = GPTConfig(**BASE).to_hf()
    assert dense["model_type"] == "gpt2" and dense["tinygen"] == {"dtype": "float32", "dropout": 0.0, "causal": True}
    moe = GPTConfig(**BASE, n_expert=4, capacity_factor=1.25)
    hf = moe.to_hf()
    assert hf["model_type"] == MOE_MODEL_TYPE and hf["architectures"] == ["TinygenMoEForCausalLM"]
    assert not {"n_embd", "n_layer", "n_head", "vocab_size", "n_positions"} & set(hf)  # see GPTConfig.to_hf
    assert hf["tinygen"]["n_expert"] == 4 and hf["tinygen"]["capacity_factor"] == 1.25
    assert GPTConfig.from_hf(hf) == moe
    assert GPTConfig.from_hf(GPTConfig(**BASE).to_hf()) == GPTConfig(**BASE)


def test_config_json_that_contradicts_itself_is_refused():
    hf = GPTConfig(**BASE).to_hf()
    hf["tinygen"]["n_expert"] = 4
    with pytest.raises(TinygenError, match="model_type 'gpt2' with n_expert=4 under 'tinygen'"):
        GPTConfig.from_hf(hf)
    hf = GPTConfig(**BASE, n_expert=4).to_hf()
    hf["tinygen"]["n_expert"] = 0
    with pytest.raises(TinygenError, match="needs n_expert > 0"):
        GPTConfig.from_hf(hf)
    hf = GPTConfig(**BASE, n_expert=4).to_hf()
    hf["tinygen"]["n_experts"] = 4
    with pytest.raises(TinygenError, match="unknown field 'n_experts' under 'tinygen'"):
        GPTConfig.from_hf(hf)
    with pytest.raises(TinygenError, match="model_type must be 'gpt2', 'tinygen_bidirectional' .* or 'tinygen_moe'"):
        GPTConfig.from_hf({**GPTConfig(**BASE).to_hf(), "model_type": "mixtral"})


# ------------------------------------------------------------------ the expert-load plot
def test_expert_load_svg_has_one_panel_per_block_and_a_line_per_expert(tmp_path):
    import xml.etree.ElementTree as ET

    from tinygen.plumbing.plot import write_expert_load_svg

    rows = [{"step": s, "train_loss": 3.0, "expert_load": {"h.1": [0.5, 0.25, 0.25], "h.3": [0.2, 0.2, 0.6]}}
            for s in range(1, 60)]
    path = tmp_path / "expert_load.svg"
    write_expert_load_svg(path, [{"step": 0, "val_loss": 7.0}] + rows)  # a row without loads is skipped
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    panels = root.findall(f"{ns}svg")
    assert len(panels) == 2 and root.get("height") == str(2 * int(panels[0].get("height")))
    titles = [t.text for t in root.iter(f"{ns}text") if t.text and t.text.startswith("expert load")]
    assert titles == ["expert load, h.1 (mean over 25 steps)", "expert load, h.3 (mean over 25 steps)"]
    legend = {t.text for t in root.iter(f"{ns}text")}
    assert {"expert 0", "expert 1", "expert 2", "1/E"} <= legend
    ids = [e.get("id") for e in root.iter() if e.get("id")]
    assert len(ids) == len(set(ids)) == 2  # one clip path per panel, unique
    write_expert_load_svg(path, [{"step": 1, "train_loss": 2.0}])  # a dense run: one "no data" panel
    assert "no data" in path.read_text()


# ================================================================== a GPT with experts
SMALL = dict(vocab_size=19, block_size=12, n_layer=4, n_head=2, n_embd=8)


def moe_model(seed=0, **changes):
    """A float64 model with experts in blocks 1 and 3, weights moved off the init so routing varies."""
    config = GPTConfig(**{**SMALL, "dtype": "float64", "n_expert": 4, **changes})
    model = GPT(config, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for p in model.params.values():
        p += rng.normal(0, 0.3, p.shape)
    return model


# ------------------------------------------------------------------ parameters and parts
def test_expert_blocks_have_a_router_and_stacked_experts_and_no_dense_mlp():
    config = GPTConfig(**SMALL, n_expert=3)
    shapes = param_shapes(config)
    for i in (1, 3):
        assert shapes[f"h.{i}.mlp.router.weight"] == (8, 3) and shapes[f"h.{i}.mlp.router.bias"] == (3,)
        assert shapes[f"h.{i}.mlp.experts.c_fc.weight"] == (3, 8, 32)
        assert shapes[f"h.{i}.mlp.experts.c_proj.weight"] == (3, 32, 8)
        assert f"h.{i}.mlp.c_fc.weight" not in shapes
    for i in (0, 2):
        assert shapes[f"h.{i}.mlp.c_fc.weight"] == (8, 32) and f"h.{i}.mlp.router.weight" not in shapes
    assert parts_for(config) == GPT2._replace(mlp=EXPERT_MLP)
    params = GPT(config).params
    dense = 8 * 32 + 32 + 32 * 8 + 8  # one MLP
    routers = 2 * (8 * 3 + 3)
    assert sum(p.size for p in params.values()) == sum(p.size for p in GPT(GPTConfig(**SMALL)).params.values()) \
        + 2 * 2 * dense + routers  # blocks 1 and 3: 3 MLPs instead of 1
    assert active_params(params, 2) == sum(p.size for p in GPT(GPTConfig(**SMALL)).params.values()) + 2 * dense + routers


def test_no_experts_is_todays_dense_model_bit_for_bit(tmp_path):
    """n_expert=0 ignores the other expert fields: same parameters, same parts, same logits, same files."""
    dense = GPT(GPTConfig(**SMALL), seed=3)
    other = GPT(GPTConfig(**SMALL, expert_top_k=1, moe_every=1, capacity_factor=0.5, aux_loss_coef=0.5), seed=3)
    assert other.parts == GPT2 and list(other.params) == list(dense.params)
    assert all(np.array_equal(other.params[k], dense.params[k]) for k in dense.params)
    idx = np.arange(12).reshape(1, 12) % 19
    assert np.array_equal(other.forward(idx), dense.forward(idx))
    dense.save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    hf = json.loads((tmp_path / "a" / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["tinygen"] == {"dtype": "float32", "dropout": 0.0, "causal": True}


# ------------------------------------------------------------------ gradient checks
def test_block_with_experts_matches_finite_differences():
    errors = check_part(*block_setup(np.random.default_rng(1)), max_coords=32)
    assert len(errors) == 15 and max(errors.values()) < THRESHOLD, errors  # x and 14 parameters


def test_whole_model_with_experts_matches_finite_differences():
    rows = moe_model_check(seed=2, max_coords=8)
    assert set(rows) == set(param_shapes(GPTConfig(11, 8, 2, 2, 8, n_expert=4)))  # every parameter
    assert any(".mlp.router." in n for n in rows) and any(".mlp.c_fc." in n for n in rows)
    assert max(e for _, e in rows.values()) < THRESHOLD, rows


def test_expert_part_in_a_training_forward_matches_finite_differences():
    errors = check_part(*part_setup(np.random.default_rng(3)))
    assert len(errors) == 7 and max(errors.values()) < THRESHOLD, errors
    assert TIE_MARGIN == pytest.approx(200 * EPS)


def test_the_checks_do_drop_tokens_and_weigh_the_aux_loss():
    """The block and model checks run with a capacity that drops assignments (else they would not test it)."""
    model = moe_model(capacity_factor=0.5)
    idx = np.random.default_rng(0).integers(0, 19, (2, 12))
    stats = {}
    loss, grads, aux = model.loss_and_grads(idx, idx, rng=np.random.default_rng(0), return_aux=True, stats=stats)
    assert set(aux) == {"h.1.mlp.aux", "h.3.mlp.aux"} and all(v >= 0.01 * 0.999 for v in aux.values())
    assert all(d > 0 for d in stats["expert_dropped"].values())
    assert set(stats["expert_load"]) == {"h.1", "h.3"} and all(np.isclose(sum(v), 1) for v in stats["expert_load"].values())


def test_float64_model_check_without_training_forward_has_no_aux():
    """Outside training (no rng) there is no capacity and no aux loss: GPT.loss is the language-model loss."""
    model = moe_model(capacity_factor=0.5)
    idx = np.random.default_rng(1).integers(0, 19, (2, 12))
    logits, cache = gpt_forward(model.params, idx, model.config, model.parts)
    assert cache.aux == [] and model.loss(idx, idx) == cross_entropy_forward(logits, idx)[0]
    names = ["wte.weight", "h.1.mlp.router.weight", "h.1.mlp.experts.c_fc.weight", "h.3.mlp.router.bias"]
    errors = check_model(model, idx, idx, max_coords=4, names=names)  # GPT.loss against its gradient: no aux
    assert max(errors.values()) < THRESHOLD


# ------------------------------------------------------------------ decoding and sampling
@settings(max_examples=10)
@given(st.integers(1, 4), st.integers(1, 2), st.integers(1, 2), st.integers(1, 11), st.integers(0, 100))
def test_kv_cache_decoding_equals_full_recompute(E, k, moe_every, prompt, seed):
    k = min(k, E)
    model = moe_model(seed, n_expert=E, expert_top_k=k, moe_every=moe_every, capacity_factor=0.3)
    ids = np.random.default_rng(seed).integers(0, 19, (2, 12))
    full = model.forward(ids)  # (2, 12, V)
    kv = KVCache(model.config, 2)
    steps = [model.forward(ids[:, :prompt], kv=kv)]
    steps += [model.forward(ids[:, t:t + 1], kv=kv) for t in range(prompt, 12)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-10, atol=1e-12)


def test_generate_and_beam_search_with_and_without_the_cache_agree():
    model = moe_model(5)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    a = generate(model, prompt, 14, temperature=0.0)  # past block_size: the window slides
    b = generate(model, prompt, 14, temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(a, b)
    c = generate(model, prompt, 6, temperature=1.0, top_k=5, seed=7)
    assert c.shape == (2, 9) and np.array_equal(c, generate(model, prompt, 6, temperature=1.0, top_k=5, seed=7))
    for prompt_ in (prompt, np.array([[7, 8, 9], [1, 1, 2]])):
        a = beam_search(model, prompt_, 12, 3, num_return_sequences=2)  # past block_size: the window slides
        b = beam_search(model, prompt_, 12, 3, num_return_sequences=2, use_cache=False)
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10)


def test_sample_command_on_a_run_directory_with_experts(tmp_path, capsys):
    from tinygen.tokenizer import ENDOFTEXT, Tokenizer

    tok = Tokenizer.train("the cat sat on the mat. the dog sat on the log. " * 20, vocab_size=270,
                          special_tokens=[ENDOFTEXT])
    model = GPT(GPTConfig(tok.vocab_size, 32, 2, 2, 16, n_expert=3, expert_top_k=2), seed=0)
    model.save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    assert main(["sample", "--model", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert main(["sample", "--model", str(tmp_path), "--prompt", "the", "--max-new-tokens", "4", "--num-beams", "2"]) == 0


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_and_mismatches_are_refused(tmp_path):
    model = moe_model(1, capacity_factor=1.5)
    model.save_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m", dtype="float64")
    assert loaded.config == model.config and loaded.parts == model.parts
    assert all(np.array_equal(loaded.params[k], model.params[k]) for k in model.params)
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["model_type"] == "tinygen_moe" and "n_embd" not in hf
    hf["tinygen"]["moe_every"] = 1  # experts claimed in every block, the weights have them in 1 and 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(TinygenError, match="the weights have experts in h.1, h.3, but config.json describes "
                                           "experts in h.0, h.1, h.2, h.3"):
        GPT.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(GPTConfig(**SMALL).to_hf()))
    with pytest.raises(TinygenError, match="config.json describes a dense GPT-2"):
        GPT.from_pretrained(tmp_path / "m")
    GPT(GPTConfig(**SMALL)).save_pretrained(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps(GPTConfig(**SMALL, n_expert=2).to_hf()))
    with pytest.raises(TinygenError, match="the weights have no experts, but config.json describes experts in h.1, h.3"):
        GPT.from_pretrained(tmp_path / "d")


def test_transformers_refuses_a_checkpoint_with_experts(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    GPT(GPTConfig(**SMALL, n_expert=2), seed=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tinygen_moe"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------ training
def tiny_setup(**changes):
    config = TrainConfig(vocab_size=29, block_size=8, n_layer=2, n_head=2, n_embd=16, batch_size=4, max_steps=8,
                         lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_interval=2, eval_batches=2,
                         checkpoint_interval=2, n_expert=4, expert_top_k=2, **changes)
    ids = np.random.default_rng(5).integers(0, 29, 600).astype(np.uint16)
    return config, RandomBatches(ids, 4, 8, 0), fixed_batches(ids, 2, 4, 8, 0)


TIMING = ("tokens_per_sec", "elapsed_s")


def rows_without_timing(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("workers", [1, 2])
def test_training_records_the_losses_and_the_load_and_resumes_bit_exact(tmp_path, workers):
    config, batches, val = tiny_setup(capacity_factor=1.0, workers=workers, dropout=0.1)
    full = GPT(config.model_config(29), seed=0)
    train(full, batches, config, tmp_path / "full", val_batches=val, progress=False)
    half = GPT(config.model_config(29), seed=0)
    train(half, batches, dataclasses.replace(config, max_steps=4, lr_decay_steps=8), tmp_path / "half",
          val_batches=val, progress=False)
    resumed = GPT(config.model_config(29), seed=9)
    train(resumed, batches, dataclasses.replace(config, lr_decay_steps=8), tmp_path / "half", val_batches=val,
          resume=True, progress=False)
    assert all(np.array_equal(full.params[k], resumed.params[k]) for k in full.params)
    rows = rows_without_timing(tmp_path / "full")
    assert rows == rows_without_timing(tmp_path / "half")
    for row in rows[1:]:
        assert row["train_loss"] == pytest.approx(row["lm_loss"] + row["aux_loss"], abs=2e-5)
        assert row["aux_loss"] >= 0.01 * 0.999  # coef * aux, aux >= 1 (one expert block)
        (load,) = row["expert_load"].values()
        assert len(load) == 4 and sum(load) == pytest.approx(1, abs=1e-4)
        assert 0 <= row["expert_dropped"]["h.1"] < 1
    assert rows[-1]["val_loss"] == pytest.approx(np.mean([full.loss(x, y) for x, y in val]), rel=1e-5)
    svg = (tmp_path / "full" / "expert_load.svg").read_text()
    assert svg.startswith("<svg") and "expert load, h.1" in svg


@pytest.mark.parametrize("coef", [0.0, 0.01])
def test_worker_threads_sum_to_the_one_stream_gradient(coef):
    """Without a capacity, routing is per token, so W shards give the whole batch's language-model
    loss, gradient and load. The aux loss is each shard's own (f and P are shard means, and
    f . P is not linear in them), as GShard's is per group: with it the gradients differ a little."""
    config, batches, _ = tiny_setup(aux_loss_coef=coef)
    model = GPT(dataclasses.replace(config.model_config(29), dtype="float64"), seed=1)
    runs = []
    for w in (1, 2):
        with Workers(w) as workers:
            opt = AdamW(model.params, lr=1e-3, workers=workers)
            measured = {}
            loss = accumulate_grads(model, opt, batches(0), workers=workers, config=dataclasses.replace(config, workers=w),
                                    step=0, measured=measured)
            runs.append((loss, np.concatenate([opt.grads[k].ravel() for k in sorted(opt.grads)]), measured))
    (loss1, g1, m1), (loss2, g2, m2) = runs
    assert m1["lm_loss"] == pytest.approx(m2["lm_loss"], rel=1e-12)
    np.testing.assert_allclose(m1["expert_load"]["h.1"], m2["expert_load"]["h.1"], rtol=1e-12)
    if coef == 0:
        assert loss1 == pytest.approx(loss2, rel=1e-12)
        np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-12)
    else:
        assert m1["aux_loss"] != m2["aux_loss"] and abs(m1["aux_loss"] - m2["aux_loss"]) < 0.1 * coef


def test_lora_on_the_attention_projections_of_a_model_with_experts():
    model = moe_model(2)
    spec = LoraSpec(rank=2, alpha=4.0, targets=("c_attn", "c_proj", "c_fc"))
    rng = np.random.default_rng(0)
    lora = init_lora(model.params, spec, rng)
    assert "h.0.attn.c_attn.lora_A" in lora and "h.0.mlp.c_fc.lora_A" in lora
    assert not any(".experts." in k for k in lora)  # stacked experts are not projections LoRA adapts
    params = {**model.params, **{k: v + rng.normal(0, 0.3, v.shape) for k, v in lora.items()}}
    tuned = GPT(model.config, params=params, parts=model.parts._replace(linear=lora_linear(spec, model.parts.linear)))
    idx = rng.integers(0, 19, (2, 12))
    names = [k for k in lora if ".attn." in k] + ["h.1.mlp.router.weight", "h.1.mlp.experts.c_fc.weight"]
    errors = check_model(tuned, idx, idx, max_coords=6, names=names)
    assert max(errors.values()) < THRESHOLD, errors


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("flags, message", [
    (["--n-expert", "-1"], "n_expert must be an integer >= 0"),
    (["--n-expert", "2", "--expert-top-k", "3"], "expert_top_k (3) must be at most n_expert (2)"),
    (["--moe-every", "0"], "moe_every must be a positive integer"),
    (["--capacity-factor", "0"], "capacity_factor must be a positive number"),
    (["--n-expert", "2", "--moe-every", "3"], "TrainConfig.moe_every (3) must be at most n_layer (2)"),
])
def test_bad_expert_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    code = main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_explain_traces_a_model_with_experts():
    """The logit lens cuts the model after each block: a cut with no expert block is a valid config."""
    from tinygen.explain import trace

    model = moe_model(4)
    t = trace(model, [1, 2, 3, 4, 5])
    assert len(t.attention) == 4 and len(t.lens) == 4  # one per block
    assert GPTConfig(**{**SMALL, "n_layer": 1}, n_expert=4).is_moe_block(0) is False


def test_decode_step_fast_path_equals_full_forward_with_experts():
    """kv_decoding.decode_step runs the experts too (no capacity): its logits are the full forward's."""
    from tinygen.kv_decoding import Decoder, decode_step

    model = moe_model(6, expert_top_k=1, capacity_factor=0.3)
    assert Decoder(model, 2).fast
    ids = np.random.default_rng(6).integers(0, 19, (2, 12))
    full = model.forward(ids)
    kv = KVCache(model.config, 2)
    model.forward(ids[:, :3], kv=kv)
    for n in range(3, 12):
        np.testing.assert_allclose(decode_step(model.params, model.config, ids[:, n], kv), full[:, n],
                                   rtol=1e-10, atol=1e-12)
