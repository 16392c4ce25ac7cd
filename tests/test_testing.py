"""tinygen.testing: the strategies produce valid configs, batches, sequences, parameters and
arrays; the layouts convert both ways; the tolerances; the checks are re-exported; a missing
hypothesis gives a clear ImportError."""
import dataclasses
import importlib
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tinygen.gradient_check
import tinygen.model
import tinygen.testing
from tinygen import GPT, GPTConfig
from tinygen.errors import TinygenError
from tinygen.model import check_ids
from tinygen.testing import (FORWARD_TOLERANCE, arrays, assert_forward_close, configs, forward_error, from_nested,
                             from_torch_state_dict, gpt_params, param_shapes, to_nested, to_torch_state_dict,
                             token_batches, token_sequences)


@given(configs())
def test_configs_are_valid_and_within_bounds(config):
    assert isinstance(config, GPTConfig)
    assert 1 <= config.n_layer <= 2 and 1 <= config.n_head <= 3 and 1 <= config.head_size <= 8
    assert config.n_embd == config.n_head * config.head_size
    assert 1 <= config.vocab_size <= 32 and 1 <= config.block_size <= 16
    assert config.dtype == "float64" and config.dropout == 0.0


@given(configs(max_layers=1, max_heads=1, max_head_size=2, max_vocab=3, max_block=2, dtype="float32"))
def test_configs_respect_arguments(config):
    assert config.n_layer == 1 and config.n_head == 1 and config.n_embd <= 2
    assert config.vocab_size <= 3 and config.block_size <= 2 and config.dtype == "float32"


def test_configs_dtype_none_draws_both():
    seen = set()

    @given(configs(dtype=None))
    def collect(config):
        seen.add(config.dtype)

    collect()
    assert seen == {"float32", "float64"}


@given(configs(dtype=None), st.data())
def test_token_batches_are_valid_model_input(config, data):
    idx = data.draw(token_batches(config, max_batch=2))
    assert idx.dtype == np.int64 and idx.ndim == 2
    assert 1 <= idx.shape[0] <= 2 and 1 <= idx.shape[1] <= config.block_size
    assert idx.min() >= 0 and idx.max() < config.vocab_size
    check_ids(idx, config)  # tinygen's own validation accepts it
    logits = GPT(config).forward(idx)
    assert logits.shape == (*idx.shape, config.vocab_size) and logits.dtype == config.np_dtype


@given(arrays((2, 3)))
def test_arrays_default_is_finite_moderate_float64(a):
    assert a.shape == (2, 3) and a.dtype == np.float64
    assert np.isfinite(a).all() and np.abs(a).max() <= 4


@given(arrays(st.tuples(st.integers(1, 3), st.integers(1, 3)), dtype=np.float32))
def test_arrays_accepts_shape_strategy_and_float32(a):
    assert a.ndim == 2 and a.dtype == np.float32 and np.isfinite(a).all()


@given(arrays((4,), elements=st.floats(0.5, 1.0)))
def test_arrays_custom_elements(a):
    assert ((a >= 0.5) & (a <= 1.0)).all()


def test_checks_are_reexported():
    for name in ("gradcheck", "check_layer", "check_model", "THRESHOLD"):
        assert getattr(tinygen.testing, name) is getattr(tinygen.gradient_check, name)
        assert name in tinygen.testing.__all__


def test_missing_hypothesis_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # makes `import hypothesis` fail
    monkeypatch.delitem(sys.modules, "tinygen.testing")
    with pytest.raises(ImportError, match=r"tinygen.testing needs hypothesis: pip install 'tinygen\[test\]'"):
        importlib.import_module("tinygen.testing")


# ---- minimum sizes, single sequences --------------------------------------------------------
@given(configs(min_layers=2, max_layers=3, min_heads=2, min_head_size=2, min_vocab=5, min_block=3))
def test_configs_respect_minimums(config):
    assert 2 <= config.n_layer <= 3 and 2 <= config.n_head <= 3 and 2 <= config.head_size <= 8
    assert 5 <= config.vocab_size <= 32 and 3 <= config.block_size <= 16


@given(configs(), st.data())
def test_token_batches_minimums_and_token_sequences(config, data):
    idx = data.draw(token_batches(config, max_batch=3, min_batch=2, min_len=config.block_size))
    assert idx.shape[0] in (2, 3) and idx.shape[1] == config.block_size
    seq = data.draw(token_sequences(config))
    assert seq.ndim == 1 and seq.dtype == np.int64 and 1 <= len(seq) <= config.block_size
    assert seq.min() >= 0 and seq.max() < config.vocab_size
    short = data.draw(token_sequences(config, min_len=1, max_len=1))
    assert short.shape == (1,)


def test_token_sequences_checks_its_lengths():
    config = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=2)
    for lo, hi in ((0, 2), (3, 2), (1, 5)):
        with pytest.raises(TinygenError, match="token_sequences"):
            token_sequences(config, lo, hi)


# ---- parameters -------------------------------------------------------------------------------
@given(configs(dtype=None), st.data())
def test_gpt_params_are_complete_valid_and_nowhere_neutral(config, data):
    params = data.draw(gpt_params(config))
    shapes = param_shapes(config)
    assert list(params) == list(shapes)
    for name, p in params.items():
        assert p.shape == shapes[name] and p.dtype == config.np_dtype and np.isfinite(p).all()
        if name.endswith(".bias"):
            assert np.all(p != 0), name  # an implementation that ignores a bias cannot pass
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert np.all((p >= 0.5) & (p <= 1.5)) and np.any(p != 1), name
    idx = data.draw(token_batches(config))
    assert np.isfinite(GPT(config, params=params).forward(idx)).all()


def test_gpt_params_scales_are_arguments():
    config = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=8)

    @given(gpt_params(config, weight_std=(1e-3, 1e-3), bias_std=(2.0, 2.0), gain=(1.0, 1.0)))
    def check(params):
        assert np.abs(params["h.0.mlp.c_fc.weight"]).max() < 0.01
        assert np.abs(params["h.0.mlp.c_fc.bias"]).max() > 0.1 and np.all(params["ln_f.weight"] == 1.0)

    check()


def test_param_shapes_is_exported_and_is_the_models():
    assert tinygen.testing.param_shapes is tinygen.model.param_shapes and "param_shapes" in tinygen.testing.__all__
    shapes = param_shapes(GPTConfig(vocab_size=11, block_size=5, n_layer=2, n_head=2, n_embd=4))
    assert shapes["h.1.attn.c_attn.weight"] == (4, 12) and shapes["h.0.mlp.c_proj.weight"] == (16, 4)
    assert len(shapes) == 2 + 12 * 2 + 2


# ---- layouts ----------------------------------------------------------------------------------
@given(configs(), st.data())
def test_nested_layout_round_trips_and_is_picogpts(config, data):
    params = data.draw(gpt_params(config))
    nested = to_nested(params)
    assert set(nested) == {"wte", "wpe", "blocks", "ln_f"} and len(nested["blocks"]) == config.n_layer
    block = nested["blocks"][-1]
    assert set(block) == {"ln_1", "attn", "ln_2", "mlp"} and set(block["ln_1"]) == {"g", "b"}
    assert block["attn"]["c_attn"]["w"].shape == (config.n_embd, 3 * config.n_embd)  # (in, out)
    assert block["mlp"]["c_proj"]["w"] is params[f"h.{config.n_layer - 1}.mlp.c_proj.weight"]  # no copies
    back = from_nested(nested)
    assert list(back) == list(params) and all(back[k] is params[k] for k in params)


@given(configs(), st.data())
def test_torch_state_dict_round_trips_with_out_in_weights(config, data):
    params = data.draw(gpt_params(config))
    state = to_torch_state_dict(params)
    C = config.n_embd
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (3 * C, C)  # torch.nn.Linear: (out, in)
    assert state["transformer.h.0.mlp.c_proj.weight"].shape == (C, 4 * C)
    assert state["transformer.wte.weight"].shape == state["lm_head.weight"].shape == (config.vocab_size, C)
    assert len(state) == len(params) + 1 and all(a.flags.c_contiguous for a in state.values())
    x = data.draw(arrays((2, C)))
    w, b = state["transformer.h.0.mlp.c_fc.weight"], state["transformer.h.0.mlp.c_fc.bias"]
    np.testing.assert_allclose(x @ w.T + b, x @ params["h.0.mlp.c_fc.weight"] + params["h.0.mlp.c_fc.bias"])
    state["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 4, 4)))  # a mask buffer: skipped
    back = from_torch_state_dict(state)
    assert list(back) == list(params) and all(np.array_equal(back[k], params[k]) for k in params)
    assert not any(np.shares_memory(state[f"transformer.{k}"], params[k]) for k in params)  # fresh copies
    assert "lm_head.weight" not in to_torch_state_dict(params, prefix="", lm_head=False)


def test_torch_state_dict_errors():
    config = GPTConfig(vocab_size=5, block_size=3, n_layer=1, n_head=1, n_embd=2)
    state = to_torch_state_dict(GPT(config).params)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(TinygenError, match="tie"):
        from_torch_state_dict(state)
    with pytest.raises(TinygenError, match="does not start with"):
        from_torch_state_dict({"h.0.ln_1.weight": np.ones(2)})


def test_torch_state_dict_loads_into_torch_linear():
    torch = pytest.importorskip("torch")  # optional: the layout torch.nn.Linear expects
    config = GPTConfig(vocab_size=5, block_size=3, n_layer=1, n_head=1, n_embd=4)
    params = GPT(config, seed=1).params
    state = to_torch_state_dict(params)
    linear = torch.nn.Linear(4, 12, dtype=torch.float64)
    linear.load_state_dict({"weight": torch.from_numpy(state["transformer.h.0.attn.c_attn.weight"]),
                            "bias": torch.from_numpy(state["transformer.h.0.attn.c_attn.bias"])})
    x = np.arange(8.0).reshape(2, 4)
    out = linear(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out, x @ params["h.0.attn.c_attn.weight"] + params["h.0.attn.c_attn.bias"])


# ---- tolerances -------------------------------------------------------------------------------
def test_forward_error_and_assert_forward_close():
    ref = np.array([[100.0, -50.0], [0.5, 0.0]])
    assert forward_error(ref, ref) == 0.0
    assert forward_error(ref + 1e-9, ref) == pytest.approx(1e-11)  # relative to max |ref| = 100
    assert forward_error(np.array([0.3]), np.array([0.1])) == pytest.approx(0.2)  # floor of 1
    assert forward_error(np.array([np.nan]), np.array([0.0])) == float("inf")
    with pytest.raises(AssertionError, match="shapes differ"):
        forward_error(ref, ref[0])
    assert_forward_close(ref + 1e-9, ref)
    assert_forward_close(ref + 1e-3, ref.astype(np.float32), "float32")
    with pytest.raises(AssertionError, match="error 1e-05 > tolerance 1e-10"):
        assert_forward_close(ref + 1e-3, ref)
    assert FORWARD_TOLERANCE == {"float64": 1e-10, "float32": 1e-4}


@settings(max_examples=60)
@given(configs(), st.data())
def test_float32_tolerance_covers_float32_rounding(config, data):
    """The float32 tolerance holds for what configs() draws: tinygen in float32 against
    tinygen in float64 (docs/testing.md has the numbers). Usually with a 100x margin, but
    at widths 2-3 a nearly flat layer-norm row amplifies float32 rounding to ~1e-5."""
    params = data.draw(gpt_params(config))
    idx = data.draw(token_batches(config))
    ref = GPT(config, params=params).forward(idx)
    c32 = dataclasses.replace(config, dtype="float32")
    got = GPT(c32, params={k: v.astype(np.float32) for k, v in params.items()}).forward(idx)
    assert forward_error(got, ref) < FORWARD_TOLERANCE["float32"]
