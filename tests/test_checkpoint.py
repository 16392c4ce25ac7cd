"""Checkpoints: HF GPT-2 layout round trip, transformers-style variants, train state."""
import dataclasses
import json
import os
import struct

import numpy as np
import pytest

from tinygen import GPT, GPTConfig, TinygenError
from tinygen.checkpoint import (hf_params, load_model, load_train_state, read_config, save_model,
                                save_train_state)
from tinygen.plumbing.safetensors import load_file, save_file

CONFIG = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed=0, config=CONFIG):
    model = GPT(config, seed=seed)
    for k, v in model.params.items():  # move off the init's exact zeros and ones
        v += np.random.default_rng(len(k)).normal(0, 0.05, v.shape).astype(v.dtype)
    return model


def write_raw(path, tensors, metadata=None):
    """A safetensors file from {name: (dtype, shape, raw bytes)}, for dtypes save_file does not write."""
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def hf_style(model, directory, dtype=np.float32, prefix="transformer.", head=True, buffers=True):
    """Write `model` the way transformers' checkpoints look: prefix, buffers, lm_head."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        hf = model.config.to_hf()
        del hf["tinygen"]
        json.dump(hf, f)
    tensors = {prefix + k: v.astype(dtype) for k, v in model.params.items()}
    if buffers:
        T = model.config.block_size
        for i in range(model.config.n_layer):
            tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((T, T), dtype))[None, None]
            tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, dtype)
    if head:
        tensors["lm_head.weight"] = model.params["wte.weight"].astype(dtype)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def test_roundtrip_is_exact_and_config_is_gpt2(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert set(loaded.params) == set(model.params)
    for k in model.params:
        assert loaded.params[k].dtype == np.float32
        assert np.array_equal(loaded.params[k], model.params[k]), k
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["activation_function"] == "gelu_new"
    assert hf["n_positions"] == hf["n_ctx"] == 16 and hf["n_embd"] == 16 and hf["n_layer"] == 2
    assert hf["n_head"] == 2 and hf["vocab_size"] == 37
    assert hf["layer_norm_epsilon"] == 1e-5 and hf["tie_word_embeddings"] is True
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.params)


def test_float64_model_roundtrips(tmp_path):
    model = tiny_model(config=dataclasses.replace(CONFIG, dtype="float64"))
    save_model(tmp_path, model.config, model.params)
    config, params = load_model(tmp_path)  # the checkpoint layer: config and params, no GPT
    assert config == model.config and config.dtype == "float64"
    assert all(np.array_equal(params[k], v) for k, v in model.params.items())
    assert load_model(tmp_path, dtype="float32").params["wte.weight"].dtype == np.float32
    loaded = GPT.from_pretrained(tmp_path, dtype="float32")
    assert loaded.config.dtype == "float32" and loaded.params["wte.weight"].dtype == np.float32


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_loads_transformers_style_checkpoints(tmp_path, prefix):
    model = tiny_model()
    hf_style(model, tmp_path, prefix=prefix)
    loaded = GPT.from_pretrained(tmp_path)
    assert all(np.array_equal(loaded.params[k], v) for k, v in model.params.items())
    idx = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(loaded.forward(idx), model.forward(idx))


def test_float16_weights_are_converted(tmp_path):
    model = tiny_model()
    hf_style(model, tmp_path, dtype=np.float16)
    loaded = load_model(tmp_path)
    for k, v in model.params.items():
        assert loaded.params[k].dtype == np.float32
        assert np.array_equal(loaded.params[k], v.astype(np.float16).astype(np.float32)), k


def test_bfloat16_weights_are_converted(tmp_path):
    model = tiny_model()
    os.makedirs(tmp_path, exist_ok=True)
    save_model(tmp_path, model.config, model.params)
    expected, tensors = {}, {}
    for k, v in model.params.items():
        top = (v.astype(np.float32).view(np.uint32) >> 16).astype("<u2")  # truncate to bfloat16
        expected[k] = (top.astype(np.uint32) << 16).view(np.float32)
        tensors[k] = ("BF16", v.shape, top.tobytes())
    write_raw(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    loaded = load_model(tmp_path)
    assert all(np.array_equal(loaded.params[k], expected[k]) for k in expected)


def test_untied_lm_head_is_an_error(tmp_path):
    model = tiny_model()
    hf_style(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TinygenError, match="lm_head.weight differs from wte.weight"):
        load_model(tmp_path)


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    params = dict(tiny_model().params)
    with pytest.raises(TinygenError, match="missing 1 tensors, e.g. 'ln_f.bias'"):
        hf_params({k: v for k, v in params.items() if k != "ln_f.bias"}, CONFIG)
    with pytest.raises(TinygenError, match="unexpected tensors, e.g. 'h.2.ln_1.weight'"):
        hf_params({**params, "h.2.ln_1.weight": params["h.0.ln_1.weight"]}, CONFIG)
    with pytest.raises(TinygenError, match="'wpe.weight' has shape"):
        hf_params({**params, "wpe.weight": params["wpe.weight"][:3]}, CONFIG)
    with pytest.raises(TinygenError, match="appears twice"):
        hf_params({**params, "transformer.wpe.weight": params["wpe.weight"]}, CONFIG)


def test_directory_errors(tmp_path):
    with pytest.raises(TinygenError, match="no config.json"):
        load_model(tmp_path)
    save_model(tmp_path, CONFIG, tiny_model().params)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(TinygenError, match="pytorch_model.bin, which tinygen does not read"):
        load_model(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "layer_norm_epsilon": 1e-6}))
    with pytest.raises(TinygenError, match="layer_norm_epsilon"):
        read_config(tmp_path)


def test_train_state_roundtrip(tmp_path):
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    opt = {"t": np.array([7], np.int64), "m.w": np.ones((2, 3), np.float32), "v.w": np.zeros((2, 3), np.float32)}
    save_train_state(tmp_path / "s.safetensors", 7, params, opt, {"seed": 3, "elapsed_s": 1.5})
    state = load_train_state(tmp_path / "s.safetensors")
    assert state.step == 7 and state.info == {"seed": 3, "elapsed_s": 1.5}
    assert np.array_equal(state.params["w"], params["w"])
    assert set(state.optimizer) == set(opt) and np.array_equal(state.optimizer["m.w"], opt["m.w"])
    save_file({"x": np.zeros(1, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(TinygenError, match="not a tinygen training state"):
        load_train_state(tmp_path / "other.safetensors")


def test_transformers_loads_a_tinygen_checkpoint_and_back(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    model.save_pretrained(tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    idx = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    np.testing.assert_allclose(model.forward(idx), theirs, rtol=1e-4, atol=1e-5)
    hf.save_pretrained(tmp_path / "theirs")  # transformers' own layout back into tinygen
    back = GPT.from_pretrained(tmp_path / "theirs")
    np.testing.assert_allclose(back.forward(idx), theirs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ a bidirectional model's files
def test_a_bidirectional_checkpoint_says_what_it_is_and_round_trips(tmp_path):
    config = dataclasses.replace(CONFIG, causal=False)
    model = tiny_model(config=config)
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "tinygen_bidirectional" and hf["tinygen"]["causal"] is False
    assert hf["architectures"] == ["TinygenBidirectionalLM"]
    back = GPT.from_pretrained(tmp_path)
    assert back.config == config and back.parts.attention is not GPT(CONFIG).parts.attention
    idx = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(back.forward(idx), model.forward(idx))
    model_causal = tiny_model()
    model_causal.save_pretrained(tmp_path / "causal")
    hf_causal = json.loads((tmp_path / "causal" / "config.json").read_text())
    assert hf_causal["model_type"] == "gpt2" and hf_causal["tinygen"]["causal"] is True


def test_a_bidirectional_model_with_experts_is_tinygen_moe_and_round_trips(tmp_path):
    """Both at once: model_type tinygen_moe (one type per file), causal=False under "tinygen";
    its parts are bidirectional attention and the expert MLP, and it computes the same after loading."""
    from tinygen.parts import BIDIRECTIONAL_SELF_ATTENTION, EXPERT_MLP

    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, n_expert=4, causal=False)
    model = GPT(config, seed=0)
    assert model.parts.attention is BIDIRECTIONAL_SELF_ATTENTION and model.parts.mlp is EXPERT_MLP
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "tinygen_moe" and hf["tinygen"]["causal"] is False
    back = GPT.from_pretrained(tmp_path)
    assert back.config == config
    idx = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(back.forward(idx), model.forward(idx))


def test_a_bidirectional_config_json_with_experts_under_tinygen_is_refused(tmp_path):
    tiny_model(config=dataclasses.replace(CONFIG, causal=False)).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["tinygen"]["n_expert"] = 4
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(TinygenError, match="tinygen_moe"):
        read_config(tmp_path)


@pytest.mark.parametrize("model_type, causal", [("gpt2", False), ("tinygen_bidirectional", True)])
def test_config_json_whose_model_type_and_causal_disagree_is_refused(tmp_path, model_type, causal):
    tiny_model().save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["model_type"], hf["tinygen"]["causal"] = model_type, causal
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(TinygenError, match="disagree"):
        read_config(tmp_path)


def test_transformers_does_not_take_a_bidirectional_checkpoint_for_gpt2(tmp_path):
    """GPT-2 in transformers is causal: these weights would compute something else there. Its Auto
    classes refuse the unknown model_type (GPT2LMHeadModel itself warns that the type differs)."""
    transformers = pytest.importorskip("transformers")
    tiny_model(config=dataclasses.replace(CONFIG, causal=False)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tinygen_bidirectional"):
        transformers.AutoConfig.from_pretrained(tmp_path)
