"""A catalogue of classic backprop bugs, and a way to inject each one into tinygen.

Every bug here is one that people really write when they implement GPT-2 by
hand. `inject(name)` is a context manager that puts the bug into tinygen for
the duration of a `with` block, so that a learner can see which check catches
it (`tinygen gradcheck --break NAME`, tinygen.bug_checks) and someone who
tests their own code against tinygen can see their tests fail (mutation
testing, re-exported as tinygen.testing.inject_bug):

    with inject("gelu-erf"):
        logits = model.forward(idx)     # GELU's erf form instead of GPT-2's tanh form

How a bug gets in. Each bug replaces a few functions, always as module
attributes (layers.embedding_backward, attention.attend, model.gpt_backward,
...) or, for the optimizer, AdamW._update. A module that imported the same
function by name (`from .layers import gelu_forward` in parts.py, whose MLP
part calls it) holds its own reference, so `inject` replaces the function in
every loaded tinygen module that holds that same object under that name, and
puts every one back on exit. That reaches every path a model runs: the
parts (tinygen.parts, and the fine-tuning methods' parts in
tinygen.finetuning) are tuples of module-level functions that look their
layers up as module globals at each call, so a patched module attribute is
the one they call, with no cost and no indirection added to tinygen itself. The replacements wrap the original where the bug is a change of
its result (a missing factor, a dropped term) and rewrite it where the bug
is in the middle of the computation; every one is written out below, next
to the line a person would have written.

Each bug names the exercise of tinygen.exercises it belongs to and the
tensor that exercise reports when the bug is in a learner's code. The
inference fast path (tinygen.kv_decoding.decode_step) has its own inline
arithmetic and is never patched: the bugs live in the training path.
"""
import contextlib
import math
import sys
from typing import Callable, NamedTuple

import numpy as np

from . import attention, layers, loss, model, optim
from .errors import TinygenError


class Bug(NamedTuple):
    name: str  # short id: `tinygen gradcheck --break NAME`
    title: str  # one line: what is wrong
    code: str  # the buggy line, as a person writes it
    fix: str  # the correct line
    why: str  # what goes wrong, in a sentence or two
    exercise: str  # the exercise of tinygen.exercises it belongs to
    tensor: str  # the tensor that exercise reports as failing
    inject: Callable  # inject(patch): applies the bug through patch(owner, attribute, replacement)


# ---------------------------------------------------------------- the bugs
def _embedding_buffered(patch):
    def embedding_backward(dout, cache):
        ids, vocab_size = cache
        C = dout.shape[-1]
        dw = np.zeros((vocab_size, C), dtype=dout.dtype)
        dw[ids.reshape(-1)] += dout.reshape(-1, C)  # buffered: a repeated id keeps only its last row
        return (dw,)

    patch(layers, "embedding_backward", embedding_backward)


def _layernorm_no_projection(patch):
    def layernorm_backward(dout, cache):
        xhat, rstd, w = cache
        C = xhat.shape[-1]
        g = dout * w
        dx = (g - g.mean(axis=-1, keepdims=True)) * rstd  # the - xhat * mean(g * xhat) term is missing
        dw = np.einsum("mc,mc->c", dout.reshape(-1, C), xhat.reshape(-1, C))
        return dx, dw, dout.reshape(-1, C).sum(axis=0)

    patch(layers, "layernorm_backward", layernorm_backward)


def _attention_no_scale(patch):
    attend, attend_backward = attention.attend, attention.attend_backward

    def attend_unscaled(q, k, v, dropout_mask=None, causal=True):  # softmax(q k^T + mask): q * sqrt(D) cancels 1/sqrt(D)
        return attend(q * math.sqrt(q.shape[-1]), k, v, dropout_mask, causal)

    def attend_backward_unscaled(dy, q, k, v, att, dropout_mask=None):  # consistently without it: dq, dk sqrt(D) larger
        dq, dk, dv = attend_backward(dy, q, k, v, att, dropout_mask)
        s = math.sqrt(q.shape[-1])
        return dq * s, dk * s, dv

    patch(attention, "attend", attend_unscaled)
    patch(attention, "attend_backward", attend_backward_unscaled)


def _tied_head_missing(patch):
    gpt_backward = model.gpt_backward

    def without_head(dlogits, cache, free_activations=False, emit=None):
        g = gpt_backward(dlogits, cache, free_activations, emit)
        x = cache.head.x  # (B, T, C) the head's input, ln_f's output
        g["wte.weight"] -= dlogits.reshape(-1, dlogits.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (V, C)
        return g

    patch(model, "gpt_backward", without_head)


def _wpe_mean(patch):
    gpt_backward = model.gpt_backward

    def wpe_averaged(dlogits, cache, free_activations=False, emit=None):
        g = gpt_backward(dlogits, cache, free_activations, emit)
        g["wpe.weight"] /= dlogits.shape[0]  # dx.mean(axis=0) instead of dx.sum(axis=0)
        return g

    patch(model, "gpt_backward", wpe_averaged)


def _cross_entropy_no_mean(patch):
    cross_entropy_backward = loss.cross_entropy_backward

    def without_1_over_n(dloss, cache):
        (dlogits,) = cross_entropy_backward(dloss, cache)
        return (dlogits * cache.n,)  # p - onehot, not (p - onehot) / n

    patch(loss, "cross_entropy_backward", without_1_over_n)


def _softmax_no_max(patch):
    def softmax(x, axis=-1, out=None):
        e = np.exp(x, out=out)  # no row max subtracted: exp overflows past 88 in float32
        e /= e.sum(axis=axis, keepdims=True)
        return e

    patch(layers, "softmax", softmax)


def _causal_mask_off(patch):
    def causal_mask(Tq, Tk, dtype):
        return np.zeros((Tq, Tk), dtype=dtype)  # the -inf above the diagonal was never added

    patch(attention, "causal_mask", causal_mask)


_erf = np.frompyfunc(math.erf, 1, 1)


def _gelu_erf(patch):
    class GeluCache(NamedTuple):
        x: np.ndarray

    def gelu_forward(x):  # the exact GELU, x Phi(x), instead of GPT-2's tanh approximation
        return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))).astype(x.dtype), GeluCache(x)

    def gelu_backward(dout, cache):  # its exact derivative: Phi(x) + x phi(x)
        x = cache.x
        cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return ((cdf + x * pdf) * dout,)

    patch(layers, "gelu_forward", gelu_forward)
    patch(layers, "gelu_backward", gelu_backward)


def _dropout_no_rescale(patch):
    def dropout_mask(shape, p, rng, dtype):
        keep = rng.random(shape, dtype=np.float32) >= p
        return keep.astype(dtype)  # 0 or 1: the kept values are not scaled by 1/(1-p)

    patch(layers, "dropout_mask", dropout_mask)


class _NoBiasCorrection:
    """An AdamW seen with t = 10**9: beta ** t == 0, so both bias corrections are 1."""

    def __init__(self, opt):
        self._opt = opt
        self.t = 10**9

    def __getattr__(self, name):
        return getattr(self._opt, name)


def _adam_no_bias_correction(patch):
    update = optim.AdamW._update

    def _update(self, start, stop, lr, grad_scale=1.0):  # m / (sqrt(v) + eps), not mhat / (sqrt(vhat) + eps)
        update(_NoBiasCorrection(self), start, stop, lr, grad_scale)

    patch(optim.AdamW, "_update", _update)


def _linear_bias_mean(patch):
    linear_backward = layers.linear_backward

    def bias_averaged(dout, cache):
        dx, dw, db = linear_backward(dout, cache)
        return dx, dw, db / (dout.size // dout.shape[-1])  # dout.mean(axis=0) instead of dout.sum(axis=0)

    patch(layers, "linear_backward", bias_averaged)


BUGS = [
    Bug("linear-bias-mean", "the linear layer's bias gradient averaged over the rows, not summed",
        "db = dout.mean(axis=0)", "db = dout.sum(axis=0)",
        "b is added to every row, so each row's gradient adds up; the mean divides db by B*T.",
        "linear", "db", _linear_bias_mean),
    Bug("embedding-buffered", "the embedding backward with buffered fancy-index assignment",
        "dw[ids] += dout", "np.add.at(dw, ids, dout)",
        "NumPy evaluates dw[ids] + dout once and writes it back, so an id that appears twice keeps only its last row.",
        "embedding", "dw", _embedding_buffered),
    Bug("layernorm-no-projection", "layer norm's backward without the xhat * mean(g * xhat) term",
        "dx = rstd * (g - mean(g))", "dx = rstd * (g - mean(g) - xhat * mean(g * xhat))",
        "The variance depends on x too; forgetting it treats rstd as a constant.",
        "layernorm", "dx", _layernorm_no_projection),
    Bug("gelu-erf", "GELU's exact erf form instead of GPT-2's tanh approximation",
        "0.5 * x * (1 + erf(x / sqrt(2)))", "0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))",
        "A different function with a correct derivative: every gradient checks, the numbers are not GPT-2's.",
        "gelu", "out", _gelu_erf),
    Bug("dropout-no-rescale", "inverted dropout without the 1/(1-p)",
        "mask = keep", "mask = keep / (1 - p)",
        "Training sees activations (1-p) times smaller than evaluation does; forward and backward agree, so gradients check.",
        "dropout", "out", _dropout_no_rescale),
    Bug("attention-no-scale", "attention scores without the 1/sqrt(D)",
        "att = q @ k.T", "att = q @ k.T / sqrt(D)",
        "Left out of forward and backward alike, the gradients check; the scores are sqrt(D) too large, "
        "so the softmax saturates in wide heads.",
        "attention", "y", _attention_no_scale),
    Bug("softmax-no-max", "softmax without subtracting the row max",
        "e = exp(x)", "e = exp(x - x.max(axis=-1, keepdims=True))",
        "Mathematically the same, but exp overflows to inf past 88 in float32 and the row becomes NaN.",
        "attention", "softmax", _softmax_no_max),
    Bug("causal-mask-off", "the causal mask left off",
        "att = q @ k.T / sqrt(D)", "att = q @ k.T / sqrt(D) + mask   # -inf above the diagonal",
        "Every position sees the future. The backward is still the derivative of what the forward computes, "
        "so every gradient checks.",
        "attention", "y", _causal_mask_off),
    Bug("cross-entropy-no-mean", "cross-entropy's gradient without the 1/n",
        "dlogits = probs - onehot", "dlogits = (probs - onehot) / n",
        "The loss is a mean over n positions, so its gradient is divided by n too.",
        "cross_entropy", "dlogits", _cross_entropy_no_mean),
    Bug("wpe-grad-mean", "the position embedding's gradient averaged over the batch, not summed",
        "dwpe = dx.mean(axis=0)", "dwpe = dx.sum(axis=0)",
        "Every sequence of the batch uses the same wpe rows, so their gradients add up.",
        "embed_and_head", "dwpe", _wpe_mean),
    Bug("tied-head-missing", "the tied LM head's gradient never added to wte's",
        "dwte = embedding_backward(dx)", "dwte = embedding_backward(dx); dwte += dlogits.T @ ln_f_out",
        "wte is used twice, as the input embedding and as the LM head; its gradient is the sum of both uses.",
        "embed_and_head", "dwte", _tied_head_missing),
    Bug("adam-no-bias-correction", "Adam without bias correction",
        "p -= lr * m / (sqrt(v) + eps)", "p -= lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)",
        "m and v start at 0, so early steps are too small (0.45 lr instead of lr at step 1 with GPT-2's betas).",
        "adamw", "p", _adam_no_bias_correction),
]
BY_NAME = {b.name: b for b in BUGS}


def get(name) -> Bug:
    """The bug called `name`; a TinygenError lists the names otherwise."""
    if name not in BY_NAME:
        raise TinygenError(f"no bug called {name!r}; the catalogue has: {', '.join(BY_NAME)}")
    return BY_NAME[name]


# ---------------------------------------------------------------- injection
def _holders(owner, attribute, original):
    """`owner`, plus every loaded tinygen module that holds `original` under the same name."""
    holders = [owner]
    for name, module in list(sys.modules.items()):
        if (name == "tinygen" or name.startswith("tinygen.")) and module is not None and module is not owner:
            if getattr(module, attribute, None) is original:
                holders.append(module)
    return holders


@contextlib.contextmanager
def inject(*names):
    """Put the named bugs into tinygen inside the `with` block; everything is restored on exit.

        with inject("causal-mask-off"):
            GPT(config).forward(idx)      # every position sees the future
    """
    bugs = [get(n) for n in names]
    restore = []

    def patch(owner, attribute, replacement):
        original = getattr(owner, attribute)
        for holder in _holders(owner, attribute, original):
            restore.append((holder, attribute, original))
            setattr(holder, attribute, replacement)

    try:
        for bug in bugs:
            bug.inject(patch)
        yield bugs
    finally:
        for holder, attribute, original in reversed(restore):
            setattr(holder, attribute, original)
