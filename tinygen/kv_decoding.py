"""Inference-only fast path: one new token per row through the whole model.

`GPT.forward(ids, kv=cache)` is written for learning and for training: every
layer returns the cache its backward pass needs and every call checks its
input. When decoding one token at a time at batch 1 the arithmetic is tiny
(about 2 MFLOP on config S), so those Python-level costs dominate. This module
does the same arithmetic with no backward caches, no checks and in-place
elementwise operations, for the single position `kv.length`:

    x      = wte[ids] + wpe[n]                                   (B, C)
    for each block:
        q, k, v = split(ln_1(x) @ c_attn)                        (B, H, 1, D)
        K[:, :, n], V[:, :, n] = k, v          (the cache grows by one row)
        x += softmax(q K[:n+1]^T / sqrt(D)) V[:n+1] @ c_proj     (B, C)
        x += gelu(ln_2(x) @ c_fc) @ mlp.c_proj                   (B, C)
             (a block with experts: x += moe_forward(ln_2(x), ...)   tinygen.moe, no capacity)
    logits = ln_f(x) @ wte^T                                     (B, V)

No mask is needed: the one query may see every cached key. The operations
are the ones of tinygen.layers and tinygen.attention in the same order, so the
logits equal GPT.forward's to float rounding (tests/test_sampling.py checks).
It knows GPT-2 and GPT-2 with experts (parts_for's two rows) only: a model
whose parts are not its config's own (LoRA, adapters, prompt tuning, any
custom part) takes GPT.forward(..., kv=) for the step instead, which calls
its parts.

`Decoder` wraps the cache for generation and beam search: prefill, one step
per token, the sliding window past block_size, and reordering rows for beams.

Shapes: B batch, C n_embd, H n_head, D head width, V vocabulary, n position.
"""
import math
import numbers

import numpy as np

from .errors import TinygenError
from .config import LAYER_NORM_EPS
from .layers import GELU_A, GELU_K
from .model import KVCache
from .moe import NAMES as EXPERT_KEYS, moe_forward
from .parts import EXPERT_MLP, GPT2


def _layernorm(x, w, b):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis, as layers.layernorm_forward.

    np.add.reduce then a division is what np.mean computes, without its
    Python-level wrapper (which costs more than the arithmetic at C = 128)."""
    C = x.shape[-1]
    mean = np.add.reduce(x, axis=-1, keepdims=True)  # (B, 1)
    mean /= C
    xc = x - mean  # (B, C)
    var = np.add.reduce(xc * xc, axis=-1, keepdims=True)  # (B, 1)
    var /= C
    var += LAYER_NORM_EPS
    xc *= 1.0 / np.sqrt(var)
    xc *= w
    xc += b
    return xc


def _gelu_(m):
    """GPT-2's tanh GELU, 0.5 m (1 + tanh(u)), overwriting m (B, 4C); the steps of layers.gelu_forward."""
    s = m * m
    s *= GELU_K * GELU_A
    s += GELU_K
    s *= m  # u = K (m + A m^3)
    np.tanh(s, out=s)
    s *= 0.5
    s += 0.5  # 0.5 (1 + tanh(u))
    m *= s
    return m


LAYER_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias")  # a block with experts: mlp.router.*, mlp.experts.* instead
FAST_PARTS = (GPT2, GPT2._replace(mlp=EXPERT_MLP))  # parts_for's rows: what decode_step computes


def layer_weights(params, config):
    """Per layer, the 12 arrays decode_step reads, in LAYER_KEYS order (views, no copies);
    a block with experts has the router's and experts' 6 (moe.NAMES) in place of the MLP's 4.

    Gains and biases are viewed as (1, N): at batch 1 an elementwise operation
    between two (1, N) arrays skips NumPy's broadcasting machinery.
    """
    def view(a):
        return a.reshape(1, -1) if a.ndim == 1 else a

    def block(i):
        attn = tuple(view(params[f"h.{i}.{k}"]) for k in LAYER_KEYS[:8])
        if f"h.{i}.mlp.router.weight" in params:
            return attn + tuple(params[f"h.{i}.mlp.{k}"] for k in EXPERT_KEYS)
        return attn + tuple(view(params[f"h.{i}.{k}"]) for k in LAYER_KEYS[8:])

    return [block(i) for i in range(config.n_layer)]


def decode_step(params, config, ids, kv, weights=None):
    """Logits for one new token per row; appends its keys and values to `kv`.

    ids (B,) ints, the tokens at position n = kv.length; kv a model.KVCache
    with n < block_size. Returns logits (B, V) and advances kv.length by one.
    weights: layer_weights(params, config), to skip rebuilding it each call.
    Inputs are trusted (sampling.generate checks them once).
    """
    n = kv.length
    B = ids.shape[0]
    H, C = config.n_head, config.n_embd
    D = C // H
    scale = 1.0 / math.sqrt(D)
    x = params["wte.weight"][ids]  # (B, C), a fresh copy (fancy indexing)
    x += params["wpe.weight"][n]
    for i, (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, *mlp) in \
            enumerate(weights or layer_weights(params, config)):
        qkv = _layernorm(x, ln1_w, ln1_b) @ attn_w  # (B, 3C)
        qkv += attn_b
        q = qkv[:, :C].reshape(B, H, 1, D)
        k_buf, v_buf = kv.k[i], kv.v[i]  # (B, H, T_max, D) views, no copy
        k_buf[:, :, n] = qkv[:, C:2 * C].reshape(B, H, D)
        v_buf[:, :, n] = qkv[:, 2 * C:].reshape(B, H, D)
        s = q @ k_buf[:, :, :n + 1].swapaxes(-1, -2)  # (B, H, 1, n+1)
        s *= scale
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        a = (s @ v_buf[:, :, :n + 1]).reshape(B, C) @ proj_w  # (B, H, 1, D) -> (B, C) -> (B, C)
        a += proj_b
        x += a
        if len(mlp) == len(EXPERT_KEYS):  # a block with experts: each row through its top-k
            x += moe_forward(_layernorm(x, ln2_w, ln2_b), *mlp, top_k=config.expert_top_k)[0]  # (B, C)
            continue
        fc_w, fc_b, mproj_w, mproj_b = mlp
        m = _layernorm(x, ln2_w, ln2_b) @ fc_w  # (B, 4C)
        m += fc_b
        m = _gelu_(m) @ mproj_w  # (B, C)
        m += mproj_b
        x += m
    x = _layernorm(x, params["ln_f.weight"], params["ln_f.bias"])
    kv.length = n + 1
    return x @ params["wte.weight"].T  # (B, V), the tied head


def check_window_keep(block_size, window_keep):
    """The number of tokens kept when the context slides (default block_size // 2).

    block_size here is the number of real tokens a window can hold."""
    keep = block_size // 2 if window_keep is None else window_keep
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or not 1 <= keep <= block_size:
        raise TinygenError(f"window_keep must be an integer in [1, block_size={block_size}], got {window_keep!r}")
    return int(keep)


class Decoder:
    """Next-token logits for B growing sequences: a KV cache plus the sliding window.

    The model sees ids[:, start:n]. While n - start <= block_size each call
    adds one position to the cache (decode_step). When the window would
    outgrow block_size, `start` jumps to n - window_keep and the cache is
    rebuilt from the kept tokens in one forward pass (cost amortised over the
    next block_size - window_keep tokens). With use_cache=False every call
    recomputes ids[:, start:n] from scratch: the same windows, so the same
    logits to float rounding.

        dec = Decoder(model, batch_size=2)
        logits = dec.next_logits(ids, n)     # ids (2, >= n) -> (2, V), predicts ids[:, n]
    """

    def __init__(self, model, batch_size, use_cache=True, window_keep=None):
        self.model = model
        # an embed part may prepend positions to every window (prompt tuning's virtual tokens)
        self.virtual = model.n_prefix
        self.block = model.config.block_size - self.virtual  # real tokens a window may hold
        self.keep = check_window_keep(self.block, window_keep)
        self.fast = model.parts in FAST_PARTS  # decode_step knows GPT-2's parts and the experts, no method's
        self.weights = layer_weights(model.params, model.config) if self.fast else None
        self.kv = KVCache(model.config, batch_size) if use_cache else None
        self.start = 0  # first position the model sees
        self.first = True  # before the first call: the prompt must fit as it is

    def next_logits(self, ids, n):
        """ids (B, >= n) ints, the sequences so far (first n columns) -> logits (B, V) for position n.

        Calls must come with n growing by one (the first call may start anywhere)."""
        if n - self.start > self.block:
            if self.first:
                virtual = f" ({self.virtual} of block_size are virtual prompt tokens)" if self.virtual else ""
                raise TinygenError(f"the prompt has {n} tokens, more than the {self.block} the model's context holds{virtual}")
            self.start = n - self.keep  # slide: drop the oldest tokens, rebuild from the rest
            if self.kv is not None:
                self.kv.length = 0
        self.first = False
        if self.kv is None:
            return self.model.forward(ids[:, self.start:n], workers=1)[:, -1]  # (B, V), from scratch; one
            # stream: generate already runs one Decoder per shard of rows
        if self.kv.length == 0:
            return self.model.forward(ids[:, self.start:n], kv=self.kv)[:, -1]  # prefill the window
        assert self.kv.length == self.virtual + n - 1 - self.start, "next_logits: n must grow by one per call"
        if not self.fast:  # other parts: the general path, one position
            return self.model.forward(ids[:, n - 1:n], kv=self.kv)[:, -1]
        return decode_step(self.model.params, self.model.config, ids[:, n - 1], self.kv, self.weights)

    def reorder(self, rows):
        """Row i of the batch continues former row rows[i] (beam search); permutes the cache."""
        if self.kv is not None and self.kv.length:
            end = self.kv.length
            self.kv.k[:, :, :, :end] = self.kv.k[:, rows, :, :end]  # (L, B, H, end, D), one gather
            self.kv.v[:, :, :, :end] = self.kv.v[:, rows, :, :end]
