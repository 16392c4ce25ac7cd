"""Evaluation of prompt/completion tasks: held-out loss and exact-match accuracy.

    loss      mean cross-entropy over the completion tokens (and the EOT that
              ends them) of every held-out example, token-weighted per task
    accuracy  fraction of examples whose greedy completion, up to the first
              EOT, equals the reference completion (both stripped of spaces)
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

from ..model import gpt_forward
from .tasks import Example, by_task, encode_examples, make_batch

MAX_NEW_TOKENS = 48  # longest greedy completion tried for the accuracy


def task_losses(model, encoded, batch_size=32) -> dict:
    """{task: mean loss over its completion tokens}, token-weighted over batches."""
    out = {}
    for task, items in by_task(encoded).items():
        items = sorted(items, key=lambda e: len(e.ids))  # similar lengths: less padding
        total = count = 0.0
        for i in range(0, len(items), batch_size):
            x, y = make_batch(items[i:i + batch_size], pad_id=0)
            n = int((y >= 0).sum())
            total += model.loss(x, y) * n
            count += n
        out[task] = total / max(count, 1)
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
        logits, _ = gpt_forward(model.params, ids[:, :lengths.max()], model.config, model.parts)  # (B,T,V)
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


def exact_match(generated: str, reference: str) -> bool:
    """Whether a generated completion equals the reference, surrounding spaces aside.

    >>> exact_match(" spawn ", "spawn")
    True
    """
    return generated.strip() == reference.strip()


def accuracy(model, tokenizer, examples, max_new_tokens=None, cut_newline=False, batch_size=32) -> float:
    """Fraction of examples whose greedy completion matches exactly (see module docstring)."""
    if not examples:
        return 0.0
    refs = [tokenizer.encode(e.completion) for e in examples]
    if max_new_tokens is None:  # enough for the longest reference and its EOT, within reason
        max_new_tokens = min(max(map(len, refs)) + 1, MAX_NEW_TOKENS)
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    outs = greedy_complete(model, prompts, max_new_tokens, {tokenizer.eot_id}, batch_size)
    hits = 0
    for e, out in zip(examples, outs):
        text = tokenizer.decode(out)
        if cut_newline:
            text = text.split("\n")[0]
        hits += exact_match(text, e.completion)
    return hits / len(examples)


def evaluate_tasks(model, tokenizer, examples, n_accuracy=64, cut_newline=False) -> dict:
    """{task: {"val_loss", "accuracy", "examples"}} on held-out examples.

    The loss uses every example; the accuracy the first n_accuracy of each task
    (greedy decoding is the slow part).
    """
    encoded = encode_examples(examples, tokenizer, capacity(model))
    losses = task_losses(model, encoded)
    out = {}
    for task, items in by_task(examples).items():
        acc = accuracy(model, tokenizer, items[:n_accuracy], cut_newline=cut_newline)
        out[task] = {"val_loss": round(float(losses.get(task, float("nan"))), 4),
                     "accuracy": round(acc, 4), "examples": len(items)}
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
    return [Example(prefix.get(e.task, "") + e.prompt, e.completion, e.task) for e in examples]
