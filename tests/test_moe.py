"""The mixture-of-experts layer (tinygen.moe): routing, capacity, the load-balancing
loss, its backward against finite differences, and GPTConfig's expert fields."""
import doctest
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinygen.moe
from tinygen.moe_check import TIE_MARGIN, draw_moe_layer, moe_with_aux_backward, moe_with_aux_forward
from tinygen.config import MOE_MODEL_TYPE, GPTConfig
from tinygen.errors import TinygenError
from tinygen.gradient_check import THRESHOLD, check_layer
from tinygen.layers import gelu_backward, gelu_forward, linear_backward, linear_forward, softmax
from tinygen.moe import (
    NAMES, dispatch, expert_capacity, load_balancing_loss, moe_backward, moe_forward, moe_shapes, routing_margin,
    top_experts,
)

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
    (dict(n_expert=2, moe_every=5), "moe_every"),
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
    assert dense["model_type"] == "gpt2" and dense["tinygen"] == {"dtype": "float32", "dropout": 0.0}
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
    with pytest.raises(TinygenError, match="model_type 'gpt2' with tinygen.n_expert=4"):
        GPTConfig.from_hf(hf)
    hf = GPTConfig(**BASE, n_expert=4).to_hf()
    hf["tinygen"]["n_expert"] = 0
    with pytest.raises(TinygenError, match="needs n_expert > 0"):
        GPTConfig.from_hf(hf)
    hf = GPTConfig(**BASE, n_expert=4).to_hf()
    hf["tinygen"]["n_experts"] = 4
    with pytest.raises(TinygenError, match="unknown field tinygen.n_experts"):
        GPTConfig.from_hf(hf)
    with pytest.raises(TinygenError, match="model_type must be 'gpt2' or 'tinygen_moe'"):
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
    assert titles == ["expert load, h.1", "expert load, h.3"]
    legend = {t.text for t in root.iter(f"{ns}text")}
    assert {"expert 0", "expert 1", "expert 2", "1/E"} <= legend
    ids = [e.get("id") for e in root.iter() if e.get("id")]
    assert len(ids) == len(set(ids)) == 2  # one clip path per panel, unique
    write_expert_load_svg(path, [{"step": 1, "train_loss": 2.0}])  # a dense run: one "no data" panel
    assert "no data" in path.read_text()
