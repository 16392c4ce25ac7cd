"""Exercise 1: the linear layer, forward and backward.

    out = x @ w + b        x (..., C_in), w (C_in, N), b (N,)  ->  out (..., N)

Read first: docs/layers.md, "Linear". Check your work with
    tinygen exercises check DIR linear
Shapes: "..." is any number of leading dimensions (B, T in the model); M is
their product. Work in NumPy only; the grader runs your code in float64.
"""
from typing import NamedTuple

import numpy as np


class LinearCache(NamedTuple):
    x: np.ndarray  # (..., C_in) the input
    w: np.ndarray  # (C_in, N)   the weight


def linear_forward(x, w, b):
    """out = x @ w + b.  x (..., C_in), w (C_in, N), b (N,) -> (out (..., N), cache).

    Hint: `x @ w` already works for any number of leading dimensions.
    """
    raise NotImplementedError


def linear_backward(dout, cache):
    """dout (..., N) -> (dx (..., C_in), dw (C_in, N), db (N,)).

    Hints: dx = dout @ w.T. w and b are used by every row, so their gradients
    add up over every leading dimension: reshape x to (M, C_in) and dout to
    (M, N) first, then dw = x.T @ dout and db is a sum over the M rows.
    """
    raise NotImplementedError
