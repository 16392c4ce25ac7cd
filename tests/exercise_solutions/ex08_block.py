"""Reference solution of exercise 8: the stub's forward, tinygen.model.block_backward's order."""
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
    g = {}
    dh, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = linear_backward(dout, cache.mlp_proj)
    (dh,) = gelu_backward(dh, cache.gelu)
    dh, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"] = linear_backward(dh, cache.c_fc)
    dh, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward(dh, cache.ln_2)
    da = dout + dh  # residual
    dy, g["attn.c_proj.weight"], g["attn.c_proj.bias"] = linear_backward(da, cache.c_proj)
    (dqkv,) = causal_attention_backward(dy, cache.attn)
    dh, g["attn.c_attn.weight"], g["attn.c_attn.bias"] = linear_backward(dqkv, cache.c_attn)
    dh, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward(dh, cache.ln_1)
    dx = da + dh  # residual
    return dx, g
