"""Multi-head self-attention, causal and bidirectional: from the fused qkv projection to y.

The block computes qkv = ln_1(x) @ c_attn (one (C, 3C) matmul for q, k and v
of every head) and afterwards y @ c_proj; both are plain linear layers. This
module is the part between them:

    q, k, v = split(qkv)                        each (B, H, T, D)
    att     = softmax(q @ k^T / sqrt(D) + mask)      (B, H, T, T)
    y       = att @ v, heads merged back          (B, T, C)

where mask is 0 on and below the diagonal and -inf above it, so position t
only sees positions <= t. `attend` / `attend_backward` are that math for
any queries; `causal_attention_forward` / `_backward` run it on blocks of
query rows, so the future keys of a whole block are never computed.
`bidirectional_attention_forward` / `_backward` drop the mask: every
position sees every other (BERT's encoder; a masked language model needs
the words on both sides of a blank). With T = 1 the two are the same.
Shapes: B batch, T time, H heads, D head width, C = H * D.
docs/attention.md derives the backward.
"""
import math
from typing import NamedTuple, Optional

import numpy as np

from .layers import dropout_mask, softmax

BLOCK = 64  # query rows per block. Forward + backward of B=4, H=6, T=256, D=64 on one core:
#            blocks of 32 / 64 / 128 / 256 rows take 18 / 17 / 19 / 23 ms


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


def attend(q, k, v, dropout_mask=None, causal=True):
    """y = softmax(q k^T / sqrt(D) + causal mask) v, the probabilities multiplied
    by `dropout_mask` (B,H,Tq,Tk) first when one is given; causal=False: no mask.

    q (B,H,Tq,D), k, v (B,H,Tk,D) -> y (B,H,Tq,D), att (B,H,Tq,Tk) before dropout.
    The queries are the last Tq of the Tk positions (see causal_mask).
    """
    Tq, D = q.shape[-2:]
    Tk = k.shape[-2]
    att = (q * (1.0 / math.sqrt(D))) @ k.swapaxes(-1, -2)  # (B, H, Tq, Tk) scores; scaling q is cheaper
    if causal:  # keys before Tk - Tq are in every query's past: only the last Tq columns can be masked
        att[..., Tk - Tq:] += causal_mask(Tq, Tq, att.dtype)
    softmax(att, out=att)
    return (att if dropout_mask is None else att * dropout_mask) @ v, att


def attend_backward(dy, q, k, v, att, dropout_mask=None):
    """attend's backward. dy (B,H,Tq,D) -> dq (B,H,Tq,D), dk, dv (B,H,Tk,D).

    With s = scores, a = att (after dropout: a = att * mask):

        dv = a^T @ dy                 da = dy @ v^T  (times mask)
        ds = att * (da - sum(da * att, over keys))      (softmax backward, w.r.t. the scaled scores)
        dq = ds @ k / sqrt(D)         dk = ds^T @ q / sqrt(D)

    Masked entries have att = 0, so their ds is 0: no gradient flows to the future.
    ds overwrites da in place (the row sums by einsum, no (Tq, Tk) temporary),
    and 1/sqrt(D) scales dq and dk, (Tq, D) and (Tk, D), not the (Tq, Tk) ds:
    two passes over the (B, H, Tq, Tk) block fewer; on M 31 -> 28 ms of CPU per
    layer's attention (forward with the diagonal-only mask, and backward).
    """
    a = att if dropout_mask is None else att * dropout_mask
    dv = a.swapaxes(-1, -2) @ dy  # (B, H, Tk, D)
    da = dy @ v.swapaxes(-1, -2)  # (B, H, Tq, Tk)
    if dropout_mask is not None:
        da *= dropout_mask
    da -= np.einsum("...ij,...ij->...i", da, att)[..., None]  # da - sum(da * att)
    da *= att  # ds
    scale = 1.0 / math.sqrt(q.shape[-1])  # the 1/sqrt(D) of the scores
    dq = da @ k  # (B, H, Tq, D)
    dq *= scale
    dk = da.swapaxes(-1, -2) @ q  # (B, H, Tk, D)
    dk *= scale
    return dq, dk, dv


def query_blocks(T, block=BLOCK):
    """(start, stop) of each block of `block` query rows.

    >>> query_blocks(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    return [(lo, min(lo + block, T)) for lo in range(0, T, block)]


class AttentionCache(NamedTuple):
    q: np.ndarray  # (B, H, T, D)
    k: np.ndarray  # (B, H, T, D)
    v: np.ndarray  # (B, H, T, D)
    att: tuple  # per query block [lo, hi): (B, H, hi - lo, hi) softmax probabilities, before dropout
    mask: Optional[np.ndarray]  # (B, H, T, T) attention-dropout mask, or None
    block: int  # query rows per block


def causal_attention_forward(qkv, n_head, dropout=0.0, rng=None, mask=None, block=BLOCK):
    """qkv (B, T, 3C) -> y (B, T, C). `dropout` drops attention probabilities
    (GPT-2's attn_pdrop), with a mask drawn from `rng` or given as `mask`.

    The queries go in blocks of `block` rows. Block [lo, hi) attends to keys
    [0, hi) only: every key after hi is in the future of all its rows, so its
    score would be masked to -inf and its probability would be exactly 0.
    Skipping those keys gives the same y with less work: n blocks compute
    (n + 1) / (2 n) of the full T x T scores, 62.5 % for T = 256 in blocks of 64.
    """
    q, k, v = split_heads(qkv, n_head)  # (B, H, T, D) each
    T = q.shape[2]
    if mask is None and dropout > 0.0 and rng is not None:
        mask = dropout_mask(q.shape[:-1] + (T,), dropout, rng, qkv.dtype)
    y = np.empty_like(q)  # (B, H, T, D)
    att = []
    for lo, hi in query_blocks(T, block):
        m = None if mask is None else mask[:, :, lo:hi, :hi]
        y[:, :, lo:hi], a = attend(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], m)  # a (B, H, hi - lo, hi)
        att.append(a)
    return merge_heads(y), AttentionCache(q, k, v, tuple(att), mask, block)


def causal_attention_backward(dy, cache):
    """dy (B, T, C) -> dqkv (B, T, 3C): attend_backward for each query block.

    A block's queries get their gradient from that block alone; keys and
    values [0, hi) are seen by every block from theirs on, so their
    gradients add up over the blocks (the `+=` below).
    """
    q, k, v, att, mask, block = cache
    B, H, T, D = q.shape
    dy = dy.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    dqkv = np.zeros((B, T, 3, H, D), dtype=q.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # (B, H, T, D) views into dqkv
    for (lo, hi), a in zip(query_blocks(T, block), att):
        m = None if mask is None else mask[:, :, lo:hi, :hi]
        dq[:, :, lo:hi], dk_block, dv_block = attend_backward(dy[:, :, lo:hi], q[:, :, lo:hi], k[:, :, :hi],
                                                              v[:, :, :hi], a, m)
        dk[:, :, :hi] += dk_block
        dv[:, :, :hi] += dv_block
    return (dqkv.reshape(B, T, 3 * H * D),)


class BidirectionalCache(NamedTuple):
    q: np.ndarray  # (B, H, T, D)
    k: np.ndarray  # (B, H, T, D)
    v: np.ndarray  # (B, H, T, D)
    att: np.ndarray  # (B, H, T, T) softmax probabilities, before dropout; no zeros from a mask
    mask: Optional[np.ndarray]  # (B, H, T, T) attention-dropout mask, or None


def bidirectional_attention_forward(qkv, n_head, dropout=0.0, rng=None, mask=None):
    """qkv (B, T, 3C) -> y (B, T, C): every query attends to all T keys, past and future.

    The same math as the causal pair without the mask: one (T, T) block of
    scores per head, nothing to skip. `dropout` drops attention probabilities,
    with a mask drawn from `rng` or given as `mask` (B, H, T, T).
    """
    q, k, v = split_heads(qkv, n_head)  # (B, H, T, D) each
    T = q.shape[2]
    if mask is None and dropout > 0.0 and rng is not None:
        mask = dropout_mask(q.shape[:-1] + (T,), dropout, rng, qkv.dtype)
    y, att = attend(q, k, v, mask, causal=False)  # (B, H, T, D), (B, H, T, T)
    return merge_heads(y), BidirectionalCache(q, k, v, att, mask)


def bidirectional_attention_backward(dy, cache):
    """dy (B, T, C) -> dqkv (B, T, 3C): attend_backward once over all T queries and keys.

    attend_backward's formulas hold as they are: with no masked entry every
    att is > 0, so every key gets gradient from every query (the future too).
    Reads q, k, v, att and the dropout mask from the cache.
    """
    q, k, v, att, mask = cache
    B, H, T, D = q.shape
    dy = dy.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    dq, dk, dv = attend_backward(dy, q, k, v, att, mask)  # each (B, H, T, D)
    dqkv = np.stack([dq, dk, dv], axis=2)  # (B, H, 3, T, D)
    return (dqkv.transpose(0, 3, 2, 1, 4).reshape(B, T, 3 * H * D),)  # (B, T, 3, H, D) -> (B, T, 3C)


def attention_probs(cache):
    """The full (B, H, T, T) attention probabilities of a forward, zeros in the future:
    the cache's blocks side by side (for looking at attention, and for tests)."""
    B, H, T, _ = cache.q.shape
    probs = np.zeros((B, H, T, T), dtype=cache.q.dtype)
    for (lo, hi), a in zip(query_blocks(T, cache.block), cache.att):
        probs[:, :, lo:hi, :hi] = a
    return probs
