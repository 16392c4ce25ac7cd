"""Softmax cross-entropy over the vocabulary, with an ignore index.

    loss = mean over counted positions of  logsumexp(logits) - logits[target]

Positions whose target is IGNORE (-1) count for nothing: fine-tuning marks
prompt tokens and padding this way. If every position is ignored the loss is
0.0 and every gradient is 0 (PyTorch would return NaN; a batch that happens
to hold only prompt tokens should not poison a training run).

Shapes: B batch, T time, V vocabulary.
"""
from typing import NamedTuple

import numpy as np

from .errors import TinygenError

IGNORE = -1


class CrossEntropyCache(NamedTuple):
    probs: np.ndarray  # (B, T, V) softmax(logits)
    targets: np.ndarray  # (B, T) target ids, 0 where not counted (any valid id: `counted` masks it out)
    counted: np.ndarray  # (B, T) bool, targets != IGNORE
    n: int  # number of counted positions


def cross_entropy_forward(logits, targets):
    """logits (B, T, V), targets (B, T) ints in [0, V) or IGNORE -> (loss, cache).

    logsumexp is computed as m + log(sum(exp(logits - m))) with m the row max,
    so logits of magnitude 1e4 neither overflow nor lose the answer.
    """
    V = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise TinygenError(f"targets shape {targets.shape} must match logits' leading shape {logits.shape[:-1]}")
    counted = targets != IGNORE
    bad = counted & ((targets < 0) | (targets >= V))
    if bad.any():
        raise TinygenError(f"target id {targets[bad][0]} is outside the vocabulary [0, {V}) (use {IGNORE} to ignore a position)")
    m = logits.max(axis=-1, keepdims=True)  # (B, T, 1)
    probs = np.exp(logits - m)  # (B, T, V)
    sumexp = probs.sum(axis=-1, keepdims=True)  # (B, T, 1)
    probs /= sumexp
    lse = (m + np.log(sumexp))[..., 0]  # (B, T)
    safe = np.where(counted, targets, 0)
    picked = np.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # (B, T)
    n = int(counted.sum())
    loss = float(np.sum((lse - picked) * counted, dtype=np.float64) / n) if n else 0.0
    return loss, CrossEntropyCache(probs, safe, counted, n)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * (softmax(logits) - onehot(target)) / n at counted positions, 0 elsewhere."""
    probs, targets, counted, n = cache
    if n == 0:
        return (np.zeros_like(probs),)
    dlogits = probs.copy()
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(probs, targets[..., None], -1) - 1.0, axis=-1)
    dlogits *= (counted * (dloss / n)).astype(probs.dtype)[..., None]
    return (dlogits,)
