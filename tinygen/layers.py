"""The elementwise and per-row layers of GPT-2, each a forward/backward pair.

Contract (cs231n / llm.c style): `foo_forward(x, *weights) -> (out, cache)`
and `foo_backward(dout, cache) -> (dx, *dweights)`, gradients in the order of
the forward's arguments. Backward functions never modify `dout` or the cache,
and return arrays they allocated, with one exception: an identity (dropout
without a mask) returns `dout` itself rather than a copy. So a caller adds
into a returned gradient in place only when no identity can have produced it
(the model's `+=` are on arrays it made). Attention lives in attention.py,
the loss in loss.py; docs/layers.md derives every backward below.

Shapes: B batch, T time, C width (n_embd), V vocabulary, N any output width.
Scalars are Python floats, so a float32 array stays float32 (under NumPy 2's
promotion rules an np.float64 scalar would silently promote it).
"""
import math
from typing import NamedTuple, Optional

import numpy as np

from .config import LAYER_NORM_EPS  # GPT-2's layer_norm_epsilon, 1e-5

GELU_K = math.sqrt(2.0 / math.pi)  # tanh-GELU's inner scale, sqrt(2/pi)
GELU_A = 0.044715  # tanh-GELU's cubic coefficient


# ---------------------------------------------------------------- linear
class LinearCache(NamedTuple):
    x: np.ndarray  # (..., C_in) the input
    w: np.ndarray  # (C_in, N)   the weight, stored (in, out) as GPT-2's Conv1D


def linear_forward(x, w, b):
    """out = x @ w + b.  x (..., C_in), w (C_in, N), b (N,) or None -> out (..., N)."""
    out = x.reshape(-1, x.shape[-1]) @ w  # (M, N), M = prod(leading dims): one BLAS call
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], w.shape[1]), LinearCache(x, w)


def linear_backward(dout, cache):
    """dx = dout @ w.T, dw = x.T @ dout (summed over all leading dims), db = sum(dout).

    dout (..., N) -> dx (..., C_in), dw (C_in, N), db (N,).
    """
    x, w = cache
    x2 = x.reshape(-1, x.shape[-1])  # (M, C_in)
    d2 = dout.reshape(-1, dout.shape[-1])  # (M, N)
    dx = (d2 @ w.T).reshape(x.shape)
    dw = x2.T @ d2  # (C_in, N)
    db = d2.sum(axis=0)  # (N,)
    return dx, dw, db


# ------------------------------------------------------------- embedding
class EmbeddingCache(NamedTuple):
    ids: np.ndarray  # (...) integer ids, the rows that were read
    vocab_size: int  # rows of the table


def embedding_forward(ids, w):
    """out = w[ids]: a row lookup.  ids (...) ints, w (V, C) -> out (..., C).

    >>> embedding_forward(np.array([2, 0]), np.arange(6.).reshape(3, 2))[0]
    array([[4., 5.], [0., 1.]])
    """
    return w[ids], EmbeddingCache(ids, w.shape[0])


def embedding_backward(dout, cache):
    """dw[v] = sum of dout at every position whose id is v: a scatter-add.

    Repeated ids must add up, which plain `dw[ids] += dout` would not do
    (it keeps only the last write); `np.add.at` is the unbuffered version.
    dout (..., C) -> dw (V, C).
    """
    ids, vocab_size = cache
    C = dout.shape[-1]
    dw = np.zeros((vocab_size, C), dtype=dout.dtype)
    np.add.at(dw, ids.reshape(-1), dout.reshape(-1, C))
    return (dw,)


# ------------------------------------------------------- cache-sized pieces
PIECE = 1 << 17  # elements per piece of an elementwise chain: the chain's steps find a piece of each
#                  operand (512 KiB in float32) in the core's caches instead of streaming whole arrays
#                  through memory once per step. Smaller pieces keep more of it in L2 (2 MiB) but cost
#                  more NumPy calls, and every call takes the GIL back when its loop ends, where two
#                  shard threads often wait for each other. GELU forward + backward on M's shard
#                  (4, 256, 1536), ms per call, one thread alone / two threads at once: 3.9 / 9.5 in
#                  pieces of 2^15, 3.9 / 6.9 in 2^16, 3.7 / 4.9 in 2^17, 4.8 / 5.1 in 2^18


def in_pieces(step, *arrays):
    """step(*pieces) for each run of PIECE elements of the arrays, flattened. Returns nothing.

    An elementwise chain of k NumPy operations over an array larger than the
    cache streams it through memory k times; done piece by piece, each piece is
    read once and the other k - 1 operations find it in cache. The arrays must
    have one size; those `step` writes into must be C-contiguous (a
    non-contiguous input is read through a flat copy).

    >>> a, out = np.arange(5.0), np.empty(5)
    >>> in_pieces(lambda a, out: np.multiply(a, 2.0, out=out), a, out); out
    array([0., 2., 4., 6., 8.])
    """
    flat = [a.reshape(-1) for a in arrays]
    for lo in range(0, flat[0].size, PIECE):
        step(*(f[lo:lo + PIECE] for f in flat))


def row_pieces(rows, width):
    """(start, stop) of runs of whole rows of `width` elements, about PIECE elements a run
    (at least one row): in_pieces for a chain whose steps work along rows (softmax).

    >>> row_pieces(5, PIECE // 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    step = max(1, PIECE // width)
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


# ------------------------------------------------------------ layer norm
class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) normalised input (x - mean) * rstd
    rstd: np.ndarray  # (..., 1) 1 / sqrt(var + eps)
    w: np.ndarray  # (C,) gain


def layernorm_forward(x, w, b, eps=LAYER_NORM_EPS):
    """out = (x - mean) / sqrt(var + eps) * w + b, statistics over the last axis.

    x (..., C), w (C,), b (C,) -> out (..., C). A constant row has var ~0
    (up to the rounding of its mean), so rstd <= 1/sqrt(eps) stays finite.
    The rows go in runs of about PIECE elements (row_pieces), each run's six
    steps in cache; the sum of squares by einsum, with no (rows, C) temporary.
    CPU time of one call on M's (8, 256, 384): 2.2 ms as whole-array steps, 1.5 ms (in runs of 2^16).
    """
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (M, C), M = prod(leading dims)
    xhat, out = np.empty(x2.shape, x.dtype), np.empty(x2.shape, x.dtype)  # (M, C)
    rstd = np.empty((x2.shape[0], 1), dtype=x.dtype)  # (M, 1)
    for lo, hi in row_pieces(x2.shape[0], C):
        rows, r = x2[lo:hi], rstd[lo:hi]
        xc = np.subtract(rows, np.add.reduce(rows, axis=-1, keepdims=True) / C, out=xhat[lo:hi])  # x - mean
        var = np.einsum("mc,mc->m", xc, xc)[:, None] / C  # (m, 1) biased, as GPT-2
        np.sqrt(var + eps, out=r)
        np.reciprocal(r, out=r)  # rstd = 1 / sqrt(var + eps)
        xc *= r  # xhat
        np.multiply(xc, w, out=out[lo:hi])
        out[lo:hi] += b
    return out.reshape(x.shape), LayerNormCache(xhat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,)), w)


def layernorm_backward(dout, cache):
    """With g = dout * w (gradient w.r.t. xhat):

        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
        dw = sum(dout * xhat),  db = sum(dout)   (sums over all leading dims)

    The two means remove the directions that normalisation projects out
    (shifting the row, scaling it). Uses cache.xhat, cache.rstd, cache.w.
    dx in runs of rows, as the forward (2.9 -> 2.1 ms of CPU on M, runs of 2^16).
    """
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    d2, xh, rs = dout.reshape(-1, C), xhat.reshape(-1, C), rstd.reshape(-1, 1)  # (M, C), (M, C), (M, 1)
    dx = np.empty(xh.shape, xh.dtype)  # (M, C)
    for lo, hi in row_pieces(xh.shape[0], C):
        g = np.multiply(d2[lo:hi], w, out=dx[lo:hi])  # (m, C)
        mean_g = np.add.reduce(g, axis=-1, keepdims=True) / C  # (m, 1)
        mean_gx = np.einsum("mc,mc->m", g, xh[lo:hi])[:, None] / C  # (m, 1) mean(g * xhat)
        g -= mean_g
        g -= xh[lo:hi] * mean_gx
        g *= rs[lo:hi]
    dw = np.einsum("mc,mc->c", d2, xh)
    db = d2.sum(axis=0)
    return dx.reshape(dout.shape), dw, db


# ------------------------------------------------------------------ GELU
class GeluCache(NamedTuple):
    x: np.ndarray  # (...) the input
    s: np.ndarray  # (...) sigmoid(2u) = 0.5 (1 + tanh(u)), u = GELU_K (x + GELU_A x^3)


def _gelu_piece(x, s, out):
    """s = 0.5 (1 + tanh(u)), out = x * s on one piece (see gelu_forward)."""
    np.multiply(x, x, out=s)
    s *= GELU_K * GELU_A
    s += GELU_K
    s *= x  # u = K (x + A x^3)
    np.tanh(s, out=s)
    s *= 0.5
    s += 0.5  # s = 0.5 (1 + tanh(u)) = sigmoid(2u)
    np.multiply(x, s, out=out)


def gelu_forward(x):
    """GPT-2's tanh approximation ("gelu_new"):

        gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
                = x * s,  s = 0.5 (1 + tanh(u)) = sigmoid(2u)

    The cache keeps s, the backward's building block. The eight in-place
    steps run on cache-sized pieces (in_pieces). Measured on config M's
    (8, 256, 1536), CPU time of one call: 7.7 ms as whole-array passes with
    exp (x / (1 + exp(-2u)), faster than tanh in older NumPy), 5.9 ms in
    pieces (of 2^16) with NumPy 2's vectorised tanh.
    """
    s, out = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)  # C order: in_pieces writes them flat
    in_pieces(_gelu_piece, x, s, out)
    return out, GeluCache(x, s)


def _gelu_grad_piece(dout, x, s, d):
    """d = dout * (s + x * 2 s (1 - s) u') on one piece (see gelu_backward)."""
    np.multiply(x, x, out=d)
    d *= 6.0 * GELU_K * GELU_A
    d += 2.0 * GELU_K  # 2u'
    d *= x
    d *= s
    d *= 1.0 - s  # a piece-sized temporary
    d += s  # d gelu/dx
    d *= dout


def gelu_backward(dout, cache):
    """With s = sigmoid(2u) and u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2):

        d gelu/dx = s + x * ds/dx = s + x * 2 s (1 - s) u'

    In cache-sized pieces, as the forward: on M 8.2 ms -> 5.5 ms of CPU per call (pieces of 2^16).
    """
    x, s = cache
    d = np.empty(x.shape, x.dtype)  # C order: in_pieces writes it flat
    in_pieces(_gelu_grad_piece, dout, x, s, d)
    return (d,)


# --------------------------------------------------------------- dropout
class DropoutCache(NamedTuple):
    mask: Optional[np.ndarray]  # (...) 0 or 1/(1-p) per element; None when p == 0


def dropout_mask(shape, p, rng, dtype):
    """Inverted dropout's mask: 1/(1-p) with probability 1-p, else 0 (so E[mask] = 1)."""
    keep = rng.random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * (1.0 / (1.0 - p))


def dropout_forward(x, p=0.0, rng=None, mask=None):
    """out = x * mask. `mask` given: use it (gradient checks fix it); else draw one
    from `rng` when p > 0; p == 0 or no rng (evaluation): the identity."""
    if mask is None and p > 0.0 and rng is not None:
        mask = dropout_mask(x.shape, p, rng, x.dtype)
    if mask is None:
        return x, DropoutCache(None)
    return x * mask, DropoutCache(mask)


def dropout_backward(dout, cache):
    """dx = dout * mask; without a mask the identity, which returns `dout` itself (no copy)."""
    return (dout if cache.mask is None else dout * cache.mask,)


# --------------------------------------------------------------- softmax
def softmax(x, axis=-1, out=None):
    """exp(x - max) / sum(exp(x - max)): subtracting the row max changes nothing
    mathematically and keeps exp from overflowing (logits of 1e4 are fine).
    `out=x` computes it in place.

    >>> softmax(np.array([1e4, 1e4]))
    array([0.5, 0.5])
    """
    e = np.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e
