"""Exercise 2: the embedding, a row lookup, and its scatter-add backward.

    out = w[ids]           ids (...) ints in [0, V), w (V, C)  ->  out (..., C)

Read first: docs/layers.md, "Embedding and position embedding". Check: tinygen exercises check DIR embedding
"""
from typing import NamedTuple

import numpy as np


class EmbeddingCache(NamedTuple):
    ids: np.ndarray  # (...) the ids that were looked up
    vocab_size: int  # V, the rows of w


def embedding_forward(ids, w):
    """ids (...) ints, w (V, C) -> (out (..., C), cache)."""
    raise NotImplementedError


def embedding_backward(dout, cache):
    """dout (..., C) -> (dw,) with dw (V, C).

    dw[v] is the sum of dout over every position whose id is v. Hint: an id
    can appear several times, and `dw[ids] += dout` keeps only one of them
    (NumPy buffers fancy-index assignment); look up np.add.at.
    """
    raise NotImplementedError
