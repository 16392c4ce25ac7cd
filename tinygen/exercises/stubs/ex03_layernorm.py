"""Exercise 3: layer norm, forward and backward.

    out = (x - mean) / sqrt(var + eps) * w + b      statistics over the last axis
    x (..., C), w (C,), b (C,)  ->  out (..., C);   var is the biased variance (divide by C)

Read first: docs/layers.md, "Layer norm" (the backward is derived there).
Check: tinygen exercises check DIR layernorm
"""
from typing import NamedTuple

import numpy as np


class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) (x - mean) * rstd
    rstd: np.ndarray  # (..., 1) 1 / sqrt(var + eps)
    w: np.ndarray  # (C,)


def layernorm_forward(x, w, b, eps=1e-5):
    """x (..., C), w (C,), b (C,) -> (out (..., C), cache)."""
    raise NotImplementedError


def layernorm_backward(dout, cache):
    """dout (..., C) -> (dx (..., C), dw (C,), db (C,)).

    Hints: with g = dout * w (the gradient with respect to xhat),
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), means over the last axis.
    Both terms matter: mean and variance both depend on x. dw and db add up
    over every leading dimension.
    """
    raise NotImplementedError
