"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al., 2021).

    out = x @ w + b  +  s * (drop(x) @ A) @ B,     s = alpha / r

w (C_in, N) and b (N,) are the base model's and stay frozen; A (C_in, r) and
B (r, N) are the only trainable weights, r << min(C_in, N). B starts at zero,
so at initialisation the model computes exactly what its base computes.
After training, `merge` folds the update into the weight, w' = w + s A B,
and the model is again a plain GPT-2 with no extra cost per token.

In the model, LoRA is a linear part (tinygen.parts): `lora_linear(spec, base)`
computes the layer below on the target projections and leaves the others to
the `base` part.

Names: the update of `h.0.attn.c_attn.weight` is stored as
`h.0.attn.c_attn.lora_A` (C_in, r) and `h.0.attn.c_attn.lora_B` (r, N), in
the same (in, out) orientation as GPT-2's Conv1D weights, so the code reads
x @ A @ B. Hugging Face PEFT stores torch Linear weights (out, in): its
`...c_attn.lora_A.weight` is our lora_A.T (r, C_in) and its
`...c_attn.lora_B.weight` is our lora_B.T (N, r) (tinygen.finetuning.peft
reads and writes that layout).

Shapes: C_in input width, N output width, r rank; x is (..., C_in).
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np

from ..config import POSITIVE, PROBABILITY, number, option, validate
from ..layers import dropout_mask
from ..parts import Part

TARGETS = ("c_attn", "c_proj", "c_fc")  # PEFT-style module names; "c_proj" means both attn.c_proj and mlp.c_proj


def subset_of(choices) -> Callable:
    """A check: a non-empty tuple of names among `choices`.

    >>> subset_of(TARGETS)(("c_fc",)), subset_of(TARGETS)(("q_proj",))
    (None, "a non-empty tuple of names among 'c_attn', 'c_proj', 'c_fc'")
    """
    def check(value):
        ok = isinstance(value, tuple) and value and all(v in choices for v in value)
        return None if ok else "a non-empty tuple of names among " + ", ".join(map(repr, choices))
    return check


@dataclass(frozen=True)
class LoraSpec:
    """LoRA's hyperparameters: rank r, alpha (the update is scaled by alpha / r),
    dropout on the update's input, and the target projections by name."""

    rank: int = option(8, "rank r of each update A B", POSITIVE)
    alpha: float = option(16.0, "the update is scaled by alpha / r", number(0.0, low_open=True))
    dropout: float = option(0.0, "dropout on the update's input", PROBABILITY)
    targets: tuple = option(("c_attn",), "the projections adapted, among c_attn, c_proj (both), c_fc",
                            subset_of(TARGETS))

    def __post_init__(self):
        if isinstance(self.targets, (str, list)):  # "c_fc" or ["c_fc"] -> ("c_fc",)
            object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        validate(self)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


def is_target(name: str, targets) -> bool:
    """Whether the projection NAME is one LoRA adapts: its last name part is a target.

    >>> is_target("h.0.mlp.c_proj", ("c_proj",)), is_target("h.0.mlp.c_fc", ("c_proj",))
    (True, False)
    """
    return name.rsplit(".", 1)[-1] in targets


def target_weights(params: dict, targets) -> list:
    """The base weight names LoRA adapts: "c_proj" -> every "h.{i}.*.c_proj.weight".

    >>> target_weights({"h.0.attn.c_attn.weight": 0, "h.0.mlp.c_fc.weight": 0}, ["c_attn"])
    ['h.0.attn.c_attn.weight']
    """
    return [k for k in params if k.startswith("h.") and k.endswith(".weight") and np.ndim(params[k]) < 3
            and is_target(k[: -len(".weight")], targets)]  # not a mixture's stacked (E, C_in, N) experts


def init_lora(params: dict, spec: LoraSpec, rng: np.random.Generator) -> dict:
    """New LoRA tensors for every target weight of `params` (which is not modified).

    A ~ N(0, 1/C_in), so x @ A has the scale of x (PEFT draws A Kaiming-uniform,
    of similar scale); B = 0, so the model starts exactly unchanged.
    """
    new = {}
    for name in target_weights(params, spec.targets):
        w = params[name]
        stem = name[: -len(".weight")]
        C_in, N = w.shape
        new[stem + ".lora_A"] = rng.normal(0.0, 1.0 / np.sqrt(C_in), (C_in, spec.rank)).astype(w.dtype)
        new[stem + ".lora_B"] = np.zeros((spec.rank, N), dtype=w.dtype)
    return new


class LoraCache(NamedTuple):
    x: np.ndarray  # (..., C_in) the input
    w: np.ndarray  # (C_in, N) frozen base weight
    xd: np.ndarray  # (..., C_in) the input after LoRA dropout (x itself when no dropout)
    mask: Optional[np.ndarray]  # (..., C_in) dropout mask, or None
    A: np.ndarray  # (C_in, r)
    B: np.ndarray  # (r, N)
    u: np.ndarray  # (M, r) xd @ A, flattened over leading dims
    scale: float  # alpha / r


def lora_linear_forward(x, w, b, A, B, scale=1.0, dropout=0.0, rng=None, mask=None):
    """out = x @ w + b + scale * (drop(x) @ A) @ B.

    x (..., C_in), w (C_in, N), b (N,) or None, A (C_in, r), B (r, N) -> out (..., N).
    The low-rank path costs 2 M r (C_in + N) flops against the base's 2 M C_in N.
    """
    if mask is None and dropout > 0.0 and rng is not None:
        mask = dropout_mask(x.shape, dropout, rng, x.dtype)
    xd = x if mask is None else x * mask
    x2 = x.reshape(-1, x.shape[-1])  # (M, C_in)
    out = x2 @ w  # (M, N)
    if b is not None:
        out += b
    u = xd.reshape(-1, x.shape[-1]) @ A  # (M, r)
    out += (u * scale) @ B  # (M, N)
    return out.reshape(*x.shape[:-1], w.shape[1]), LoraCache(x, w, xd, mask, A, B, u, scale)


def lora_linear_backward(dout, cache):
    """With u = drop(x) A and out = x w + b + s u B:

        dB = s u^T dout             du = s dout B^T   (M, r)
        dA = drop(x)^T du           dx = dout w^T + (du A^T) * mask
        dw = x^T dout,  db = sum(dout)    (as for any linear layer; unused when frozen)

    dout (..., N) -> dx (..., C_in), dw, db, dA (C_in, r), dB (r, N).
    """
    x, w, xd, mask, A, B, u, s = cache
    d2 = dout.reshape(-1, dout.shape[-1])  # (M, N)
    dB = (u * s).T @ d2  # (r, N)
    du = (d2 @ B.T) * s  # (M, r)
    dA = xd.reshape(-1, x.shape[-1]).T @ du  # (C_in, r)
    dxd = (du @ A.T).reshape(x.shape)  # (..., C_in)
    if mask is not None:
        dxd *= mask
    dx = (d2 @ w.T).reshape(x.shape) + dxd
    dw = x.reshape(-1, x.shape[-1]).T @ d2  # (C_in, N)
    db = d2.sum(axis=0)
    return dx, dw, db, dA, dB


# ------------------------------------------------------------------ the linear part
class LoraPartCache(NamedTuple):
    name: str  # the projection, "h.0.attn.c_attn"
    lora: Optional[LoraCache]  # on a target projection: the LoRA layer's cache, else None
    base: Optional[tuple]  # on any other projection: the base part's cache, else None


def lora_linear(spec: LoraSpec, base: Part) -> Part:
    """The linear part with LoRA: x @ W + b + s drop(x) @ A @ B on spec.targets, `base` on the rest.

    On a target NAME it reads NAME.weight, .bias, .lora_A, .lora_B and returns
    all four gradients (the frozen base's too: the optimizer skips them).
    """
    def forward(x, params, name, ctx):
        if not is_target(name, spec.targets):
            out, cache = base.forward(x, params, name, ctx)
            return out, LoraPartCache(name, None, cache)
        out, lora = lora_linear_forward(x, params[name + ".weight"], params[name + ".bias"], params[name + ".lora_A"],
                                        params[name + ".lora_B"], spec.scale, spec.dropout, ctx.rng)
        return out, LoraPartCache(name, lora, None)

    def backward(dout, cache):
        if cache.lora is None:
            return base.backward(dout, cache.base)
        dx, dw, db, dA, dB = lora_linear_backward(dout, cache.lora)
        n = cache.name
        return dx, {n + ".weight": dw, n + ".bias": db, n + ".lora_A": dA, n + ".lora_B": dB}

    return Part(forward, backward)


def merge(params: dict, spec: LoraSpec) -> dict:
    """A new params dict with every LoRA update folded in: w' = w + (alpha / r) A B.

    The LoRA keys are dropped, so the result is a plain GPT-2 checkpoint whose
    forward equals the unmerged model's (without dropout) to rounding.
    `params` itself is not modified.
    """
    merged = {k: v for k, v in params.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in params:
        if key.endswith(".lora_A"):
            stem = key[: -len(".lora_A")]
            A, B = params[stem + ".lora_A"], params[stem + ".lora_B"]
            w = params[stem + ".weight"]
            merged[stem + ".weight"] = (w + spec.scale * (A @ B)).astype(w.dtype)
    return merged


def count(params: dict) -> int:
    """Number of LoRA scalars in params: r (C_in + N) per adapted weight."""
    return sum(v.size for k, v in params.items() if k.endswith((".lora_A", ".lora_B")))
