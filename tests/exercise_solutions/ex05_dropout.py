"""Reference solution of exercise 5."""
from typing import NamedTuple

import numpy as np


class DropoutCache(NamedTuple):
    mask: np.ndarray


def dropout_forward(x, keep, p):
    mask = keep.astype(x.dtype) / (1.0 - p)
    return x * mask, DropoutCache(mask)


def dropout_backward(dout, cache):
    return (dout * cache.mask,)
