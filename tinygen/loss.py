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
from .layers import row_pieces

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
    probs = np.empty(logits.shape, logits.dtype)  # (B, T, V), C order: written a run of rows at a time
    lse = np.empty(logits.shape[:-1], dtype=logits.dtype)  # (B, T)
    rows = logits.reshape(-1, V)
    for lo, hi in row_pieces(rows.shape[0], V):  # a few rows at a time, in cache (see _softmax_rows)
        _softmax_rows(rows[lo:hi], probs.reshape(-1, V)[lo:hi], lse.reshape(-1)[lo:hi])
    safe = np.where(counted, targets, 0)
    picked = np.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # (B, T)
    n = int(counted.sum())
    loss = float(np.sum((lse - picked) * counted, dtype=np.float64) / n) if n else 0.0
    return loss, CrossEntropyCache(probs, safe, counted, n)


def _softmax_rows(logits, probs, lse):
    """probs = softmax(logits), lse = logsumexp(logits) for a few rows: logits, probs (n, V), lse (n,).

    cross_entropy_forward calls it on runs of rows (layers.row_pieces) so the
    five steps find their rows in cache: on config L's logits (2, 256, 50257),
    whole-array steps with a temporary for logits - m wrote 3 arrays of 100 MB.
    """
    m = logits.max(axis=-1, keepdims=True)  # (n, 1)
    np.subtract(logits, m, out=probs)
    np.exp(probs, out=probs)
    sumexp = probs.sum(axis=-1, keepdims=True)  # (n, 1)
    probs /= sumexp
    lse[:] = (m + np.log(sumexp))[:, 0]


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * (softmax(logits) - onehot(target)) / n at counted positions, 0 elsewhere.

    Computed as c * probs, then c subtracted at each target, with c = dloss / n
    where counted and 0 elsewhere (B, T): one pass over the (B, T, V) array.
    """
    probs, targets, counted, n = cache
    if n == 0:
        return (np.zeros_like(probs),)
    c = (counted * (dloss / n)).astype(probs.dtype)[..., None]  # (B, T, 1)
    dlogits = probs * c
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], -1) - c, axis=-1)
    return (dlogits,)


def token_losses(logits, targets):
    """-log softmax(logits)[target] at each position (B, T), float64, 0 where the target is IGNORE.

    The per-position terms whose mean is cross_entropy_forward's loss: for
    scoring examples one by one (held-out loss per example, the infilling loss
    of the middle alone). No backward: evaluation only.

    >>> token_losses(np.log([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]), np.array([[1, IGNORE]])).round(4)
    array([[1.3863, 0.    ]])
    """
    logits = np.asarray(logits, dtype=np.float64)
    if targets.shape != logits.shape[:-1]:
        raise TinygenError(f"targets shape {targets.shape} must match logits' leading shape {logits.shape[:-1]}")
    m = logits.max(axis=-1, keepdims=True)  # (B, T, 1)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[..., 0]  # (B, T)
    counted = targets != IGNORE
    picked = np.take_along_axis(logits, np.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    return np.where(counted, lse - picked, 0.0)
