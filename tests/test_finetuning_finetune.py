"""Fine-tuning end to end on a handful of examples: the loss goes down for every
method, the base is never written, only trainable tensors get optimizer state,
adapter files refuse the wrong base, resume, and the command line."""
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from tinygen import GPT, GPTConfig
from tinygen.checkpoint import TRAIN_STATE, load_train_state
from tinygen.cli.main import build_parser
from tinygen.errors import TinygenError
from tinygen.finetuning.finetune import (ADAPTER_FILE, FinetuneConfig, apply_adapter, base_identity, build_model, load_run,
                                         merged_model, run, trainable)
from tinygen.parts import GPT2
from tinygen.plumbing.safetensors import load_file, load_metadata, save_file
from tinygen.finetuning.tasks import Example, encode_examples, make_batch, write_jsonl
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

BYTES = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256})
CONFIG = GPTConfig(vocab_size=257, block_size=24, n_layer=2, n_head=2, n_embd=16)
EXAMPLES = [Example(f"{w}:", f" {w[::-1]}", "rev") for w in ("abc", "dog", "cat", "sun", "ink", "map")]


def make_base(directory, seed=0):
    """A random base with weights 10x GPT-2's init scale (wte, the tied head, 25x): at 0.02
    a random network barely reacts to its input, and the methods that keep it frozen
    (LoRA, adapters, prompts) could hardly move its predictions."""
    model = GPT(CONFIG, seed=seed)
    for name, p in model.params.items():
        if p.ndim == 2:
            p *= 25.0 if name == "wte.weight" else 10.0
    model.save_pretrained(directory)
    BYTES.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base = make_base(root / "base")
    data = root / "d.jsonl"
    write_jsonl(data, EXAMPLES)
    return root, base, str(data)


def digest(directory):
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def handful_loss(model):
    return model.loss(*make_batch(encode_examples(EXAMPLES, BYTES, 16), 256))


FAST = dict(batch_size=6, max_steps=25, warmup_steps=2, eval_interval=25, checkpoint_interval=25, eval_examples=2)


@pytest.mark.parametrize("method, lr, ratio", [("full", 1e-2, 0.3), ("lora", 2e-2, 0.3), ("adapter", 2e-2, 0.8),
                                               ("prompt", 3e-1, 0.9)])
def test_finetuning_drives_the_loss_of_a_handful_of_examples_down(setup, method, lr, ratio):
    """25 steps on 6 examples (no val split, so the loop's val loss is theirs)."""
    root, base, data = setup
    before = digest(base)
    out = root / method
    fc = FinetuneConfig(method=method, lr=lr, lora_rank=4, adapter_size=8, n_virtual=4, **FAST)
    result = run(base, data, out, fc, progress=False, log=lambda m: None)
    assert digest(base) == before  # the base checkpoint is never written
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    start, end = rows[0]["val_loss"], rows[-1]["val_loss"]
    assert end < ratio * start, (start, end)
    assert np.isclose(handful_loss(load_run(out)), end, rtol=1e-4)  # the saved weights are the trained ones
    if method in ("lora", "adapter"):  # these start exactly at the base
        assert np.isclose(handful_loss(GPT.from_pretrained(base)), start, rtol=1e-5)
    assert result["train"]["step"] == 25
    state = load_train_state(out / TRAIN_STATE)
    expected = {k for k in load_run(out).params if trainable(fc)(k)}
    assert set(state.params) == expected  # only trainable parameters: their values and AdamW state
    assert {k for k in state.optimizer if k != "t"} == {f"{m}.{k}" for m in "mv" for k in expected}
    if method != "full":
        assert not os.path.exists(out / "model.safetensors")
        assert os.path.getsize(out / ADAPTER_FILE) < os.path.getsize(os.path.join(base, "model.safetensors")) / 2


def test_adapter_file_refuses_a_different_base(setup, tmp_path):
    root, base, data = setup
    out = root / "lora-refuse"
    run(base, data, out, FinetuneConfig(method="lora", **{**FAST, "max_steps": 2}), progress=False, log=lambda m: None)
    other = GPT.from_pretrained(make_base(tmp_path / "other", seed=1))
    with pytest.raises(TinygenError, match="different base model"):
        apply_adapter(other, out / ADAPTER_FILE)
    wider = GPT(dataclasses.replace(CONFIG, n_embd=32))
    with pytest.raises(TinygenError, match="other tensor shapes"):
        apply_adapter(wider, out / ADAPTER_FILE)
    with pytest.raises(TinygenError, match="different base model"):
        load_run(out, base_dir=tmp_path / "other")


def test_lora_run_loads_and_merges(setup):
    root, base, data = setup
    out = root / "lora-merge"
    run(base, data, out, FinetuneConfig(method="lora", lr=2e-2, **FAST), progress=False, log=lambda m: None)
    model = load_run(out)
    assert model.parts.linear is not GPT2.linear and model.parts._replace(linear=GPT2.linear) == GPT2
    assert any(k.endswith(".lora_B") and model.params[k].any() for k in model.params)
    fc = FinetuneConfig(**json.load(open(out / "finetune.json"))["config"])
    merged = merged_model(model, fc)
    assert merged.parts == GPT2 and not any(".lora_" in k for k in merged.params)
    idx = np.array([[97, 98, 99, 58]])
    np.testing.assert_allclose(merged.forward(idx), model.forward(idx), rtol=1e-4, atol=1e-5)
    plain = load_run(out, merged=True)
    assert plain.parts == GPT2 and set(plain.params) == set(merged.params)
    np.testing.assert_allclose(plain.forward(idx), model.forward(idx), rtol=1e-4, atol=1e-5)
    adapters = build_model(model, FinetuneConfig(method="adapter"))
    assert merged_model(adapters, FinetuneConfig(method="adapter")) is adapters  # adapters cannot be folded in


def test_version_1_adapter_files_still_load(setup, tmp_path):
    """Files written before the metadata held the whole FinetuneConfig (method + LoRA spec only)."""
    root, base, data = setup
    out = root / "lora-v1"
    fc = FinetuneConfig(method="lora", lora_rank=3, lora_alpha=6.0, lora_targets="c_fc", **{**FAST, "max_steps": 2})
    run(base, data, out, fc, progress=False, log=lambda m: None)
    meta = load_metadata(out / ADAPTER_FILE)
    old = {k: v for k, v in meta.items() if k != "config"}
    old.update(version="1", lora=json.dumps({"rank": 3, "alpha": 6.0, "dropout": 0.0, "targets": ["c_fc"]}))
    save_file(load_file(out / ADAPTER_FILE), tmp_path / ADAPTER_FILE, metadata=old)
    a, b = apply_adapter(GPT.from_pretrained(base), out / ADAPTER_FILE), apply_adapter(GPT.from_pretrained(base), tmp_path / ADAPTER_FILE)
    idx = np.array([[97, 98, 99, 58]])
    assert np.array_equal(a.forward(idx), b.forward(idx))
    save_file(load_file(out / ADAPTER_FILE), tmp_path / ADAPTER_FILE, metadata={**meta, "version": "9"})
    with pytest.raises(TinygenError, match="version '9'"):
        apply_adapter(GPT.from_pretrained(base), tmp_path / ADAPTER_FILE)


def test_resume_equals_uninterrupted(setup):
    root, base, data = setup
    fc = FinetuneConfig(method="adapter", lr=1e-2, adapter_size=4, **{**FAST, "max_steps": 6, "checkpoint_interval": 3})
    run(base, data, root / "whole", fc, progress=False, log=lambda m: None)
    run(base, data, root / "halves", dataclasses.replace(fc, max_steps=3), progress=False, log=lambda m: None)
    run(base, data, root / "halves", fc, resume=True, progress=False, log=lambda m: None)
    a, b = load_run(root / "whole"), load_run(root / "halves")
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k


def test_build_model_copies_and_freeze_predicates():
    base = GPT(CONFIG)
    model = build_model(base, FinetuneConfig(method="full"))
    model.params["wte.weight"][0, 0] += 1.0
    assert model.params["wte.weight"][0, 0] != base.params["wte.weight"][0, 0]
    frozen = trainable(FinetuneConfig(method="full", freeze_embeddings=True, freeze_layers=1))
    assert [frozen(k) for k in ("wte.weight", "h.0.ln_1.weight", "h.1.ln_1.weight", "ln_f.bias")] == [False, False, True, True]
    assert base_identity(base.params, CONFIG) != base_identity(model.params, CONFIG)  # one weight changed
    assert base_identity(base.params, CONFIG) == base_identity(build_model(base, FinetuneConfig()).params, CONFIG)


@pytest.mark.parametrize("field, value", [
    ("method", "qlora"), ("lora_targets", "q_proj"), ("lora_targets", ""), ("batch_size", True), ("batch_size", 0),
    ("lora_rank", 2.0), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("freeze_layers", -1), ("freeze_embeddings", 1),
    ("lr", 0.0), ("tasks", None), ("weight_decay", -0.1), ("workers", np.int64(-1)),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(TinygenError, match=f"FinetuneConfig.{field} must be"):
        FinetuneConfig(**{field: value})


def test_config_help_text_is_the_fields_own(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, help in [("--lora-rank", "lora: rank r of each update A B (default: 8)"),
                       ("--lr", "None picks the method's: full 0.001, lora 0.003, adapter 0.003, prompt 0.03")]:
        assert flag in text and help in text, (flag, help)


def test_command_line_finetune_and_resume(setup, capsys):
    root, base, data = setup
    parser = build_parser()  # `finetune` is registered in tinygen.cli.COMMANDS
    out = str(root / "cli")
    args = parser.parse_args(["finetune", "--base", base, "--data", data, "--method", "prompt", "--out", out,
                              "--max-steps", "2", "--batch-size", "6", "--n-virtual", "2"])
    assert args.run(args) == 0
    assert "run directory" in capsys.readouterr().out
    info = json.load(open(os.path.join(out, "finetune.json")))
    assert info["method"] == "prompt" and info["config"]["n_virtual"] == 2
    args = parser.parse_args(["finetune", "--resume", out, "--max-steps", "3"])
    assert args.run(args) == 0
    args = parser.parse_args(["finetune", "--resume", out, "--method", "full"])
    with pytest.raises(TinygenError, match="only --max-steps and --workers"):
        args.run(args)


def test_sample_command_reads_a_lora_run(setup, capsys):
    """`tinygen sample --model RUN` on a LoRA run loads its base plus adapter.safetensors."""
    root, base, data = setup
    out = root / "lora-sample"
    run(base, data, out, FinetuneConfig(method="lora", lr=2e-2, **FAST), progress=False, log=lambda m: None)
    expected = load_run(out).generate(np.array([[100, 111, 103, 58]]), 3, temperature=0)  # "dog:"
    from tinygen.cli import main

    assert main(["sample", "--model", str(out), "--prompt", "dog:", "--temperature", "0", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("dog:" + BYTES.decode(expected[0, 4:]).split(ENDOFTEXT)[0])
