"""Reference solution of exercise 7."""
from typing import NamedTuple

import numpy as np


class CrossEntropyCache(NamedTuple):
    probs: np.ndarray
    targets: np.ndarray
    n: int


def cross_entropy_forward(logits, targets):
    counted = targets != -1
    safe = np.where(counted, targets, 0)
    m = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - m)
    lse = (m + np.log(e.sum(axis=-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    n = int(counted.sum())
    loss = float(np.sum((lse - picked) * counted) / n)
    return loss, CrossEntropyCache(e / e.sum(axis=-1, keepdims=True), targets, n)


def cross_entropy_backward(dloss, cache):
    probs, targets, n = cache
    counted = targets != -1
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, np.where(counted, targets, 0)[..., None], 1.0, axis=-1)
    dlogits = (probs - onehot) * counted[..., None]
    dlogits = dlogits * dloss / n
    return (dlogits,)
