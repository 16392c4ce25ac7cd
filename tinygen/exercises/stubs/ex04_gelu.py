"""Exercise 4: GELU, GPT-2's tanh approximation ("gelu_new").

    gelu(x) = 0.5 x (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)      x (...) -> (...)

Not the exact form 0.5 x (1 + erf(x / sqrt(2))): close, but not GPT-2's numbers.
Read first: docs/layers.md, "GELU". Check: tinygen exercises check DIR gelu
"""
import math
from typing import NamedTuple

import numpy as np


class GeluCache(NamedTuple):
    x: np.ndarray  # (...) the input


def gelu_forward(x):
    """x (...) -> (out (...), cache)."""
    raise NotImplementedError


def gelu_backward(dout, cache):
    """dout (...) -> (dx,) with dx (...).

    Hint: d gelu/dx = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) u',
    u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2); then multiply by dout.
    """
    raise NotImplementedError
