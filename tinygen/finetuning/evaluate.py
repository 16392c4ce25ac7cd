"""Evaluation of prompt/completion tasks: held-out loss, exact match and each field's metric.

    loss      mean cross-entropy over the completion tokens (and the EOT that
              ends them) of every held-out example, token-weighted per task
    accuracy  fraction of examples whose greedy completion, up to the first
              EOT, equals the reference completion (both stripped of spaces)
    metrics   the task's own scores of the same greedy completions
              (tinygen.finetuning.metrics): subtoken F1 for `name`, ROUGE-L and
              BLEU-4 for `summarize`, parameter-name F1 for `args`, or what a
              JSONL task names; each with a bootstrap 95% interval over the examples
    few-shot  the same with no training: k solved training examples are put
              in front of each prompt, "prompt completion\\n\\n" each, and the
              generated text is also cut at its first newline

Greedy decoding runs a batch of prompts of different lengths side by side:
each row is right-padded and reads its logits at its own last position, so
padding never influences it (attention is causal). Every step recomputes the
whole (short) sequences, which keeps this code independent of the KV cache
and correct for every model's parts.

Shapes: B batch, T time, V vocabulary.
"""
import numpy as np

from ..loss import token_losses
from .metrics import LOSS, TASK_METRICS, bootstrap, example_stats, exact_match
from .tasks import Example, by_task, encode_examples, make_batch

MAX_NEW_TOKENS = 48  # longest greedy completion tried for the accuracy


def example_losses(model, encoded, batch_size=32) -> np.ndarray:
    """(n, 2) per example: the summed -log p of its completion tokens (EOT included), and their number.

    encoded: [Encoded or None]; None (an example that did not fit) gives (0, 0).
    The cross-entropy alone: auxiliary losses of a model's parts are a training matter.
    """
    out = np.zeros((len(encoded), 2))
    rows = sorted((i for i, e in enumerate(encoded) if e is not None), key=lambda i: len(encoded[i].ids))
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        x, y = make_batch([encoded[i] for i in chunk], pad_id=0)
        logits = model.forward(x)  # (B, T, V), rows sharded over the cores (tinygen.sharding)
        out[chunk, 0] = token_losses(logits, y).sum(axis=1)
        out[chunk, 1] = (y >= 0).sum(axis=1)
    return out


def capacity(model) -> int:
    """How many real tokens fit: block_size minus the positions the embed part prepends (prompt tuning)."""
    return model.config.block_size - model.n_prefix


def greedy_complete(model, prompts, max_new_tokens, stop_ids, batch_size=32) -> list:
    """Greedy continuations of token-id prompts of any lengths, up to a stop id (not included).

    prompts: [list of ids]; returns [list of new ids], one per prompt, in order.
    A prompt longer than the model's capacity - max_new_tokens loses its start.
    """
    keep = max(1, capacity(model) - max_new_tokens)
    prompts = [list(p)[-keep:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, new in zip(rows, _greedy_batch(model, [prompts[i] for i in rows], max_new_tokens, stop_ids)):
            results[i] = new
    return results


def _greedy_batch(model, prompts, max_new_tokens, stop_ids):
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts])  # (B,) current length of each row
    ids = np.zeros((B, lengths.max() + max_new_tokens), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    done = np.zeros(B, dtype=bool)
    new = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        logits = model.forward(ids[:, :lengths.max()])  # (B,T,V), rows sharded over the cores
        tok = logits[np.arange(B), lengths - 1].argmax(axis=-1)  # (B,) each row's next token
        for b in np.flatnonzero(~done):
            if int(tok[b]) in stop_ids:
                done[b] = True
            else:
                new[b].append(int(tok[b]))
                ids[b, lengths[b]] = tok[b]
                lengths[b] += 1
        if done.all():
            break
    return new


def completions(model, tokenizer, examples, max_new_tokens=None, cut_newline=False, batch_size=32) -> list:
    """The greedy completion text of each example, up to its first EOT (and newline, if cut_newline)."""
    if not examples:
        return []
    refs = [tokenizer.encode(e.completion) for e in examples]
    if max_new_tokens is None:  # enough for the longest reference and its EOT, within reason
        max_new_tokens = min(max(map(len, refs)) + 1, MAX_NEW_TOKENS)
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    outs = greedy_complete(model, prompts, max_new_tokens, {tokenizer.eot_id}, batch_size)
    texts = [tokenizer.decode(out) for out in outs]
    return [t.split("\n")[0] for t in texts] if cut_newline else texts


def accuracy(model, tokenizer, examples, max_new_tokens=None, cut_newline=False, batch_size=32) -> float:
    """Fraction of examples whose greedy completion matches exactly (see module docstring)."""
    texts = completions(model, tokenizer, examples, max_new_tokens, cut_newline, batch_size)
    return sum(exact_match(t, e.completion) for t, e in zip(texts, examples)) / len(examples) if examples else 0.0


def task_metrics(task: str, examples) -> tuple:
    """The metrics a task is scored by, exact match first: what its examples name, else the built-in
    task's (TASK_METRICS), else exact match alone.

    >>> task_metrics("name", [Example("p", "c", "name")])
    ('exact_match', 'subtoken')
    """
    named = next((e.metrics for e in examples if e.task == task and e.metrics), ()) or TASK_METRICS.get(task, ())
    return ("exact_match",) + tuple(m for m in named if m != "exact_match")


def score_completions(metrics, generated, examples) -> dict:
    """{metric: (n, k) stats} of the generated texts against the examples' completions."""
    references = [e.completion for e in examples]
    return {m: example_stats(m, generated, references) for m in metrics}


def intervals(stats: dict) -> dict:
    """{value name: [value, low, high]} for every metric's stats ("loss" is the held-out loss's), rounded."""
    out = {}
    for metric, s in stats.items():
        for name, iv in bootstrap(LOSS if metric == "loss" else metric, np.asarray(s)).items():
            out[name] = [round(iv.value, 4), round(iv.low, 4), round(iv.high, 4)]
    return out


def evaluate_tasks(model, tokenizer, examples, n_accuracy=64, cut_newline=False) -> dict:
    """{task: {"val_loss", "accuracy", "examples", "decoded", "empty", "scores", "stats", "metrics"}}
    on held-out examples.

    The loss uses every example; exact match and the task's metrics the greedy
    completions of the first n_accuracy of each task (greedy decoding is the
    slow part). "scores": {value name: [value, low, high]}, a bootstrap 95%
    interval over the examples, for val_loss, exact_match and each metric's
    values; "stats": the per-example numbers they come from (metrics.example_stats,
    "loss" = evaluate.example_losses), which tinygen.demo compares run against run;
    "metrics": the task's metric names; "decoded": how many were decoded, "empty": how many of
    those completions are empty (end-of-text first) or only spaces, which every metric scores 0.
    """
    cap = capacity(model)
    out = {}
    for task, items in by_task(examples).items():
        encoded = [next(iter(encode_examples([e], tokenizer, cap)), None) for e in items]
        losses = example_losses(model, encoded)
        decoded = items[:n_accuracy]
        names = task_metrics(task, items)
        texts = completions(model, tokenizer, decoded, cut_newline=cut_newline)
        stats = {"loss": losses, **score_completions(names, texts, decoded)}
        total, count = losses.sum(axis=0)
        acc = float(stats["exact_match"].mean()) if decoded else 0.0
        out[task] = {"val_loss": round(float(total / max(count, 1)), 4), "accuracy": round(acc, 4),
                     "examples": len(items), "decoded": len(decoded), "empty": sum(not t.strip() for t in texts),
                     "metrics": list(names), "scores": intervals(stats),
                     "stats": {k: np.round(v, 6).tolist() for k, v in stats.items()}}
    return out


def few_shot_examples(examples, train_examples, k=3, max_shot_chars=300) -> list:
    """Each held-out example with k solved training examples of its task in front.

    The shots are the first k training examples of the task (in their stored,
    deterministic order) that are at most max_shot_chars long:

        prompt = shot1.prompt + shot1.completion + "\\n\\n" + ... + example.prompt
    """
    shots = {}
    for e in train_examples:
        if len(e.prompt) + len(e.completion) <= max_shot_chars and len(shots.setdefault(e.task, [])) < k:
            shots[e.task].append(e)
    prefix = {t: "".join(s.prompt + s.completion + "\n\n" for s in group) for t, group in shots.items()}
    return [e._replace(prompt=prefix.get(e.task, "") + e.prompt) for e in examples]
