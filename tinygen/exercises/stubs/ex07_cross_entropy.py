"""Exercise 7: softmax cross-entropy over the vocabulary, with an ignore index.

    loss = mean over counted positions of  logsumexp(logits) - logits[target]
    logits (B, T, V), targets (B, T) ints in [0, V), or -1 where a position does not count

Read first: docs/layers.md, "Softmax and cross-entropy". Check: tinygen exercises check DIR cross_entropy
"""
from typing import NamedTuple

import numpy as np


class CrossEntropyCache(NamedTuple):
    probs: np.ndarray  # (B, T, V) softmax(logits)
    targets: np.ndarray  # (B, T)
    n: int  # the number of counted positions


def cross_entropy_forward(logits, targets):
    """logits (B, T, V), targets (B, T) -> (loss: float, cache).

    Hint: logsumexp(z) = m + log(sum(exp(z - m))) with m the row max.
    """
    raise NotImplementedError


def cross_entropy_backward(dloss, cache):
    """dloss (a float, usually 1.0) -> (dlogits,) with dlogits (B, T, V).

    Hint: dlogits = dloss * (probs - onehot(target)) / n at counted positions,
    0 at ignored ones: the loss is a mean, so its gradient has the 1/n too.
    """
    raise NotImplementedError
