"""Reference solution of exercise 6."""
import math
from typing import NamedTuple

import numpy as np


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class AttentionCache(NamedTuple):
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    att: np.ndarray


def causal_attention_forward(qkv, n_head):
    B, T, C3 = qkv.shape
    D = C3 // (3 * n_head)
    q, k, v = qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4)
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(D)
    scores = scores + np.where(np.triu(np.ones((T, T), dtype=bool), 1), -np.inf, 0.0)
    att = softmax(scores)
    y = att @ v
    return y.transpose(0, 2, 1, 3).reshape(B, T, n_head * D), AttentionCache(q, k, v, att)


def causal_attention_backward(dy, cache):
    q, k, v, att = cache
    B, H, T, D = q.shape
    dy = dy.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    dv = att.swapaxes(-1, -2) @ dy
    datt = dy @ v.swapaxes(-1, -2)
    ds = att * (datt - np.sum(datt * att, axis=-1, keepdims=True)) / math.sqrt(D)
    dq = ds @ k
    dk = ds.swapaxes(-1, -2) @ q
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4)
    return (dqkv.reshape(B, T, 3 * H * D),)
