"""Evaluation: per-example losses that add up to the batch loss, greedy completions scored by
each task's metric, intervals, and few-shot prompts."""
import numpy as np
import pytest

from tinygen import GPT, GPTConfig
from tinygen.finetuning.evaluate import (
    completions, evaluate_tasks, example_losses, few_shot_examples, score_completions, task_metrics,
)
from tinygen.finetuning.metrics import example_stats, values
from tinygen.finetuning.tasks import Example, encode_examples, make_batch
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

BYTES = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256})
EXAMPLES = [Example("name:\nReturn x\n=>", " get_x", "name"), Example("name:\nSize of it\n=>", " sizeOf", "name"),
            Example("args:\ndef f(...)\n=>", " a, b", "args"), Example("summarize:\ndef g():\n=>", " Do it.", "summarize"),
            Example("q", " c", "mine", ("rouge_l",))]


def model(seed=0):
    return GPT(GPTConfig(vocab_size=257, block_size=48, n_layer=1, n_head=2, n_embd=16, dtype="float64"), seed=seed)


def test_example_losses_add_up_to_the_batch_loss():
    m = model()
    encoded = encode_examples(EXAMPLES, BYTES, 48)
    stats = example_losses(m, encoded + [None], batch_size=2)  # None: an example that did not fit
    x, y = make_batch(encoded, pad_id=0)
    assert stats[-1].tolist() == [0.0, 0.0]
    assert stats[:, 1].sum() == (y >= 0).sum()
    assert stats[:, 0].sum() / stats[:, 1].sum() == pytest.approx(m.loss(x, y), rel=1e-10)


def test_each_task_is_scored_by_its_metric():
    assert task_metrics("name", EXAMPLES) == ("exact_match", "subtoken")
    assert task_metrics("summarize", EXAMPLES) == ("exact_match", "rouge_l", "bleu4")
    assert task_metrics("mine", [e for e in EXAMPLES if e.task == "mine"]) == ("exact_match", "rouge_l")
    assert task_metrics("other", [Example("p", "c", "other")]) == ("exact_match",)


def test_evaluate_tasks_scores_the_greedy_completions_with_intervals():
    m = model()
    out = evaluate_tasks(m, BYTES, EXAMPLES, n_accuracy=8)
    assert list(out) == ["name", "args", "summarize", "mine"]
    for task, row in out.items():
        items = [e for e in EXAMPLES if e.task == task]
        texts = completions(m, BYTES, items)
        for metric in row["metrics"]:
            expected = example_stats(metric, texts, [e.completion for e in items])
            assert np.allclose(row["stats"][metric], expected)
            for name, value in values(metric, expected).items():
                v, low, high = row["scores"][name]
                assert v == pytest.approx(value, abs=1e-4) and low <= v <= high
        assert row["scores"]["val_loss"][0] == row["val_loss"] and row["accuracy"] == row["scores"]["exact_match"][0]
        assert row["examples"] == len(items)


def test_a_perfect_completion_scores_one_everywhere():
    items = [e for e in EXAMPLES if e.task != "mine"]
    stats = score_completions(("exact_match", "subtoken", "rouge_l", "bleu4", "args_f1"),
                              [e.completion for e in items], items)
    for metric, s in stats.items():
        assert all(v == pytest.approx(1.0) for v in values(metric, s).values()), metric


def test_few_shot_prompts_keep_task_and_metric():
    shots = few_shot_examples([EXAMPLES[-1]], [Example("q1", " a1", "mine"), Example("q2", " a2", "mine")], k=2)
    assert shots == [Example("q1 a1\n\nq2 a2\n\nq", " c", "mine", ("rouge_l",))]
