"""Reference solution of exercise 2."""
from typing import NamedTuple

import numpy as np


class EmbeddingCache(NamedTuple):
    ids: np.ndarray
    vocab_size: int


def embedding_forward(ids, w):
    return w[ids], EmbeddingCache(ids, w.shape[0])


def embedding_backward(dout, cache):
    ids, vocab_size = cache
    C = dout.shape[-1]
    dw = np.zeros((vocab_size, C), dtype=dout.dtype)
    np.add.at(dw, ids.reshape(-1), dout.reshape(-1, C))
    return (dw,)
