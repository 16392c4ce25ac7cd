"""Bottleneck adapters: the layer pair and the branch part against finite differences,
identity at initialisation, and the whole model's gradients with adapters in every block."""
import numpy as np
from hypothesis import given, settings, strategies as st

from tinygen import GPT, GPTConfig
from tinygen.finetuning.adapters import ADAPTER, SITES, adapter_backward, adapter_forward, adapter_names, count, init_adapters
from tinygen.gradient_check import THRESHOLD, check_layer, check_model, check_part
from tinygen.parts import GPT2, make_context

CONFIG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")


@settings(max_examples=15)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 4), st.integers(0, 1000))
def test_adapter_gradients(B, T, C, m, seed):
    rng = np.random.default_rng(seed)
    args = [rng.standard_normal((B, T, C)), rng.standard_normal((C, m)), rng.standard_normal(m),
            rng.standard_normal((m, C)), rng.standard_normal(C)]
    errors = check_layer(adapter_forward, adapter_backward, args, names=["x", "down_w", "down_b", "up_w", "up_b"])
    assert max(errors.values()) < THRESHOLD, errors


@settings(max_examples=10)
@given(st.sampled_from(["h.0.adapter_attn", "h.1.adapter_mlp"]), st.integers(1, 4), st.integers(0, 1000))
def test_adapter_branch_part_gradients(name, m, seed):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(v.shape) for k, v in init_adapters(2, 8, m, rng, np.float64).items()}
    errors = check_part(ADAPTER, rng.standard_normal((2, 3, 8)), params, name, make_context(CONFIG))
    assert set(errors) == {"x", *adapter_names(name)}
    assert max(errors.values()) < THRESHOLD, errors


def test_adapter_at_init_is_the_identity_and_the_model_equals_its_base():
    base = GPT(CONFIG, seed=0)
    new = init_adapters(CONFIG.n_layer, CONFIG.n_embd, 4, np.random.default_rng(0), np.float64)
    h = np.random.default_rng(1).standard_normal((2, 3, 8))
    out, _ = adapter_forward(h, *(new[n] for n in adapter_names("h.0.adapter_attn")))
    assert np.array_equal(out, h)
    model = GPT(CONFIG, params={**base.params, **new}, parts=GPT2._replace(branch=ADAPTER))
    idx = np.random.default_rng(2).integers(0, 13, (2, 8))
    assert np.array_equal(model.forward(idx), base.forward(idx))


def test_model_gradients_with_adapters():
    base = GPT(CONFIG, seed=0)
    rng = np.random.default_rng(3)
    new = init_adapters(CONFIG.n_layer, CONFIG.n_embd, 3, rng, np.float64)
    for k in new:
        new[k] = new[k] + rng.normal(0, 0.3, new[k].shape)  # away from the zero init
    model = GPT(CONFIG, params={**base.params, **new}, parts=GPT2._replace(branch=ADAPTER))
    idx, targets = rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6))
    names = list(new) + ["h.0.ln_1.weight", "h.1.mlp.c_proj.weight"]
    errors = check_model(model, idx, targets, max_coords=6, names=names)
    assert max(errors.values()) < THRESHOLD, errors


def test_names_and_count():
    new = init_adapters(2, 8, 4, np.random.default_rng(0))
    assert len(new) == 2 * len(SITES) * 4
    assert new["h.1.adapter_mlp.down.weight"].shape == (8, 4) and new["h.1.adapter_mlp.up.weight"].shape == (4, 8)
    assert new["h.0.adapter_attn.down.weight"].dtype == np.float32
    assert count(new) == 2 * 2 * (2 * 8 * 4 + 4 + 8)
