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

Shapes: C width, m bottleneck width; h is (..., C).
"""
from typing import NamedTuple

import numpy as np

from ..layers import gelu_backward, gelu_forward, linear_backward, linear_forward

SITES = ("adapter_attn", "adapter_mlp")


def adapter_names(i: int, site: str) -> tuple:
    """The four parameter names of one adapter, in forward-argument order.

    >>> adapter_names(0, "adapter_mlp")[0]
    'h.0.adapter_mlp.down.weight'
    """
    h = f"h.{i}.{site}."
    return (h + "down.weight", h + "down.bias", h + "up.weight", h + "up.bias")


def init_adapters(n_layer: int, n_embd: int, bottleneck: int, rng: np.random.Generator, dtype=np.float32) -> dict:
    """Adapters for every block: down ~ N(0, 0.02), up = 0 and biases 0."""
    new = {}
    for i in range(n_layer):
        for site in SITES:
            dw, db, uw, ub = adapter_names(i, site)
            new[dw] = rng.normal(0.0, 0.02, (n_embd, bottleneck)).astype(dtype)
            new[db] = np.zeros(bottleneck, dtype=dtype)
            new[uw] = np.zeros((bottleneck, n_embd), dtype=dtype)
            new[ub] = np.zeros(n_embd, dtype=dtype)
    return new


class AdapterCache(NamedTuple):
    down: tuple  # LinearCache: h (..., C) -> (..., m)
    gelu: tuple  # GeluCache (..., m)
    up: tuple  # LinearCache: (..., m) -> (..., C)


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


def count(params: dict) -> int:
    """Number of adapter scalars in params."""
    return sum(v.size for k, v in params.items() if ".adapter_" in k)
