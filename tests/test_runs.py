"""One loader for every run directory (tinygen.runs), and runs that travel.

A tree of tiny runs (a base; full, LoRA, adapter and prompt-tuning runs over it;
an adapter run over the LoRA run) is copied elsewhere and the original deleted:
every run still loads with GPT.from_pretrained, with the same logits, and
`tinygen sample` prints the same text from each. When a base is really gone the
error says what to pass, and passing it works; a wrong base is refused.
"""
import json
import os
import shutil

import numpy as np
import pytest

from tinygen import GPT, GPTConfig
from tinygen.cli.main import main
from tinygen.errors import TinygenError
from tinygen.finetuning.config import FinetuneConfig
from tinygen.finetuning.finetune import run
from tinygen.finetuning.tasks import Example, write_jsonl
from tinygen.parts import GPT2
from tinygen.runs import base_identity, kind, load, load_tokenizer, run_base
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

BYTES = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256})
CONFIG = GPTConfig(vocab_size=257, block_size=24, n_layer=2, n_head=2, n_embd=16)
IDX = np.array([[100, 111, 103, 58]])  # "dog:"
FAST = dict(batch_size=4, max_steps=3, warmup_steps=1, eval_interval=3, checkpoint_interval=3, eval_examples=1)
PLAN = [  # (run, its base, method options)
    ("full", "base", {"method": "full", "lr": 1e-2}),
    ("lora", "base", {"method": "lora", "lr": 5e-2, "lora_rank": 2}),
    ("adapter", "base", {"method": "adapter", "lr": 5e-2, "adapter_size": 4}),
    ("prompt", "base", {"method": "prompt", "n_virtual": 3}),
    ("adapter_on_lora", "lora", {"method": "adapter", "lr": 5e-2, "adapter_size": 4}),  # a LoRA run as a base
]


def make_tree(root):
    """root/{base, full, lora, adapter, prompt, adapter_on_lora}: tiny runs, each a few steps."""
    model = GPT(CONFIG, seed=0)
    for p in model.params.values():
        if p.ndim == 2:
            p *= 10.0
    model.save_pretrained(root / "base")
    BYTES.save(root / "base" / "tokenizer.json")
    data = root / "d.jsonl"
    write_jsonl(data, [Example(f"{w}:", f" {w[::-1]}", "rev") for w in ("abc", "dog", "cat", "sun")])
    for name, base, options in PLAN:
        run(str(root / base), str(data), str(root / name), FinetuneConfig(**options, **FAST), progress=False,
            log=lambda m: None)


def sample_text(directory, capsys, *flags):
    assert main(["sample", "--model", str(directory), "--prompt", "dog:", "--temperature", "0",
                 "--max-new-tokens", "4", *flags]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """The tree made in one place, the logits of each run there, then the tree copied elsewhere and
    the original deleted (so no absolute path recorded in it leads anywhere)."""
    first = tmp_path_factory.mktemp("made") / "runs"
    make_tree(first)
    names = ["base"] + [name for name, _, _ in PLAN]
    logits = {name: GPT.from_pretrained(first / name).forward(IDX) for name in names}
    there = tmp_path_factory.mktemp("elsewhere") / "copied-runs"
    shutil.copytree(first, there)
    shutil.rmtree(first)
    return there, logits


def test_every_kind_of_run_loads_after_the_tree_moved(moved):
    there, logits = moved
    for name, expected in logits.items():
        model = GPT.from_pretrained(there / name)
        np.testing.assert_array_equal(model.forward(IDX), expected, err_msg=name)
    kinds = {name: (GPT.from_pretrained(there / name).parts._fields, kind(there / name)) for name in logits}
    assert kinds["base"][1] == "model" and kinds["lora"][1] == "finetune"
    assert GPT.from_pretrained(there / "prompt").n_prefix == 3
    assert GPT.from_pretrained(there / "full").parts == GPT2 and GPT.from_pretrained(there / "lora").parts != GPT2
    assert GPT.from_pretrained(there / "lora", merged=True).parts == GPT2
    info = json.load(open(there / "lora" / "finetune.json"))
    assert info["base"] == os.path.join("..", "base") and len(info["base_sha256"]) == 64


def test_sample_from_every_run_after_the_tree_moved(moved, capsys):
    there, logits = moved
    for name in logits:
        model = GPT.from_pretrained(there / name)
        expected = BYTES.decode(model.generate(IDX, 4, temperature=0)[0, 4:]).split(ENDOFTEXT)[0]
        assert sample_text(there / name, capsys).startswith("dog:" + expected), name


def test_a_peft_adapter_over_the_moved_base(moved, tmp_path, capsys):
    there, logits = moved
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(there / "lora" / f, tmp_path / f)
    model = GPT.from_pretrained(there / "base", adapter=tmp_path)
    np.testing.assert_array_equal(model.forward(IDX), logits["lora"])
    assert GPT.from_pretrained(tmp_path, base=there / "base").num_params == model.num_params
    assert sample_text(there / "base", capsys, "--adapter", str(tmp_path)) == sample_text(there / "lora", capsys)
    assert load_tokenizer(tmp_path, base=there / "base").vocab_size == BYTES.vocab_size  # from the base


def test_a_base_that_is_really_gone_says_what_to_pass(moved, tmp_path, capsys):
    there, logits = moved
    lonely = tmp_path / "lonely"
    shutil.copytree(there / "lora", lonely)  # a run moved without its base
    with pytest.raises(TinygenError, match=r"its base model is not found: tried .*base \(not there\).*"
                                           r"--base DIR on the command line, GPT.from_pretrained\(.*, base=DIR\)"):
        GPT.from_pretrained(lonely)
    assert main(["sample", "--model", str(lonely), "--prompt", "dog:"]) == 2
    assert "--base DIR" in capsys.readouterr().err
    model = GPT.from_pretrained(lonely, base=there / "base")  # the base passed: checked by its checksum
    np.testing.assert_array_equal(model.forward(IDX), logits["lora"])
    assert sample_text(lonely, capsys, "--base", str(there / "base")) == sample_text(there / "lora", capsys)
    with pytest.raises(TinygenError, match="trained on a different base model"):
        GPT.from_pretrained(lonely, base=there / "full")  # same shapes, other weights
    assert run_base(lonely, there / "base") == str(there / "base")


def test_a_base_elsewhere_with_other_weights_is_skipped_by_its_checksum(moved, tmp_path):
    there, logits = moved
    shutil.copytree(there, tmp_path / "t")
    shutil.rmtree(tmp_path / "t" / "base")
    shutil.copytree(tmp_path / "t" / "full", tmp_path / "t" / "base")  # a model of the same shape at the path
    with pytest.raises(TinygenError, match=r"base \(a different model, sha256"):
        GPT.from_pretrained(tmp_path / "t" / "lora")


def test_resume_after_the_move_finds_the_base(moved, tmp_path):
    there, _ = moved
    shutil.copytree(there, tmp_path / "t")
    assert main(["finetune", "--resume", str(tmp_path / "t" / "prompt"), "--max-steps", "4"]) == 0
    shutil.copytree(tmp_path / "t" / "prompt", tmp_path / "alone")  # its finetune.json now names t/base
    os.rename(tmp_path / "t" / "base", tmp_path / "base-moved")
    assert main(["finetune", "--resume", str(tmp_path / "alone"), "--max-steps", "5"]) == 2  # base not found
    assert main(["finetune", "--resume", str(tmp_path / "alone"), "--max-steps", "5",
                 "--base", str(tmp_path / "base-moved")]) == 0
    assert json.load(open(tmp_path / "alone" / "finetune.json"))["base"] == os.path.join("..", "base-moved")


def test_runs_written_before_relative_paths_still_load(moved, tmp_path):
    """Older finetune.json files hold only the absolute path of the base."""
    there, logits = moved
    shutil.copytree(there, tmp_path / "t")
    path = tmp_path / "t" / "adapter" / "finetune.json"
    info = json.load(open(path))
    info["base"] = str(tmp_path / "t" / "base")
    del info["base_absolute"]
    json.dump(info, open(path, "w"))
    np.testing.assert_array_equal(GPT.from_pretrained(tmp_path / "t" / "adapter").forward(IDX), logits["adapter"])


def test_what_cannot_be_a_base_or_an_adapter(moved, tmp_path):
    there, _ = moved
    with pytest.raises(TinygenError, match="prompt fine-tuning run.*cannot serve as a base"):
        run(str(there / "prompt"), "builtin", str(tmp_path / "x"), FinetuneConfig(**FAST))
    with pytest.raises(TinygenError, match="a full fine-tune, a whole model: load it alone"):
        GPT.from_pretrained(there / "base", adapter=there / "full")
    with pytest.raises(TinygenError, match="a model, not an adapter"):
        GPT.from_pretrained(there / "base", adapter=there / "base")
    with pytest.raises(TinygenError, match="base= is for fine-tuning runs and PEFT adapters"):
        GPT.from_pretrained(there / "base", base=there / "base")
    with pytest.raises(TinygenError, match="not a run directory"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(TinygenError, match="no such directory"):
        GPT.from_pretrained(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "finetune.json").write_text('{"method": "sideways", "config": {}}')
    with pytest.raises(TinygenError, match="finetune.json: malformed"):
        GPT.from_pretrained(tmp_path / "bad")


def test_load_returns_the_method_and_base_identity_is_of_the_weights(moved):
    there, _ = moved
    loaded = load(there / "lora")
    assert loaded.finetune.method == "lora" and loaded.finetune.lora_rank == 2
    assert load(there / "base").finetune is None
    merged = load(there / "lora", merged=True)
    assert merged.parts is None and not any(".lora_" in k for k in merged.params)
    a, b = GPT.from_pretrained(there / "base"), GPT.from_pretrained(there / "base", dtype="float64")
    assert base_identity(a.params, a.config) == base_identity(b.params, b.config)  # float32 bytes either way
