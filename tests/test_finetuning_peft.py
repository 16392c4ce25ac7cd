"""Hugging Face PEFT's adapter directories, both ways (tinygen.finetuning.peft).

Directories are built by hand in PEFT's layout (peft 0.21.2's key names, shapes and
config fields) and read back by tinygen; tinygen's LoRA and prompt-tuning runs
write that layout; anything tinygen cannot compute exactly is one error naming it.
With torch, transformers and peft installed, the last tests show equal logits
between peft and tinygen in both directions (skipped otherwise: peft is never a
dependency).
"""
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygen import GPT, GPTConfig
from tinygen.cli.main import main
from tinygen.errors import TinygenError
from tinygen.finetuning.config import FinetuneConfig
from tinygen.finetuning.finetune import run
from tinygen.finetuning.lora import LoraSpec
from tinygen.finetuning.peft import (LORA_DEFAULTS, PEFT_VERSION, peft_config, peft_tensors, read_peft, unsupported,
                                     write_peft)
from tinygen.finetuning.tasks import Example, write_jsonl
from tinygen.parts import GPT2
from tinygen.plumbing.safetensors import load_file, load_metadata, save_file
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

BYTES = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256})
CONFIG = GPTConfig(vocab_size=257, block_size=24, n_layer=2, n_head=2, n_embd=16)
C = CONFIG.n_embd
IDX = np.array([[100, 111, 103, 58, 32, 97], [1, 2, 3, 4, 5, 6]])
SHAPES = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}


def make_base(directory, seed=0):
    """A random base with weights 10x GPT-2's init, so adapters visibly change its logits."""
    model = GPT(CONFIG, seed=seed)
    for p in model.params.values():
        if p.ndim == 2:
            p *= 10.0
    model.save_pretrained(directory)
    BYTES.save(os.path.join(directory, "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("peft") / "base"
    return str(directory), make_base(directory)


def peft_lora_dir(directory, r=2, alpha=6, targets=("c_attn", "c_fc"), seed=1, prefix="base_model.model.transformer.",
                  **options):
    """A LoRA adapter directory as peft 0.21.2 writes one for GPT2LMHeadModel, by hand.

    Returns {tinygen name: array}: lora_A (C_in, r) = PEFT's lora_A.weight^T, lora_B (r, N) = lora_B.weight^T."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    tensors, ours = {}, {}
    for i in range(CONFIG.n_layer):
        for site, (c_in, n) in SHAPES.items():
            if site.split(".")[1] not in targets:
                continue
            A, B = rng.normal(0, 0.3, (r, c_in)).astype(np.float32), rng.normal(0, 0.3, (n, r)).astype(np.float32)
            tensors[f"{prefix}h.{i}.{site}.lora_A.weight"] = A  # (r, C_in): a torch Linear(C_in, r)
            tensors[f"{prefix}h.{i}.{site}.lora_B.weight"] = B  # (N, r): a torch Linear(r, N)
            ours[f"h.{i}.{site}.lora_A"], ours[f"h.{i}.{site}.lora_B"] = A.T, B.T
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {**LORA_DEFAULTS, "base_model_name_or_path": "../base", "peft_type": "LORA", "peft_version": PEFT_VERSION,
              "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05,
              "target_modules": list(targets), **options}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return ours


def peft_prompt_dir(directory, n=3, seed=2, **options):
    """A prompt-tuning adapter directory as peft writes one: prompt_embeddings (n, C)."""
    P = np.random.default_rng(seed).normal(0, 1.0, (n, C)).astype(np.float32)
    os.makedirs(directory, exist_ok=True)
    save_file({"prompt_embeddings": P}, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"auto_mapping": None, "base_model_name_or_path": "../base", "inference_mode": True,
              "modules_to_save": None, "num_attention_heads": 2, "num_layers": 2, "num_transformer_submodules": 1,
              "num_virtual_tokens": n, "peft_type": "PROMPT_TUNING", "peft_version": PEFT_VERSION,
              "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "revision": None,
              "task_type": "CAUSAL_LM", "token_dim": C, "tokenizer_kwargs": None, "tokenizer_name_or_path": None,
              **options}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return P


def lora_by_hand(base_model, ours, r, alpha, idx):
    """The logits of base + LoRA computed from the formula, layer by layer, in float64:
    every projection x W + b (+ alpha/r x A B on the adapted ones), through GPT-2's block."""
    from tinygen.layers import gelu_forward, layernorm_forward, softmax

    p = {k: v.astype(np.float64) for k, v in base_model.params.items()}
    s = alpha / r

    def proj(x, name):
        out = x @ p[name + ".weight"] + p[name + ".bias"]
        if name + ".lora_A" in ours:
            out = out + s * (x @ ours[name + ".lora_A"].astype(np.float64)) @ ours[name + ".lora_B"].astype(np.float64)
        return out

    B, T = idx.shape
    H, D = CONFIG.n_head, C // CONFIG.n_head
    x = p["wte.weight"][idx] + p["wpe.weight"][:T]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(CONFIG.n_layer):
        h = f"h.{i}."
        a = proj(layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])[0], h + "attn.c_attn")
        q, k, v = (a[..., j * C:(j + 1) * C].reshape(B, T, H, D).transpose(0, 2, 1, 3) for j in range(3))
        y = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + mask) @ v
        x = x + proj(y.transpose(0, 2, 1, 3).reshape(B, T, C), h + "attn.c_proj")
        m = gelu_forward(proj(layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])[0], h + "mlp.c_fc"))[0]
        x = x + proj(m, h + "mlp.c_proj")
    return layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])[0] @ p["wte.weight"].T


# ------------------------------------------------------------------ PEFT -> tinygen
def test_a_hand_built_peft_lora_directory_loads_with_peft_orientation(base, tmp_path):
    base_dir, base_model = base
    ours = peft_lora_dir(tmp_path / "lora", r=2, alpha=6)
    model = GPT.from_pretrained(base_dir, adapter=tmp_path / "lora")
    assert {k: model.params[k].shape for k in ours} == {k: v.shape for k, v in ours.items()}
    assert model.params["h.0.attn.c_attn.lora_A"].shape == (C, 2)  # (C_in, r): PEFT's (r, C_in) transposed
    expected = lora_by_hand(base_model, ours, r=2, alpha=6, idx=IDX)
    np.testing.assert_allclose(model.forward(IDX), expected, rtol=0, atol=2e-4 * np.abs(expected).max())
    assert np.abs(expected - base_model.forward(IDX)).max() > 0.1  # the adapter matters
    merged = GPT.from_pretrained(base_dir, adapter=tmp_path / "lora", merged=True)
    assert merged.parts == GPT2
    np.testing.assert_allclose(merged.forward(IDX), model.forward(IDX), atol=1e-4)


def test_a_peft_lora_of_a_gpt2model_base_without_the_transformer_prefix_loads(base, tmp_path):
    base_dir, base_model = base
    ours = peft_lora_dir(tmp_path / "lora", prefix="base_model.model.", task_type=None)
    model = GPT.from_pretrained(base_dir, adapter=tmp_path / "lora")
    assert all(np.array_equal(model.params[k], v) for k, v in ours.items())


def test_a_hand_built_peft_prompt_directory_loads_with_virtual_tokens_at_positions_0_to_n(base, tmp_path):
    base_dir, base_model = base
    P = peft_prompt_dir(tmp_path / "prompt", n=3)
    model = GPT.from_pretrained(base_dir, adapter=tmp_path / "prompt")
    assert model.n_prefix == 3 and np.array_equal(model.params["prompt.weight"], P)
    # peft's semantics by hand: GPT-2 on the embeddings [P ; wte[idx]] at positions 0 .. n+T-1. With
    # P written into three vocabulary rows, that is the plain GPT-2 on the ids [250, 251, 252] + idx.
    wte = base_model.params["wte.weight"].copy()
    wte[250:253] = P
    params = {**base_model.params, "wte.weight": wte}
    prompted = GPT(CONFIG, params={**params, "prompt.weight": P}, parts=model.parts)
    plain = GPT(CONFIG, params=params).forward(np.concatenate([np.tile([250, 251, 252], (2, 1)), IDX], axis=1))
    np.testing.assert_allclose(prompted.forward(IDX), plain[:, 3:], rtol=0, atol=1e-5)


def test_a_peft_directory_alone_finds_its_base_by_base_model_name_or_path(base, tmp_path):
    base_dir, _ = base
    root = os.path.dirname(base_dir)
    peft_lora_dir(os.path.join(root, "alone"))  # base_model_name_or_path "../base": relative to the adapter
    a = GPT.from_pretrained(os.path.join(root, "alone"))
    b = GPT.from_pretrained(base_dir, adapter=os.path.join(root, "alone"))
    np.testing.assert_array_equal(a.forward(IDX), b.forward(IDX))
    peft_lora_dir(tmp_path / "hub", base_model_name_or_path="openai-community/gpt2")
    with pytest.raises(TinygenError, match=r"'openai-community/gpt2' \(base_model_name_or_path\).*--adapter"):
        GPT.from_pretrained(tmp_path / "hub")
    assert GPT.from_pretrained(tmp_path / "hub", base=base_dir).num_params == b.num_params


def test_sample_command_with_a_peft_adapter(base, tmp_path, capsys):
    base_dir, _ = base
    peft_lora_dir(tmp_path / "lora")
    model = GPT.from_pretrained(base_dir, adapter=tmp_path / "lora")
    expected = BYTES.decode(model.generate(np.array([[100, 111, 103]]), 5, temperature=0)[0, 3:])
    assert main(["sample", "--model", base_dir, "--adapter", str(tmp_path / "lora"), "--prompt", "dog",
                 "--temperature", "0", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("dog" + expected.split(ENDOFTEXT)[0])
    peft_prompt_dir(tmp_path / "prompt")
    assert main(["sample", "--model", base_dir, "--adapter", str(tmp_path / "prompt"), "--prompt", "dog",
                 "--temperature", "0", "--max-new-tokens", "3"]) == 0


UNSUPPORTED = [
    ({"use_rslora": True}, "use_rslora = true"),
    ({"use_dora": True}, "use_dora = true"),
    ({"bias": "lora_only"}, 'bias = "lora_only"'),
    ({"lora_bias": True}, "lora_bias = true"),
    ({"modules_to_save": ["lm_head"]}, 'modules_to_save = ["lm_head"]'),
    ({"layers_to_transform": [0]}, "layers_to_transform = [0]"),
    ({"rank_pattern": {"c_fc": 4}}, "rank_pattern"),
    ({"init_lora_weights": "pissa"}, 'init_lora_weights = "pissa"'),
    ({"task_type": "SEQ_2_SEQ_LM"}, 'task_type = "SEQ_2_SEQ_LM"'),
    ({"some_future_option": 3}, "some_future_option = 3"),
]


@pytest.mark.parametrize("options, named", UNSUPPORTED, ids=[n.split(" ")[0] for _, n in UNSUPPORTED])
def test_unsupported_lora_options_are_one_error_naming_them(base, tmp_path, options, named):
    base_dir, _ = base
    peft_lora_dir(tmp_path / "lora", **options)
    with pytest.raises(TinygenError, match="not supported by tinygen") as e:
        GPT.from_pretrained(base_dir, adapter=tmp_path / "lora")
    assert named in str(e.value) and "adapter_config.json" in str(e.value)


def test_every_unsupported_option_is_named_in_the_one_error(base, tmp_path):
    base_dir, _ = base
    peft_lora_dir(tmp_path / "lora", use_dora=True, use_rslora=True, bias="all")
    with pytest.raises(TinygenError) as e:
        GPT.from_pretrained(base_dir, adapter=tmp_path / "lora")
    assert all(s in str(e.value) for s in ('bias = "all"', "use_dora = true", "use_rslora = true"))
    # harmless fields at any value: where the base came from, peft's version, init that does not touch the base
    assert unsupported({"peft_type": "LORA", "task_type": "CAUSAL_LM", "revision": "main", "inference_mode": False,
                        "init_lora_weights": "gaussian", "fan_in_fan_out": False, "peft_version": "0.9.0"}) == []


def test_unsupported_peft_types_and_targets(base, tmp_path):
    base_dir, _ = base
    peft_lora_dir(tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(TinygenError, match="peft_type 'IA3' is not supported; tinygen reads LORA and PROMPT_TUNING"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "ia3")
    ours = peft_lora_dir(tmp_path / "wte")
    tensors = load_file(tmp_path / "wte" / "adapter_model.safetensors")
    tensors["base_model.model.transformer.wte.lora_embedding_A"] = np.zeros((2, 257), np.float32)
    save_file(tensors, tmp_path / "wte" / "adapter_model.safetensors")
    with pytest.raises(TinygenError, match="'base_model.model.transformer.wte.lora_embedding_A' is not a LoRA weight"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "wte")
    peft_lora_dir(tmp_path / "attn-only", targets=("c_attn", "c_proj"))  # then drop mlp.c_proj: "attn.c_proj" only
    tensors = {k: v for k, v in load_file(tmp_path / "attn-only" / "adapter_model.safetensors").items()
               if "mlp.c_proj" not in k}
    save_file(tensors, tmp_path / "attn-only" / "adapter_model.safetensors")
    with pytest.raises(TinygenError, match=r"has no h\.0\.mlp\.c_proj\.lora_A\.weight.*in every block"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "attn-only")
    peft_lora_dir(tmp_path / "listed", targets=("c_attn",), target_modules=["c_attn", "c_fc"])
    with pytest.raises(TinygenError, match=r"target_modules \['c_attn', 'c_fc'\] but the weights adapt \['c_attn'\]"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "listed")
    assert ours  # the valid directory before the edits had weights


def test_bad_peft_directories_are_clear_errors(base, tmp_path):
    base_dir, _ = base
    peft_lora_dir(tmp_path / "pickle")
    os.replace(tmp_path / "pickle" / "adapter_model.safetensors", tmp_path / "pickle" / "adapter_model.bin")
    with pytest.raises(TinygenError, match="adapter_model.bin, a pickle, which tinygen never reads"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "pickle")
    peft_prompt_dir(tmp_path / "wide", token_dim=32)
    with pytest.raises(TinygenError, match="token_dim 32 but the base's n_embd is 16"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "wide")
    peft_prompt_dir(tmp_path / "seq2seq", num_transformer_submodules=2)
    with pytest.raises(TinygenError, match="num_transformer_submodules = 2"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "seq2seq")
    peft_lora_dir(tmp_path / "rank", r=3)
    cfg = json.load(open(tmp_path / "rank" / "adapter_config.json"))
    json.dump({**cfg, "r": 2}, open(tmp_path / "rank" / "adapter_config.json", "w"))
    with pytest.raises(TinygenError, match=r"h\.0\.attn\.c_attn\.lora_A\.weight has shape \(3, 16\), expected \(2, 16\) for r=2"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "rank")
    json.dump({**cfg, "r": 0}, open(tmp_path / "rank" / "adapter_config.json", "w"))
    with pytest.raises(TinygenError, match="adapter_config.json: r = 0: expected a positive integer"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "rank")
    json.dump({**cfg, "lora_dropout": "0.1"}, open(tmp_path / "rank" / "adapter_config.json", "w"))
    with pytest.raises(TinygenError, match='lora_dropout = "0.1": expected a number'):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "rank")
    json.dump({**cfg, "r": 3, "lora_alpha": -1}, open(tmp_path / "rank" / "adapter_config.json", "w"))
    with pytest.raises(TinygenError, match="adapter_config.json: FinetuneConfig.lora_alpha must be"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "rank")
    with open(tmp_path / "rank" / "adapter_config.json", "w") as f:
        f.write("[1, 2]")
    with pytest.raises(TinygenError, match="not a PEFT adapter config"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "rank")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(TinygenError, match="not a run directory"):
        GPT.from_pretrained(base_dir, adapter=tmp_path / "empty")


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                       max_size=3), max_leaves=5)


@settings(max_examples=40)
@given(method=st.sampled_from(["lora", "prompt"]), data=st.data())
def test_any_value_in_any_field_loads_or_is_one_tinygen_error(base, tmp_path_factory, method, data):
    """A hostile adapter_config.json never gets further than a TinygenError naming the file."""
    base_dir, _ = base
    directory = tmp_path_factory.mktemp("hostile")
    (peft_lora_dir if method == "lora" else peft_prompt_dir)(directory)
    cfg = json.load(open(directory / "adapter_config.json"))
    key = data.draw(st.sampled_from(sorted(cfg)), label="field")
    cfg[key] = data.draw(JSON_VALUES, label="value")
    with open(directory / "adapter_config.json", "w") as f:
        json.dump(cfg, f)
    try:
        GPT.from_pretrained(base_dir, adapter=directory)
    except TinygenError as e:
        assert "adapter_config.json" in str(e)


# ------------------------------------------------------------------ tinygen -> PEFT
def test_peft_layout_written_by_tinygen():
    fc = FinetuneConfig(method="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets="c_attn,c_proj")
    cfg = peft_config(fc, CONFIG, "runs/base")
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                "fan_in_fan_out", "bias", "base_model_name_or_path", "peft_version")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
        "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "bias": "none",
        "base_model_name_or_path": "runs/base", "peft_version": PEFT_VERSION}
    assert isinstance(cfg["lora_alpha"], int) and unsupported(cfg) == []
    prompt = peft_config(FinetuneConfig(method="prompt", n_virtual=5), CONFIG, "b")
    assert {k: prompt[k] for k in ("peft_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                   "num_layers", "num_attention_heads")} == {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5, "token_dim": C, "num_transformer_submodules": 1,
        "num_layers": 2, "num_attention_heads": 2}
    with pytest.raises(TinygenError, match="method 'adapter' has no PEFT format"):
        peft_config(FinetuneConfig(method="adapter"), CONFIG, "b")


@settings(max_examples=15)
@given(rank=st.integers(1, 5), alpha=st.sampled_from([1.0, 8.0, 2.5]),
       targets=st.sets(st.sampled_from(["c_attn", "c_proj", "c_fc"]), min_size=1), seed=st.integers(0, 99))
def test_write_then_read_is_the_identity(tmp_path_factory, rank, alpha, targets, seed):
    """tinygen's LoRA tensors -> PEFT's directory -> tinygen's: the same tensors, rank, alpha and targets."""
    from tinygen.finetuning.lora import init_lora

    targets = tuple(t for t in ("c_attn", "c_proj", "c_fc") if t in targets)
    rng = np.random.default_rng(seed)
    params = GPT(CONFIG, seed=seed).params
    lora = init_lora(params, LoraSpec(rank, alpha, 0.0, targets), rng)
    lora = {k: v + rng.normal(0, 1, v.shape).astype(v.dtype) for k, v in lora.items()}
    fc = FinetuneConfig(method="lora", lora_rank=rank, lora_alpha=alpha, lora_targets=",".join(targets))
    directory = tmp_path_factory.mktemp("rt")
    write_peft(directory, {**params, **lora}, fc, CONFIG, "base")
    back_fc, back = read_peft(directory, CONFIG)
    assert (back_fc.lora_rank, back_fc.lora_alpha, back_fc.lora_targets) == (rank, alpha, ",".join(targets))
    assert set(back) == set(lora) and all(np.array_equal(back[k], lora[k]) for k in lora)
    assert set(peft_tensors(lora, fc)) == set(load_file(directory / "adapter_model.safetensors"))


FAST = dict(batch_size=4, max_steps=4, warmup_steps=1, eval_interval=4, checkpoint_interval=4, eval_examples=1)


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """One tiny LoRA (with dropout), prompt-tuning and adapter run over the base."""
    base_dir, _ = base
    root = tmp_path_factory.mktemp("runs")
    data = root / "d.jsonl"
    write_jsonl(data, [Example(f"{w}:", f" {w[::-1]}", "rev") for w in ("abc", "dog", "cat", "sun")])
    out = {}
    for method, extra in (("lora", {"lr": 5e-2, "lora_rank": 2, "lora_dropout": 0.1}), ("prompt", {"n_virtual": 3}),
                          ("adapter", {"adapter_size": 4})):
        out[method] = str(root / method)
        run(base_dir, str(data), out[method], FinetuneConfig(method=method, **extra, **FAST), progress=False,
            log=lambda m: None)
    return out


def test_lora_and_prompt_runs_also_write_peft_files_and_adapters_do_not(base, runs):
    base_dir, _ = base
    for method in ("lora", "prompt"):
        files = os.listdir(runs[method])
        assert {"adapter_config.json", "adapter_model.safetensors", "adapter.safetensors"} <= set(files)
        assert load_metadata(os.path.join(runs[method], "adapter_model.safetensors")) == {"format": "pt"}
        text = open(os.path.join(runs[method], "adapter_config.json")).read()
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)  # peft's own formatting
        assert json.loads(text)["base_model_name_or_path"] == base_dir
    keys = sorted(load_file(os.path.join(runs["lora"], "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" and len(keys) == 2 * 4 * 2
    assert set(load_file(os.path.join(runs["prompt"], "adapter_model.safetensors"))) == {"prompt_embeddings"}
    assert not os.path.exists(os.path.join(runs["adapter"], "adapter_config.json"))  # no PEFT format: tinygen's own
    for method in ("lora", "prompt"):  # tinygen's own file and PEFT's give the same model
        peft_only = os.path.join(os.path.dirname(runs[method]), method + "-peft-only")
        os.makedirs(peft_only)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(os.path.join(runs[method], f), os.path.join(peft_only, f))
        own, via_peft = GPT.from_pretrained(runs[method]), GPT.from_pretrained(base_dir, adapter=peft_only)
        assert np.array_equal(own.forward(IDX), via_peft.forward(IDX))


# ------------------------------------------------------------------ with peft itself (optional)
def peft_modules():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return torch, transformers, peft


def peft_logits(torch, model, idx):
    with torch.no_grad():
        logits = model(torch.from_numpy(idx)).logits.numpy()
    return logits[:, logits.shape[1] - idx.shape[1]:]  # prompt tuning: peft also returns the virtual positions


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_peft_loads_tinygen_runs_with_equal_logits(base, runs, method):
    """PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), RUN) computes tinygen's logits."""
    torch, transformers, peft = peft_modules()
    base_dir, base_model = base
    hf = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir), runs[method]).eval()
    ours = GPT.from_pretrained(runs[method]).forward(IDX)
    theirs = peft_logits(torch, hf, IDX)
    assert np.abs(ours - base_model.forward(IDX)).max() > 1e-3  # the runs trained something
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(ours).max())


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_tinygen_loads_adapters_peft_made_with_equal_logits(base, tmp_path, method):
    torch, transformers, peft = peft_modules()
    base_dir, _ = base
    torch.manual_seed(0)
    if method == "lora":  # init_lora_weights=False: B is random too, so the update is not zero
        config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.1,
                                 fan_in_fan_out=True, init_lora_weights=False, task_type="CAUSAL_LM")
    else:
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    hf = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base_dir), config).eval()
    hf.save_pretrained(tmp_path / method)
    ours = GPT.from_pretrained(base_dir, adapter=tmp_path / method).forward(IDX)
    np.testing.assert_allclose(ours, peft_logits(torch, hf, IDX), rtol=0, atol=1e-5 * np.abs(ours).max())
