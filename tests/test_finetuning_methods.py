"""The fine-tuning methods table: each row's parts, new parameters and trainable names agree;
a model with zero-initialised updates is its base; merged LoRA equals unmerged; and every
method's whole model passes the gradient check."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygen import GPT, GPTConfig
from tinygen.finetuning.finetune import FinetuneConfig, build_model, merged_model
from tinygen.finetuning.methods import METHODS
from tinygen.finetuning.prompt_tuning import NAME as PROMPT
from tinygen.gradient_check import THRESHOLD, check_model
from tinygen.model import gpt_forward
from tinygen.parts import GPT2

CONFIG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")
ROLE = {"full": set(), "lora": {"linear"}, "adapter": {"branch"}, "prompt": {"embed"}}  # the part each replaces


def config_of(method, **changes):
    """Small ranks and widths; LoRA's scale alpha / r = 2 (the default 16 / 2 = 8 makes the perturbed
    model's loss so curved that the five-point stencil's own error, O(h^4), reaches the threshold)."""
    return FinetuneConfig(method=method, lora_rank=2, lora_alpha=4.0, adapter_size=3, n_virtual=2, **changes)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_row_replaces_its_part_and_trains_what_it_adds(method):
    row, fc = METHODS[method], config_of(method)
    assert row.name == method and set(METHODS) == set(ROLE)
    parts = row.attach(GPT2, fc)
    assert {f for f in GPT2._fields if getattr(parts, f) != getattr(GPT2, f)} == ROLE[method]
    base = GPT(CONFIG)
    new = row.init(base.params, CONFIG, fc, np.random.default_rng(0))
    trainable = row.trainable(fc)
    if row.whole_model:  # full: nothing new, the base's own tensors train and are saved
        assert new == {} and all(trainable(k) for k in base.params)
    else:  # the others: exactly their new tensors train (and go into adapter.safetensors)
        assert new and all(trainable(k) for k in new) and not any(trainable(k) for k in base.params)


@settings(max_examples=12)
@given(st.sampled_from(["full", "lora", "adapter", "prompt"]), st.integers(0, 100),
       st.sampled_from(["c_attn", "c_proj", "c_fc", "c_attn,c_proj,c_fc"]), st.integers(1, 3), st.integers(1, 4))
def test_zero_initialised_updates_give_the_base_model(method, seed, targets, rank, n_virtual):
    """LoRA (B = 0), adapters (up = 0) and full fine-tuning start exactly at their base.
    Prompt tuning has no zero update: it equals the base reading its virtual tokens as tokens."""
    base = GPT(CONFIG, seed=seed)
    fc = FinetuneConfig(method=method, lora_targets=targets, lora_rank=rank, n_virtual=n_virtual, seed=seed)
    model = build_model(base, fc)
    idx = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (2, CONFIG.block_size - n_virtual))
    if method != "prompt":
        assert np.array_equal(model.forward(idx), base.forward(idx))
        return
    P = model.params[PROMPT]  # (n, C): as token ids V..V+n-1 of a larger vocabulary
    wide = {**base.params, "wte.weight": np.vstack([base.params["wte.weight"], P])}
    virtual = np.tile(np.arange(CONFIG.vocab_size, CONFIG.vocab_size + n_virtual), (2, 1))
    wider = dataclasses.replace(CONFIG, vocab_size=CONFIG.vocab_size + n_virtual)
    full, _ = gpt_forward(wide, np.hstack([virtual, idx]), wider)
    np.testing.assert_allclose(model.forward(idx), full[:, n_virtual:, :CONFIG.vocab_size], rtol=1e-12, atol=1e-12)


@settings(max_examples=12)
@given(st.integers(0, 100), st.sampled_from(["c_attn", "c_proj", "c_fc", "c_attn,c_fc", "c_attn,c_proj,c_fc"]),
       st.integers(1, 4), st.floats(0.5, 32.0))
def test_merged_lora_equals_unmerged(seed, targets, rank, alpha):
    fc = FinetuneConfig(method="lora", lora_targets=targets, lora_rank=rank, lora_alpha=alpha, seed=seed)
    model = build_model(GPT(CONFIG, seed=seed), fc)
    rng = np.random.default_rng(seed)
    for k in model.params:  # a trained B: the update is not zero
        if k.endswith(".lora_B"):
            model.params[k] = rng.normal(0, 0.3, model.params[k].shape)
    merged = merged_model(model, fc)
    assert merged.parts == GPT2 and set(merged.params) == set(GPT(CONFIG).params)
    idx = rng.integers(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    np.testing.assert_allclose(merged.forward(idx), model.forward(idx), rtol=1e-10, atol=1e-10)
    changed = [k for k in merged.params if not np.array_equal(merged.params[k], model.params[k])]
    assert changed and all(k.endswith(".weight") and k.split(".")[-2] in targets for k in changed)


@pytest.mark.parametrize("method", list(METHODS))
def test_whole_model_gradients_with_each_method(method):
    """Every tensor the method trains, plus base tensors its parts read, against finite differences."""
    base = GPT(CONFIG, seed=1)
    model = build_model(base, config_of(method, lora_targets="c_attn,c_proj,c_fc"))
    rng = np.random.default_rng(1)
    for k in model.params:  # away from the zero-initialised halves, so every term matters
        if k not in base.params:
            model.params[k] = model.params[k] + rng.normal(0, 0.3, model.params[k].shape)
    idx, targets = rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6))
    targets[0, :2] = -1
    names = [k for k in model.params if k not in base.params] + ["wte.weight", "wpe.weight", "h.0.ln_1.weight",
                                                                  "h.1.attn.c_attn.weight", "h.1.mlp.c_proj.bias"]
    errors = check_model(model, idx, targets, max_coords=4, names=names)
    assert max(errors.values()) < THRESHOLD, errors
