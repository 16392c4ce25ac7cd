"""AdamW against a plain per-tensor reference, clipping, and the LR schedule."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygen.errors import TinygenError
from tinygen.optim import CHUNK, AdamW, FlatParams, clip_coef, clip_grad_norm, global_norm, lr_at

BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1


def make_params(rng, dtype=np.float64, C=4, V=7):
    """A miniature GPT-2 parameter dict: embeddings, a linear layer, layer norm."""
    shapes = {
        "wte.weight": (V, C), "wpe.weight": (5, C),
        "h.0.ln_1.weight": (C,), "h.0.ln_1.bias": (C,),
        "h.0.attn.c_attn.weight": (C, 3 * C), "h.0.attn.c_attn.bias": (3 * C,),
        "ln_f.weight": (C,), "ln_f.bias": (C,),
    }
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


def make_grads(rng, params):
    return {n: rng.standard_normal(p.shape).astype(p.dtype) for n, p in params.items()}


def reference_adamw(params, grads, state, lr, decayed, betas=BETAS, eps=EPS, wd=WD):
    """The textbook AdamW step, one tensor at a time, returning new arrays."""
    b1, b2 = betas
    state["t"] += 1
    t, out = state["t"], {}
    for n, p in params.items():
        g = grads[n]
        m = state["m"].get(n, np.zeros_like(p))
        v = state["v"].get(n, np.zeros_like(p))
        if n in decayed:
            p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        out[n] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        state["m"][n], state["v"][n] = m, v
    return out


def test_one_step_matches_the_reference_formula():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    expected_params = {n: p.copy() for n, p in params.items()}
    grads = make_grads(rng, params)
    opt = AdamW(params, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD)
    opt.step(grads)
    decayed = {n for n, p in expected_params.items() if p.ndim >= 2}
    expected = reference_adamw(expected_params, grads, {"t": 0, "m": {}, "v": {}}, 1e-2, decayed)
    for n in params:
        np.testing.assert_allclose(params[n], expected[n], rtol=1e-13, atol=1e-15, err_msg=n)


def test_several_steps_with_changing_lr_match_the_reference():
    rng = np.random.default_rng(1)
    params = make_params(rng)
    ref = {n: p.copy() for n, p in params.items()}
    decayed = {n for n, p in ref.items() if p.ndim >= 2}
    state = {"t": 0, "m": {}, "v": {}}
    opt = AdamW(params, lr=3e-3, weight_decay=WD)
    for step in range(5):
        grads = make_grads(rng, params)
        lr = lr_at(step, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=5)
        opt.step(grads, lr)
        ref = reference_adamw(ref, grads, state, lr, decayed)
    assert opt.t == 5
    for n in params:
        np.testing.assert_allclose(params[n], ref[n], rtol=1e-12, atol=1e-14, err_msg=n)


def test_weight_decay_skips_one_dimensional_params():
    # With zero gradients the Adam update is 0 / (0 + eps) = 0, so only decay acts.
    rng = np.random.default_rng(2)
    params = make_params(rng)
    before = {n: p.copy() for n, p in params.items()}
    opt = AdamW(params, lr=0.5, weight_decay=0.2)
    opt.step({n: np.zeros_like(p) for n, p in params.items()})
    for n, p in params.items():
        factor = 1 - 0.5 * 0.2 if p.ndim >= 2 else 1.0
        np.testing.assert_allclose(p, before[n] * factor, rtol=1e-15, err_msg=n)
    assert opt.n_decay == sum(p.size for p in params.values() if p.ndim >= 2)


def test_frozen_params_are_untouched_and_have_no_state():
    rng = np.random.default_rng(3)
    params = make_params(rng)
    frozen = {n: params[n] for n in params if not n.startswith("h.0.")}
    frozen_values = {n: p.copy() for n, p in frozen.items()}
    opt = AdamW(params, lr=1e-2, trainable=lambda name: name.startswith("h.0."))
    opt.step(make_grads(rng, params))  # grads for frozen params are given, and ignored
    for n, p in frozen.items():
        assert params[n] is p  # not repacked
        np.testing.assert_array_equal(p, frozen_values[n])
    assert sorted(opt.frozen) == sorted(frozen)
    assert opt.m.size == sum(params[n].size for n in params if n.startswith("h.0."))
    assert not any(k.endswith(n) for k in opt.state_dict() for n in frozen)
    # a set of names works like the predicate; unknown names are an error
    AdamW(make_params(rng), lr=1e-2, trainable={"ln_f.bias"})
    with pytest.raises(TinygenError, match="not parameters"):
        AdamW(make_params(rng), lr=1e-2, trainable={"ln_f.bias", "nope"})


def test_params_become_views_of_one_flat_buffer():
    rng = np.random.default_rng(4)
    params = make_params(rng, np.float32)
    values = {n: p.copy() for n, p in params.items()}
    opt = AdamW(params, lr=1e-3)
    for n, p in params.items():
        assert np.shares_memory(p, opt.flat.buffer)
        np.testing.assert_array_equal(p, values[n])
        assert p.dtype == np.float32 and p.shape == values[n].shape
    # decayed (2-D) parameters come first, so decay is one slice
    assert all(params[n].ndim >= 2 for n in opt.names[: len(opt.decayed)])
    params["ln_f.bias"] = np.zeros(4, np.float32)  # rebinding breaks the link...
    with pytest.raises(TinygenError, match=r"params\['ln_f.bias'\] was replaced"):
        opt.step(make_grads(rng, values))  # ...and step says so


def test_flat_params_layout_and_errors():
    flat = FlatParams({"a": np.ones((2, 2)), "b": np.arange(3.0)}, order=["b", "a"])
    assert flat.slices == {"b": (0, 3), "a": (3, 7)}
    np.testing.assert_array_equal(flat.buffer, [0, 1, 2, 1, 1, 1, 1])
    g = flat.flatten({"a": np.full((2, 2), 5.0), "b": np.zeros(3), "extra": np.ones(1)})
    np.testing.assert_array_equal(flat.views_of(g)["a"], np.full((2, 2), 5.0))
    with pytest.raises(TinygenError, match="one dtype"):
        FlatParams({"a": np.ones(2, np.float32), "b": np.ones(2, np.float64)})
    with pytest.raises(TinygenError, match=r"grads\['a'\] has shape"):
        flat.flatten({"a": np.ones(4), "b": np.zeros(3)}, what="grads")
    with pytest.raises(TinygenError, match="no entry 'b'"):
        flat.flatten({"a": np.ones((2, 2))})


def test_float32_stays_float32_and_bad_grads_are_named():
    rng = np.random.default_rng(5)
    params = make_params(rng, np.float32)
    opt = AdamW(params, lr=1e-3)
    opt.step(make_grads(rng, params), lr=1e-3)
    assert all(p.dtype == np.float32 for p in params.values())
    assert opt.m.dtype == opt.v.dtype == np.float32
    assert all(a.dtype == np.float32 for k, a in opt.state_dict().items() if k != "t")
    grads64 = {n: p.astype(np.float64) for n, p in params.items()}
    with pytest.raises(TinygenError, match="dtype float64, expected float32"):
        opt.step(grads64)
    with pytest.raises(TinygenError, match="no entry 'wte.weight'"):
        opt.step({})


def test_accumulating_into_opt_grads_equals_passing_a_dict():
    rng = np.random.default_rng(6)
    p1 = make_params(rng)
    p2 = {n: p.copy() for n, p in p1.items()}
    micro = [make_grads(rng, p1) for _ in range(3)]
    opt1, opt2 = AdamW(p1, lr=1e-2), AdamW(p2, lr=1e-2)
    opt1.step({n: sum(g[n] for g in micro) / 3 for n in p1})
    opt2.zero_grad()
    for g in micro:
        for n in opt2.grads:
            opt2.grads[n] += g[n] / 3
    opt2.step(opt2.grads)
    for n in p1:
        np.testing.assert_allclose(p1[n], p2[n], rtol=1e-13, err_msg=n)


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_sum_grads_sums_shard_dicts_by_ranges_into_the_buffer(n_workers):
    """sum_grads overwrites, then accumulates; any thread count gives the bits of a plain
    left-to-right sum; clip_grads / grad_norm act on that buffer; step() applies it."""
    from tinygen.plumbing.parallel import Workers

    rng = np.random.default_rng(11)
    params = make_params(rng, np.float32)
    trainable = [n for n in params if n != "wpe.weight"]
    first, second = [make_grads(rng, params) for _ in range(3)], [make_grads(rng, params) for _ in range(2)]
    with Workers(n_workers) as workers:
        opt = AdamW({n: p.copy() for n, p in params.items()}, lr=1e-2, trainable=trainable, workers=workers)
        opt.grad_buffer.fill(np.nan)  # overwritten, not added to
        opt.sum_grads(first)
        opt.sum_grads(second, accumulate=True)
        for n in trainable:
            want = first[0][n] + first[1][n] + first[2][n]  # the same order of float32 additions
            want = want + second[0][n] + second[1][n]
            assert np.array_equal(opt.grads[n], want), n
        norm = opt.grad_norm()
        assert norm == pytest.approx(global_norm({n: opt.grads[n] for n in trainable}), rel=1e-12)
        assert opt.clip_grads(norm / 2) == norm and opt.grad_norm() == pytest.approx(norm / 2, rel=1e-5)
        clipped = {n: opt.grads[n].copy() for n in trainable}
        opt.step(lr=1e-2)
    reference = AdamW({n: p.copy() for n, p in params.items()}, lr=1e-2, trainable=trainable)
    reference.step(clipped)
    assert np.array_equal(opt.flat.buffer, reference.flat.buffer)


@pytest.mark.parametrize("n_workers", [1, 2])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])  # clipped, and left alone (coef 1)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_with_grad_scale_is_clip_grads_then_step(monkeypatch, n_workers, max_norm, dtype):
    """The training loop's step(grad_scale=clip_coef(grad_norm(), max_norm)) scales each piece
    of the buffer inside the update: the same bits as clip_grads(max_norm) then step(), buffer
    left clipped too. Pieces of 16 elements (the buffer's ~120 in several pieces per thread,
    the weight-decay boundary inside one)."""
    from tinygen import optim
    from tinygen.plumbing.parallel import Workers

    monkeypatch.setattr(optim, "CHUNK", 16)
    monkeypatch.setattr(optim, "THREADED_CHUNK", 16)
    rng = np.random.default_rng(13)
    params = make_params(rng, dtype)
    grads = [make_grads(rng, params) for _ in range(3)]
    with Workers(n_workers) as workers:
        fused = AdamW({n: p.copy() for n, p in params.items()}, lr=1e-2, workers=workers)
        apart = AdamW({n: p.copy() for n, p in params.items()}, lr=1e-2, workers=workers)
        for g in grads:
            fused.sum_grads([g])
            norm = fused.grad_norm()
            fused.step(lr=1e-2, grad_scale=clip_coef(norm, max_norm))
            apart.sum_grads([g])
            assert apart.clip_grads(max_norm) == norm
            apart.step(lr=1e-2)
            assert np.array_equal(fused.grad_buffer, apart.grad_buffer)
            assert np.array_equal(fused.flat.buffer, apart.flat.buffer)
    assert clip_coef(norm, max_norm) == (1.0 if max_norm > norm else max_norm / (norm + 1e-6))


def test_step_names_a_bad_grad_scale_and_changes_nothing():
    params = make_params(np.random.default_rng(14), np.float32)
    opt = AdamW(params, lr=1e-2)
    before = opt.flat.buffer.copy()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(TinygenError, match="grad_scale must be a positive finite number"):
            opt.step(make_grads(np.random.default_rng(15), params), grad_scale=bad)
    assert opt.t == 0 and np.array_equal(opt.flat.buffer, before)
    with pytest.raises(TinygenError, match="max_norm must be > 0"):
        clip_coef(1.0, 0.0)


def test_sum_grads_names_a_missing_or_mismatched_gradient():
    rng = np.random.default_rng(12)
    params = make_params(rng, np.float32)
    opt = AdamW(params, lr=1e-2)
    grads = make_grads(rng, params)
    with pytest.raises(TinygenError, match="at least one"):
        opt.sum_grads([])
    with pytest.raises(TinygenError, match=r"gradient of 'ln_f.bias' is nothing"):
        opt.sum_grads([{n: g for n, g in grads.items() if n != "ln_f.bias"}])
    with pytest.raises(TinygenError, match=r"'wte.weight' is float64\[7, 4\], expected float32\[7, 4\]"):
        opt.sum_grads([{**grads, "wte.weight": grads["wte.weight"].astype(np.float64)}])


def test_adamw_names_a_bad_hyperparameter():
    params = make_params(np.random.default_rng(0))
    for kwargs, message in [(dict(lr=-1.0), "AdamW lr"),
                            (dict(betas=(1.0, 0.9)), r"AdamW beta1 must be a number in \[0, 1\)"),
                            (dict(eps=0.0), "AdamW eps must be a positive number"),
                            (dict(weight_decay=float("nan")), "AdamW weight_decay")]:
        with pytest.raises(TinygenError, match=message):
            AdamW(params, **{"lr": 1e-3, **kwargs})


def test_state_dict_roundtrip_continues_identically():
    rng = np.random.default_rng(7)
    params = make_params(rng, np.float32)
    grads = [make_grads(rng, params) for _ in range(5)]
    opt = AdamW(params, lr=1e-2)
    for g in grads[:3]:
        opt.step(g)
    state = opt.state_dict()
    assert state["t"].tolist() == [3] and state["m.wte.weight"].shape == (7, 4)
    resumed_params = {n: p.copy() for n, p in params.items()}
    resumed = AdamW(resumed_params, lr=1e-2)
    resumed.load_state_dict(state)
    for g in grads[3:]:
        opt.step(g)
        resumed.step(g)
    assert resumed.t == opt.t == 5
    for n in params:
        np.testing.assert_array_equal(resumed_params[n], params[n], err_msg=n)


def test_load_state_dict_rejects_mismatches():
    rng = np.random.default_rng(8)
    opt = AdamW(make_params(rng), lr=1e-2)
    good = opt.state_dict()
    with pytest.raises(TinygenError, match="missing"):
        opt.load_state_dict({k: a for k, a in good.items() if k != "v.ln_f.bias"})
    with pytest.raises(TinygenError, match="unexpected"):
        opt.load_state_dict({**good, "m.lm_head.weight": np.zeros(3)})
    with pytest.raises(TinygenError, match=r"'m'\[.wte.weight.\] has shape"):
        opt.load_state_dict({**good, "m.wte.weight": np.zeros((3, 3))})
    with pytest.raises(TinygenError, match="'t'"):
        opt.load_state_dict({**good, "t": np.array([1.5])})
    frozen_opt = AdamW(make_params(rng), lr=1e-2, trainable=lambda n: "ln" in n)
    with pytest.raises(TinygenError, match="unexpected"):
        frozen_opt.load_state_dict(good)  # moments for parameters that are frozen here


@given(
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    float32=st.booleans(),
)
def test_fused_update_matches_reference_for_any_shapes(shapes, seed, float32):
    rng = np.random.default_rng(seed)
    dtype = np.float32 if float32 else np.float64
    params = {f"p{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}
    ref = {n: p.astype(np.float64) for n, p in params.items()}
    decayed = {n for n, p in ref.items() if p.ndim >= 2}
    state = {"t": 0, "m": {}, "v": {}}
    opt = AdamW(params, lr=1e-2)
    for _ in range(2):
        grads = make_grads(rng, params)
        opt.step(grads)
        ref = reference_adamw(ref, {n: g.astype(np.float64) for n, g in grads.items()}, state, 1e-2, decayed)
    tol = 1e-5 if float32 else 1e-12
    for n in params:
        assert params[n].dtype == dtype
        np.testing.assert_allclose(params[n], ref[n], rtol=tol, atol=tol, err_msg=n)


# -- clipping ---------------------------------------------------------------


def test_global_norm_is_the_norm_of_everything():
    rng = np.random.default_rng(9)
    grads = make_grads(rng, make_params(rng, np.float32))
    everything = np.concatenate([g.ravel() for g in grads.values()]).astype(np.float64)
    assert math.isclose(global_norm(grads), np.linalg.norm(everything), rel_tol=1e-12)
    assert math.isclose(global_norm(everything), np.linalg.norm(everything), rel_tol=1e-12)


def test_clipping_scales_to_max_norm():
    rng = np.random.default_rng(10)
    grads = {n: 10 * g for n, g in make_grads(rng, make_params(rng, np.float32)).items()}
    before = {n: g.copy() for n, g in grads.items()}
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert norm > 1.0
    assert math.isclose(global_norm(grads), 1.0, rel_tol=1e-5)
    coef = 1.0 / (norm + 1e-6)
    for n, g in grads.items():
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, before[n] * coef, rtol=1e-6)


def test_clipping_leaves_small_grads_alone():
    rng = np.random.default_rng(11)
    grads = {n: g / 1000 for n, g in make_grads(rng, make_params(rng)).items()}
    before = {n: g.copy() for n, g in grads.items()}
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert norm == global_norm(before) < 1.0
    for n in grads:
        np.testing.assert_array_equal(grads[n], before[n])
    inf_grads = {"w": np.array([np.inf, 1.0])}
    assert clip_grad_norm(inf_grads, 1.0) == math.inf
    np.testing.assert_array_equal(inf_grads["w"], [np.inf, 1.0])
    with pytest.raises(TinygenError, match="max_norm"):
        clip_grad_norm(grads, 0.0)


# -- schedule ---------------------------------------------------------------

SCHEDULE = dict(lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)


def test_schedule_at_known_steps():
    assert lr_at(0, **SCHEDULE) == pytest.approx(6e-4 * 1 / 11)  # already moving at step 0
    assert lr_at(9, **SCHEDULE) == pytest.approx(6e-4 * 10 / 11)  # last warm-up step
    assert lr_at(10, **SCHEDULE) == pytest.approx(6e-4)  # peak
    assert lr_at(60, **SCHEDULE) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway down the cosine
    assert lr_at(110, **SCHEDULE) == pytest.approx(6e-5)  # max_steps
    assert lr_at(10_000, **SCHEDULE) == 6e-5  # beyond
    lrs = [lr_at(s, **SCHEDULE) for s in range(200)]
    assert lrs[:11] == sorted(lrs[:11]) and lrs[10:] == sorted(lrs[10:], reverse=True)


def test_schedule_edge_cases_and_errors():
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=4) == 1.0  # no warm-up
    assert lr_at(5, lr=1.0, min_lr=0.1, warmup_steps=5, max_steps=5) == 0.1  # no decay phase
    assert lr_at(3, lr=1.0, min_lr=1.0, warmup_steps=0, max_steps=9) == 1.0  # constant
    for bad, message in [(dict(step=-1), "lr_at step must be an integer >= 0, got -1"),
                         (dict(warmup_steps=200), "warmup_steps"), (dict(min_lr=1.0), "min_lr"),
                         (dict(step=1.5), "lr_at step must be an integer >= 0, got 1.5"),
                         (dict(max_steps=True), "lr_at max_steps must be an integer >= 0, got True")]:
        kwargs = {**SCHEDULE, "step": 0, **bad}
        with pytest.raises(TinygenError, match=message):
            lr_at(kwargs.pop("step"), **kwargs)
    assert lr_at(np.int64(5), **SCHEDULE) == lr_at(5, **SCHEDULE)  # NumPy integers are integers


def test_adamw_state_is_four_flat_buffers_and_no_scratch_copy():
    """Parameters, gradients, m and v: four (N,) buffers. The update's scratch is one CHUNK
    per thread, not a fifth copy of the model (497 MB on GPT-2 small)."""
    params = {"w": np.ones((3, CHUNK), np.float32), "b": np.zeros(5, np.float32)}
    opt = AdamW(params, lr=1e-3)
    n = opt.flat.size
    held = [a for a in vars(opt).values() if isinstance(a, np.ndarray) and a.size >= n]  # the params: opt.flat
    assert sorted(id(a) for a in held) == sorted(id(a) for a in (opt.grad_buffer, opt.m, opt.v))
    opt.grad_buffer[:] = 1.0
    opt.step()
    assert np.isfinite(opt.flat.buffer).all() and (opt.flat.buffer[:3 * CHUNK] < 1).all()
