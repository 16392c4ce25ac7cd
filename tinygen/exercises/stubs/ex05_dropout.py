"""Exercise 5: inverted dropout with a given mask.

    out = x * keep / (1 - p)      x (...), keep (...) bool (True = the element survives), 0 <= p < 1

Each element survives with probability 1 - p, so dividing by 1 - p keeps the
expected value of out equal to x, and evaluation (no dropout) sees activations
of the same size as training did. The grader passes the mask so results are exact.
Read first: docs/layers.md, "Dropout". Check: tinygen exercises check DIR dropout
"""
from typing import NamedTuple

import numpy as np


class DropoutCache(NamedTuple):
    mask: np.ndarray  # (...) 0 or 1/(1-p) per element


def dropout_forward(x, keep, p):
    """x (...), keep (...) bool, p float -> (out (...), cache)."""
    raise NotImplementedError


def dropout_backward(dout, cache):
    """dout (...) -> (dx,) with dx (...). Hint: out is x times a constant mask."""
    raise NotImplementedError
