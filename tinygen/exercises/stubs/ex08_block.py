"""Exercise 8: a whole transformer block's backward pass.

    a = x + c_proj(attention(c_attn(ln_1(x))))          (B, T, C)    the attention branch
    out = a + mlp.c_proj(gelu(mlp.c_fc(ln_2(a))))        (B, T, C)    the MLP branch

block_forward is written for you, from your own exercises 1, 3, 4 and 6 (so
finish those first). Write block_backward: the same calls in reverse order,
each reading its own cache, and the two residual connections, where the
gradient flowing in is passed straight through AND gets the branch's
contribution added to it. Dropout is off.
Read first: docs/one-step.md, "The backward of a block". Check: tinygen exercises check DIR block
Shapes: B batch, T time, C width, H heads.
"""
from typing import NamedTuple

from ex01_linear import linear_backward, linear_forward  # noqa: F401 (your exercises)
from ex03_layernorm import layernorm_backward, layernorm_forward  # noqa: F401
from ex04_gelu import gelu_backward, gelu_forward  # noqa: F401
from ex06_attention import causal_attention_backward, causal_attention_forward  # noqa: F401

NAMES = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
         "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
         "mlp.c_proj.weight", "mlp.c_proj.bias")


class BlockCache(NamedTuple):
    ln_1: tuple  # your layer norm's cache, x -> (B, T, C)
    c_attn: tuple  # linear cache, (B, T, C) -> qkv (B, T, 3C)
    attn: tuple  # attention cache, qkv -> y (B, T, C)
    c_proj: tuple  # linear cache, y -> (B, T, C)
    ln_2: tuple  # layer norm cache, a -> (B, T, C)
    c_fc: tuple  # linear cache, (B, T, C) -> (B, T, 4C)
    gelu: tuple  # GELU cache, (B, T, 4C)
    mlp_proj: tuple  # linear cache, (B, T, 4C) -> (B, T, C)


def block_forward(x, p, n_head):
    """x (B, T, C), p: {name in NAMES: array} -> (out (B, T, C), BlockCache)."""
    h, ln_1 = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"])
    qkv, c_attn = linear_forward(h, p["attn.c_attn.weight"], p["attn.c_attn.bias"])  # (B, T, 3C)
    y, attn = causal_attention_forward(qkv, n_head)  # (B, T, C)
    y, c_proj = linear_forward(y, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    a = x + y  # residual
    h, ln_2 = layernorm_forward(a, p["ln_2.weight"], p["ln_2.bias"])
    h, c_fc = linear_forward(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])  # (B, T, 4C)
    h, gelu = gelu_forward(h)
    h, mlp_proj = linear_forward(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # (B, T, C)
    out = a + h  # residual
    return out, BlockCache(ln_1, c_attn, attn, c_proj, ln_2, c_fc, gelu, mlp_proj)


def block_backward(dout, cache):
    """dout (B, T, C) -> (dx (B, T, C), grads: {name in NAMES: gradient, same shape as p[name]}).

    Hints: start from the end: mlp_proj, gelu, c_fc, ln_2 give the MLP branch's
    gradient with respect to a; a also goes straight to out, so
    da = dout + (that). Then c_proj, attention, c_attn, ln_1 give the attention
    branch's part, and dx = da + (that). Your backward functions return tuples:
    `(dh,) = gelu_backward(dh, cache.gelu)`.
    """
    raise NotImplementedError
