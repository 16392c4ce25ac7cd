"""tinygen.testing: the strategies produce valid configs, batches and arrays;
the checks are re-exported; a missing hypothesis gives a clear ImportError."""
import importlib
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinygen.gradient_check
import tinygen.testing
from tinygen import GPT, GPTConfig
from tinygen.model import check_ids
from tinygen.testing import arrays, configs, token_batches


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
