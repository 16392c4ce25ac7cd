"""Exercise 6: causal multi-head self-attention, softmax included.

    q, k, v = split(qkv)                                   each (B, H, T, D)
    att     = softmax(q @ k^T / sqrt(D) + mask)            (B, H, T, T), mask -inf above the diagonal
    y       = att @ v, heads merged back                   (B, T, C)

qkv (B, T, 3C) holds q, k, v side by side along the last axis (q = qkv[..., :C]),
and within each, head h is columns [h D, (h + 1) D). C = H * D.
Read first: docs/attention.md. Check: tinygen exercises check DIR attention
"""
import math
from typing import NamedTuple

import numpy as np


def softmax(x):
    """Softmax over the last axis. x (..., N) -> (..., N), rows sum to 1.

    Hint: subtract each row's max first. It changes nothing mathematically and
    keeps exp from overflowing: exp(1000) is inf even in float64.
    """
    raise NotImplementedError


class AttentionCache(NamedTuple):
    q: np.ndarray  # (B, H, T, D)
    k: np.ndarray  # (B, H, T, D)
    v: np.ndarray  # (B, H, T, D)
    att: np.ndarray  # (B, H, T, T) the softmax probabilities


def causal_attention_forward(qkv, n_head):
    """qkv (B, T, 3C), n_head H -> (y (B, T, C), cache).

    Hints: reshape to (B, T, 3, H, D) and transpose to (3, B, H, T, D); position
    t may only see positions <= t (np.triu gives the future); merge the heads
    back with the inverse transpose.
    """
    raise NotImplementedError


def causal_attention_backward(dy, cache):
    """dy (B, T, C) -> (dqkv,) with dqkv (B, T, 3C).

    Hints: dv = att^T @ dy; datt = dy @ v^T; the softmax backward is
    ds = att * (datt - sum(datt * att, over the keys)); then the 1/sqrt(D):
    dq = ds @ k / sqrt(D), dk = ds^T @ q / sqrt(D). Masked entries have att = 0.
    """
    raise NotImplementedError
