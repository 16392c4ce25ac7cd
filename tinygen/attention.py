"""Causal multi-head self-attention: from the fused qkv projection to y.

The block computes qkv = ln_1(x) @ c_attn (one (C, 3C) matmul for q, k and v
of every head) and afterwards y @ c_proj; both are plain linear layers. This
module is the part between them:

    q, k, v = split(qkv)                        each (B, H, T, D)
    att     = softmax(q @ k^T / sqrt(D) + mask)      (B, H, T, T)
    y       = att @ v, heads merged back          (B, T, C)

where mask is 0 on and below the diagonal and -inf above it, so position t
only sees positions <= t. Shapes: B batch, T time, H heads, D head width,
C = H * D. docs/attention.md derives the backward.
"""
import math
from typing import NamedTuple, Optional

import numpy as np

from .layers import dropout_mask, softmax


def split_heads(qkv, n_head):
    """(B, T, 3C) -> q, k, v each (B, H, T, D), contiguous."""
    B, T, C3 = qkv.shape
    D = C3 // (3 * n_head)
    qkv = qkv.reshape(B, T, 3, n_head, D).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    return tuple(np.ascontiguousarray(a) for a in qkv)


def merge_heads(y):
    """(B, H, T, D) -> (B, T, H * D)."""
    B, H, T, D = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def causal_mask(Tq, Tk, dtype):
    """(Tq, Tk) additive mask: -inf where key j is after query i.

    The Tq queries are the last Tq of the Tk positions (Tq < Tk when decoding
    with a KV cache), so query i sits at absolute position Tk - Tq + i.
    >>> causal_mask(2, 3, np.float32)
    array([[  0.,   0., -inf], [  0.,   0.,   0.]], dtype=float32)
    """
    future = np.arange(Tk)[None, :] > np.arange(Tk - Tq, Tk)[:, None]
    return np.where(future, -np.inf, 0.0).astype(dtype)


def attend(q, k, v, dropout_mask=None):
    """y = softmax(q k^T / sqrt(D) + causal mask) v, the probabilities multiplied
    by `dropout_mask` (B,H,Tq,Tk) first when one is given.

    q (B,H,Tq,D), k, v (B,H,Tk,D) -> y (B,H,Tq,D), att (B,H,Tq,Tk) before dropout.
    """
    Tq, D = q.shape[-2:]
    Tk = k.shape[-2]
    att = (q * (1.0 / math.sqrt(D))) @ k.swapaxes(-1, -2)  # (B, H, Tq, Tk) scores; scaling q is cheaper
    att += causal_mask(Tq, Tk, att.dtype)
    softmax(att, out=att)
    return (att if dropout_mask is None else att * dropout_mask) @ v, att


class AttentionCache(NamedTuple):
    q: np.ndarray  # (B, H, T, D)
    k: np.ndarray  # (B, H, T, D)
    v: np.ndarray  # (B, H, T, D)
    att: np.ndarray  # (B, H, T, T) softmax probabilities, before dropout
    mask: Optional[np.ndarray]  # (B, H, T, T) attention-dropout mask, or None


def causal_attention_forward(qkv, n_head, dropout=0.0, rng=None, mask=None):
    """qkv (B, T, 3C) -> y (B, T, C). `dropout` drops attention probabilities
    (GPT-2's attn_pdrop), with a mask drawn from `rng` or given as `mask`."""
    q, k, v = split_heads(qkv, n_head)  # (B, H, T, D) each
    if mask is None and dropout > 0.0 and rng is not None:
        mask = dropout_mask(q.shape[:-1] + (k.shape[-2],), dropout, rng, qkv.dtype)
    y, att = attend(q, k, v, mask)
    return merge_heads(y), AttentionCache(q, k, v, att, mask)


def causal_attention_backward(dy, cache):
    """dy (B, T, C) -> dqkv (B, T, 3C). With s = scores, a = att (after dropout: a * mask):

        dv = a^T @ dy                 da = dy @ v^T  (times mask)
        ds = att * (da - sum(da * att, over keys)) / sqrt(D)    (softmax backward)
                                  (computed as da*att - att*sum(da*att), one temporary less)
        dq = ds @ k                   dk = ds^T @ q

    Masked entries have att = 0, so their ds is 0: no gradient flows to the future.
    """
    q, k, v, att, mask = cache
    B, H, T, D = q.shape
    dy = dy.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    a = att if mask is None else att * mask
    dv = a.swapaxes(-1, -2) @ dy  # (B, H, T, D)
    da = dy @ v.swapaxes(-1, -2)  # (B, H, T, T)
    if mask is not None:
        da *= mask
    ds = da * att
    ds -= att * ds.sum(axis=-1, keepdims=True)  # att * (da - sum(da * att))
    dqkv = np.empty((B, T, 3, H, D), dtype=q.dtype)
    dq, dk, dv_out = dqkv.transpose(2, 0, 3, 1, 4)  # (B, H, T, D) views into dqkv
    dv_out[...] = dv
    np.matmul(ds, k, out=dq)
    dq *= 1.0 / math.sqrt(D)  # the 1/sqrt(D) of the scores, applied on the smaller array
    np.matmul(ds.swapaxes(-1, -2), q, out=dk)
    dk *= 1.0 / math.sqrt(D)
    return (dqkv.reshape(B, T, 3 * H * D),)
