"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP inside each block.

    adapter(h) = h + gelu(h @ down + down_b) @ up + up_b        (..., C) -> (..., C)

with down (C, m) and up (m, C), bottleneck width m << C. A block gets two:
one on the attention branch's output (after attn.c_proj) and one on the MLP
branch's output (after mlp.c_proj), both before the branch joins the
residual stream. The up projection starts at zero, so each adapter starts
as the identity and the model computes exactly what its base computes.

Names: `h.{i}.adapter_attn.down.weight` (C, m), `.down.bias` (m,),
`.up.weight` (m, C), `.up.bias` (C,); likewise `h.{i}.adapter_mlp.*`.
Parameters per block: 2 (2 C m + m + C).

In the model, an adapter is the branch part (tinygen.parts): `ADAPTER`
replaces the identity that GPT-2 applies to each branch's output, and the
block calls it with the name "h.{i}.adapter_attn" / "h.{i}.adapter_mlp".

Shapes: C width, m bottleneck width; h is (..., C).
"""
from typing import NamedTuple

import numpy as np

from ..layers import GeluCache, LinearCache, gelu_backward, gelu_forward, linear_backward, linear_forward
from ..parts import Part

SITES = ("adapter_attn", "adapter_mlp")


def adapter_names(name: str) -> tuple:
    """The four parameter names of the adapter NAME, in forward-argument order.

    >>> adapter_names("h.0.adapter_mlp")[0]
    'h.0.adapter_mlp.down.weight'
    """
    return (name + ".down.weight", name + ".down.bias", name + ".up.weight", name + ".up.bias")


def init_adapters(n_layer: int, n_embd: int, bottleneck: int, rng: np.random.Generator, dtype=np.float32) -> dict:
    """Adapters for every block: down ~ N(0, 0.02), up = 0 and biases 0."""
    new = {}
    for i in range(n_layer):
        for site in SITES:
            dw, db, uw, ub = adapter_names(f"h.{i}.{site}")
            new[dw] = rng.normal(0.0, 0.02, (n_embd, bottleneck)).astype(dtype)
            new[db] = np.zeros(bottleneck, dtype=dtype)
            new[uw] = np.zeros((bottleneck, n_embd), dtype=dtype)
            new[ub] = np.zeros(n_embd, dtype=dtype)
    return new


class AdapterCache(NamedTuple):
    down: LinearCache  # h (..., C) -> (..., m)
    gelu: GeluCache  # (..., m)
    up: LinearCache  # (..., m) -> (..., C)


def adapter_forward(h, down_w, down_b, up_w, up_b):
    """out = h + gelu(h @ down_w + down_b) @ up_w + up_b.  h (..., C) -> out (..., C)."""
    z, down = linear_forward(h, down_w, down_b)  # (..., m)
    z, gelu = gelu_forward(z)
    z, up = linear_forward(z, up_w, up_b)  # (..., C)
    return h + z, AdapterCache(down, gelu, up)


def adapter_backward(dout, cache):
    """The skip connection passes dout through; the bottleneck adds its part:

        dh = dout + (gelu'(z) * (dout @ up_w^T)) @ down_w^T

    dout (..., C) -> dh (..., C), d down_w (C, m), d down_b (m,), d up_w (m, C), d up_b (C,).
    """
    dz, dup_w, dup_b = linear_backward(dout, cache.up)
    (dz,) = gelu_backward(dz, cache.gelu)
    dh, ddown_w, ddown_b = linear_backward(dz, cache.down)
    dh += dout  # skip connection
    return dh, ddown_w, ddown_b, dup_w, dup_b


# ------------------------------------------------------------------ the branch part
class AdapterPartCache(NamedTuple):
    name: str  # "h.0.adapter_attn": the adapter's parameters are adapter_names(name)
    adapter: AdapterCache


def adapter_branch_forward(h, params, name, ctx):
    """The adapter NAME on a branch's output h (B,T,C) -> (B,T,C)."""
    out, adapter = adapter_forward(h, *(params[n] for n in adapter_names(name)))
    return out, AdapterPartCache(name, adapter)


def adapter_branch_backward(dout, cache):
    """adapter_backward, the gradients under their parameter names."""
    dh, *grads = adapter_backward(dout, cache.adapter)
    return dh, dict(zip(adapter_names(cache.name), grads))


ADAPTER = Part(adapter_branch_forward, adapter_branch_backward)


def count(params: dict) -> int:
    """Number of adapter scalars in params."""
    return sum(v.size for k, v in params.items() if ".adapter_" in k)
