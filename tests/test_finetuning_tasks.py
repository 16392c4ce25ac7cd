"""Fine-tuning data: JSONL errors with line numbers, the ast-derived tasks and their
module split, masked and padded batches."""
import json

import numpy as np
import pytest

from tinygen import GPT, GPTConfig
from tinygen.errors import TinygenError
from tinygen.loss import IGNORE
from tinygen.finetuning.tasks import (Encoded, Example, batches, builtin_examples, encode_examples, format_prompt,
                           function_examples, make_batch, module_split, read_jsonl, split_examples, write_jsonl)
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

BYTES = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256})


# ------------------------------------------------------------------ JSONL
def test_jsonl_roundtrip_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    examples = [Example("a\n=>", " b", "t1"), Example("c", "d", "default")]
    write_jsonl(path, examples)
    path.write_text(path.read_text() + "\n   \n")
    assert read_jsonl(path) == examples


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "completion": ', "not valid JSON"),
    ('["prompt", "completion"]', "expected a JSON object"),
    ('{"prompt": "a"}', 'missing "completion"'),
    ('{"prompt": 3, "completion": "b"}', '"prompt" must be a string'),
    ('{"prompt": "a", "completion": ""}', '"completion" is empty'),
    ('{"prompt": "a", "completion": "b", "task": 7}', '"task" must be a non-empty string'),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "x", "completion": "y"})
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(TinygenError) as err:
        read_jsonl(path)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


def test_empty_jsonl_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TinygenError, match="no examples"):
        read_jsonl(tmp_path / "e.jsonl")


def test_split_examples_is_deterministic_and_complete():
    examples = [Example(str(i), "x") for i in range(50)]
    a, b = split_examples(examples, seed=1), split_examples(examples, seed=1)
    assert a == b and [len(a[s]) for s in ("train", "val", "test")] == [40, 5, 5]
    assert sorted(e.prompt for s in a.values() for e in s) == sorted(e.prompt for e in examples)


# ------------------------------------------------------------------ built-in tasks
SOURCE = '''
def add(a, b=1):
    """Add two numbers together.

    More text.
    """
    # a comment
    total = a + b
    return total

def undocumented(x):
    return x

class K:
    def method(self, key):
        """Return the value of key."""
        return self.data[key]
'''


def test_function_examples_of_a_source():
    examples = function_examples(SOURCE)
    by = {(e.task, e.completion) for e in examples}
    assert ("summarize", " Add two numbers together.") in by
    assert ("name", " add") in by and ("name", " method") in by
    assert ("args", " a, b=1") in by and ("args", " self, key") in by
    summarize = next(e for e in examples if e.task == "summarize" and "add" in e.prompt)
    assert summarize.prompt == format_prompt("summarize", "def add(a, b=1):\n    total = a + b\n    return total")
    assert "Add two" not in summarize.prompt  # the docstring is the answer, never in the prompt
    args = next(e for e in examples if e.task == "args" and "add" in e.prompt)
    assert args.prompt.startswith("args:\ndef add(...):") and "b=1" not in args.prompt
    assert all("undocumented" not in e.prompt for e in examples)


def test_builtin_split_is_by_module_and_held_out_prompts_are_unseen(tmp_path):
    names = [f"mod{i}" for i in range(40)]
    for name in names:
        body = SOURCE.replace("add(", f"add_{name}(").replace("Add two", f"Add {name}")
        (tmp_path / f"{name}.py").write_text(body)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text(SOURCE.replace("add(", "secret("))  # test suites are left out
    splits = builtin_examples(root=tmp_path)
    assert splits == builtin_examples(root=tmp_path)  # deterministic
    for split in ("train", "val", "test"):
        expected = {n for n in names if module_split(n) == split}
        found = {n for n in names for e in splits[split] if f"add_{n}(" in e.prompt or e.completion == f" add_{n}"}
        assert found == expected
    assert not any("secret" in e.prompt + e.completion for s in splits.values() for e in s)
    train_prompts = {e.prompt for e in splits["train"]}
    assert not any(e.prompt in train_prompts for s in ("val", "test") for e in splits[s])  # K.method deduplicated


def test_unknown_builtin_task():
    with pytest.raises(TinygenError, match="unknown built-in task 'translate'"):
        builtin_examples(tasks=("translate",))


# ------------------------------------------------------------------ batches
def test_batch_masks_prompt_and_padding():
    encoded = encode_examples([Example("ab", "cd"), Example("x", "y")], BYTES, block_size=16)
    assert [list(e.ids) for e in encoded] == [[97, 98, 99, 100, 256], [120, 121, 256]]
    idx, targets = make_batch(encoded, pad_id=256)
    assert idx.tolist() == [[97, 98, 99, 100], [120, 121, 256, 256]]
    assert targets.tolist() == [[IGNORE, 99, 100, 256], [121, 256, IGNORE, IGNORE]]


def test_padding_changes_no_loss():
    """The loss of an example is the same alone and padded next to a longer one."""
    model = GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=8, dtype="float64"))
    short, long = encode_examples([Example("x", "y"), Example("abcdef", "ghij")], BYTES, block_size=16)
    alone = model.loss(*make_batch([short], 256))
    idx, targets = make_batch([short, long], 256)
    logits = model.forward(idx)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    counted = targets[0] >= 0
    assert np.isclose(-logp[0, counted, targets[0, counted]].mean(), alone, rtol=1e-12)


def test_long_examples_lose_the_prompt_start_or_are_dropped():
    encoded = encode_examples([Example("0123456789", "ab"), Example("p", "0123456789")], BYTES, block_size=6)
    assert len(encoded) == 1
    assert list(encoded[0].ids) == [ord(c) for c in "6789ab"] + [256] and encoded[0].n_prompt == 4


def test_batches_are_a_function_of_the_step():
    encoded = [Encoded(np.array([i, i + 1, 0]), 1, "t") for i in range(1, 8)]
    get = batches(encoded, 3, pad_id=0, seed=5)
    first = [get(s)[0].tolist() for s in range(6)]
    again = batches(encoded, 3, pad_id=0, seed=5)
    assert [again(s)[0].tolist() for s in (5, 2, 0)] == [first[5], first[2], first[0]]
    seen = sorted(row[0] for s in range(7) for row in get(s)[0].tolist())  # 3 epochs of 7
    assert seen == sorted(list(range(1, 8)) * 3)
