"""A mixture of experts (GLaM's top-2 gating): a router and E GPT-2 MLPs in place of one MLP.

    z      = x @ router.weight + router.bias                    (N, E)  router logits
    p      = softmax(z)                                         (N, E)  router probabilities
    top    = the k experts of largest p, per token              (N, k)  a tie goes to the lower index
    gate   = p[top] / sum(p[top])                               (N, k)  renormalised: each row sums to 1
    keep   = each expert takes at most `capacity` assignments   (N, k)  bool; all True without a capacity
    y[n]   = sum_j keep[n, j] gate[n, j] expert_{top[n, j]}(x[n])    (N, C)
    expert_e(u) = gelu(u @ c_fc.weight[e] + c_fc.bias[e]) @ c_proj.weight[e] + c_proj.bias[e]
    aux    = E * sum_e f_e P_e                                  the load-balancing loss (a float)

Each token runs through k of the E experts, so a layer holds E MLPs' worth of
parameters but computes (about) k MLPs per token: GLaM's "large model, few
active parameters". The experts' weights are stacked in one tensor per name:

    router.weight          (C, E)        router.bias          (E,)
    experts.c_fc.weight    (E, C, 4C)    experts.c_fc.bias    (E, 4C)
    experts.c_proj.weight  (E, 4C, C)    experts.c_proj.bias  (E, C)

(in a model: "h.{i}.mlp.router.weight", "h.{i}.mlp.experts.c_fc.weight", ...;
expert e's slice [e] is shaped exactly as GPT-2's "h.{i}.mlp.c_fc.weight").

Routing rules, stated exactly:
- Assignments. Token n's j-th choice (j = 0 .. k-1, best first) is the
  assignment (j, n). A token never picks one expert twice.
- Capacity (GShard). With `capacity_factor` cf, each expert accepts at most
  capacity = ceil(cf * N * k / E) assignments, in priority order: every
  token's first choice before any second choice, and within one rank earlier
  tokens (row-major over (B, T)) first. An assignment past its expert's
  capacity is dropped: it adds nothing to y[n] (the block's residual carries
  the token past the layer), and its gate is not renormalised away.
- The load f_e = (assignments to expert e, before capacity) / (N k): the
  share of the router's top-k choices that went to e (sum_e f_e = 1). This is
  Switch's f_e, counted over all k choices as GLaM's top-2 routes them. P_e =
  mean_n p[n, e]. aux = E * sum_e f_e P_e is 1 when routing is uniform, and
  at most E (everything on one expert). f_e is piecewise constant in the
  parameters, so aux's gradient flows through P_e only.

`moe_forward(x, *weights, top_k, capacity_factor) -> (y, MoECache)` and
`moe_backward(dy, cache, daux) -> (dx, *dweights)`, where daux is the weight
of aux in the loss being differentiated (aux_loss_coef times the loss scale):
the backward adds aux's gradient itself. docs/moe.md derives the backward.
`moe_mlp_forward` / `moe_mlp_backward`, at the end, make the layer the MLP
part of a model with experts (tinygen.parts.EXPERT_MLP).

Shapes: B batch, T time, C width, N = B*T tokens, E experts, k experts per
token (top_k), F = 4C the experts' hidden width, M_e assignments kept by e.
"""
import math
from typing import NamedTuple, Optional

import numpy as np

from .errors import TinygenError
from .layers import gelu_backward, gelu_forward, linear_backward, linear_forward, softmax

ROUTER = ("router.weight", "router.bias")
EXPERTS = ("experts.c_fc.weight", "experts.c_fc.bias", "experts.c_proj.weight", "experts.c_proj.bias")
NAMES = ROUTER + EXPERTS  # the order of moe_forward's weights and moe_backward's gradients


def moe_shapes(n_embd: int, n_expert: int) -> dict:
    """The layer's parameter names (under its prefix, e.g. "h.1.mlp.") and shapes.

    >>> moe_shapes(4, 3)["experts.c_fc.weight"]
    (3, 4, 16)
    """
    C, E = n_embd, n_expert
    return {"router.weight": (C, E), "router.bias": (E,),
            "experts.c_fc.weight": (E, C, 4 * C), "experts.c_fc.bias": (E, 4 * C),
            "experts.c_proj.weight": (E, 4 * C, C), "experts.c_proj.bias": (E, C)}


def active_params(params: dict, top_k: int) -> int:
    """Parameters a token uses: all of them, except that of each block's E experts it runs k.

    Expert tensors ("...experts.*", leading axis E) count k/E of their size; everything
    else (embeddings, attention, dense MLPs, routers) counts whole.
    >>> active_params({"wte.weight": np.zeros((5, 2)), "h.1.mlp.experts.c_fc.bias": np.zeros((4, 8))}, 1)
    18
    """
    total = 0
    for name, p in params.items():
        total += p.size * top_k // p.shape[0] if ".experts." in name else p.size
    return total


def expert_capacity(n_tokens: int, top_k: int, n_expert: int, capacity_factor: Optional[float]) -> Optional[int]:
    """ceil(capacity_factor * N * k / E) assignments per expert; None (no limit) without a factor.

    >>> expert_capacity(10, 2, 4, 1.0), expert_capacity(10, 2, 4, None)
    (5, None)
    """
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * n_tokens * top_k / n_expert)


# ------------------------------------------------------------------ routing
def top_experts(probs, top_k):
    """The top_k experts of each row, best first; equal probabilities go to the lower index.

    probs (N, E) -> (N, k) ints.
    >>> top_experts(np.array([[0.1, 0.5, 0.1, 0.3]]), 3)
    array([[1, 3, 0]])
    """
    return np.argsort(-probs, axis=1, kind="stable")[:, :top_k]


def routing_margin(logits, top_k, ordered=False) -> float:
    """The smallest gap, over tokens, between the k-th and the (k+1)-th largest router logit.

    Routing is constant while every input moves by less than this can close;
    gradient checks draw inputs with a margin well above their step (docs/moe.md).
    ordered: with a capacity the order of a token's k choices matters too (first
    choices are served first), so the gaps between the k+1 largest logits all count.
    inf when no gap counts (k == E, unordered).
    logits (..., E) -> float.
    >>> routing_margin(np.array([[3.0, 1.0, 0.5]]), 1), routing_margin(np.array([[3.0, 2.5, 0.5]]), 2, ordered=True)
    (2.0, 0.5)
    """
    z = np.sort(logits.reshape(-1, logits.shape[-1]), axis=1)[:, ::-1]  # (N, E) descending
    first, last = (0 if ordered else top_k - 1), min(top_k, z.shape[1] - 1)
    gaps = z[:, first:last] - z[:, first + 1:last + 1]  # (N, <= k): z_(j) - z_(j+1) for the j that matter
    return float(gaps.min()) if gaps.size else math.inf


def dispatch(top, n_expert, capacity):
    """Group the assignments by expert in priority order, and apply the capacity.

    top (N, k) -> (order (kN,), starts (E,), counts (E,), kept (E,), keep (N, k) bool).
    Assignment a = j * N + n is token n's j-th choice, so sorting by a puts all
    first choices before second choices; `order` lists the assignments grouped
    by expert (a stable sort keeps that priority inside each group), expert e's
    group being order[starts[e] : starts[e] + counts[e]], of which the first
    kept[e] = min(counts[e], capacity) are accepted.
    >>> dispatch(np.array([[0, 1], [0, 1], [0, 2]]), 3, 2)[1:4]
    (array([0, 3, 5]), array([3, 2, 1]), array([2, 2, 1]))
    """
    N, k = top.shape
    expert = top.T.reshape(-1)  # (kN,) the expert of assignment a = j*N + n
    order = np.argsort(expert, kind="stable")  # (kN,)
    counts = np.bincount(expert, minlength=n_expert)  # (E,)
    starts = np.cumsum(counts) - counts  # (E,)
    kept = counts if capacity is None else np.minimum(counts, capacity)
    rank = np.arange(k * N) - np.repeat(starts, counts)  # (kN,) place of order[i] in its expert's queue
    keep = np.empty(k * N, dtype=bool)
    keep[order] = rank < (kept[expert[order]])
    return order, starts, counts, kept, keep.reshape(k, N).T


# ------------------------------------------------------------------ the load-balancing loss
def load_balancing_loss(probs, counts):
    """aux = E * sum_e f_e P_e, f_e = counts[e] / sum(counts), P_e = mean over tokens of probs[:, e].

    probs (N, E), counts (E,) assignments per expert (before capacity) -> (aux float, f (E,)).
    >>> load_balancing_loss(np.full((4, 2), 0.5), np.array([4, 4]))[0]
    1.0
    """
    E = probs.shape[1]
    f = (counts / counts.sum()).astype(probs.dtype)  # (E,)
    P = probs.mean(axis=0, dtype=np.float64)  # (E,)
    return float(E * np.dot(f, P)), f


def load_balancing_backward(daux, f, n_tokens, dtype):
    """d aux / d probs[n, e] = E f_e / N for every token n (f_e held constant): (E,) to broadcast."""
    E = f.shape[0]
    return (daux * E / n_tokens * f).astype(dtype)


# ------------------------------------------------------------------ the layer
class ExpertCache(NamedTuple):  # an idle expert (M_e = 0) has only its empty slots
    slots: np.ndarray  # (M_e,) the kept assignments a = j*N + n this expert computed, in priority order
    fc: tuple  # LinearCache: x rows (M_e, C) -> (M_e, F)
    gelu: tuple  # GeluCache (M_e, F)
    proj: tuple  # LinearCache: (M_e, F) -> out (M_e, C)
    out: np.ndarray  # (M_e, C) the expert's outputs, before the gates


class MoECache(NamedTuple):
    shape: tuple  # x.shape, (..., C)
    router: tuple  # LinearCache: x (N, C) -> z (N, E)
    probs: np.ndarray  # (N, E) p = softmax(z)
    top: np.ndarray  # (N, k) chosen experts, best first
    gates: np.ndarray  # (N, k) p[top] / picked_sum
    picked_sum: np.ndarray  # (N, 1) sum of p[top]
    keep: np.ndarray  # (N, k) bool: assignment within its expert's capacity
    experts: list  # ExpertCache per expert, E of them
    weights: tuple  # (fc_w, fc_b, proj_w, proj_b) to shape the gradients
    load: np.ndarray  # (E,) f_e, the share of the top-k assignments routed to e (before capacity)
    aux: float  # E * sum_e f_e P_e
    dropped: float  # share of the N k assignments dropped by the capacity


def moe_forward(x, router_w, router_b, fc_w, fc_b, proj_w, proj_b, top_k=2, capacity_factor=None):
    """y = sum_j keep gate_j expert_{top_j}(x), token by token.  x (..., C) -> y (..., C).

    router_w (C, E), router_b (E,), fc_w (E, C, F), fc_b (E, F), proj_w (E, F, C),
    proj_b (E, C). top_k: experts per token (1 <= k <= E). capacity_factor:
    None (no limit) or > 0. cache.aux is the load-balancing loss, cache.load
    the share of assignments per expert, cache.dropped the share dropped.
    """
    C, E = router_w.shape
    if not 1 <= top_k <= E:
        raise TinygenError(f"top_k must be in [1, {E}] (the number of experts), got {top_k}")
    if x.shape[-1] != C:
        raise TinygenError(f"x has width {x.shape[-1]}, the router expects {C}")
    xf = x.reshape(-1, C)  # (N, C)
    N = xf.shape[0]
    z, router = linear_forward(xf, router_w, router_b)  # (N, E)
    probs = softmax(z, out=z)  # (N, E), z is not needed again
    top = top_experts(probs, top_k)  # (N, k)
    picked = np.take_along_axis(probs, top, axis=1)  # (N, k)
    picked_sum = picked.sum(axis=1, keepdims=True)  # (N, 1)
    gates = picked / picked_sum  # (N, k), rows sum to 1
    capacity = expert_capacity(N, top_k, E, capacity_factor)
    order, starts, counts, kept, keep = dispatch(top, E, capacity)
    gate_of = gates.T.reshape(-1)  # (kN,) the gate of assignment a = j*N + n
    y = np.zeros_like(xf)  # (N, C)
    experts = []
    for e in range(E):
        slots = order[starts[e]:starts[e] + kept[e]]  # (M_e,)
        if not slots.size:  # an idle expert (decoding one token at a time leaves most idle)
            experts.append(ExpertCache(slots, None, None, None, None))
            continue
        rows = slots % N  # (M_e,) the tokens: distinct, a token picks an expert at most once
        h, fc = linear_forward(xf[rows], fc_w[e], fc_b[e])  # (M_e, F)
        h, gelu = gelu_forward(h)
        out, proj = linear_forward(h, proj_w[e], proj_b[e])  # (M_e, C)
        y[rows] += gate_of[slots, None] * out  # rows are distinct, so this fancy += adds each once
        experts.append(ExpertCache(slots, fc, gelu, proj, out))
    aux, load = load_balancing_loss(probs, counts)
    dropped = 1.0 - float(kept.sum()) / (N * top_k)
    cache = MoECache(x.shape, router, probs, top, gates, picked_sum, keep, experts, (fc_w, fc_b, proj_w, proj_b),
                     load, aux, dropped)
    return y.reshape(x.shape), cache


def moe_backward(dout, cache: MoECache, daux=0.0):
    """dout (..., C) -> (dx (..., C), drouter_w, drouter_b, dfc_w, dfc_b, dproj_w, dproj_b).

    daux: the loss's weight on cache.aux (aux's own gradient is added here).
    Per kept assignment (j, n) on expert e, with out = expert_e(x[n]):
        d out            = gate[n, j] dy[n]           -> the expert's own backward, dx[n] +=
        d gate[n, j]     = dy[n] . out                (0 for a dropped assignment)
    then the renormalisation gate_j = picked_j / S, S = sum_j picked_j:
        d picked_j       = (d gate_j - sum_i d gate_i gate_i) / S
    scattered into d p[n, top[n, j]], plus aux's d p[n, e] = daux E f_e / N;
    the softmax: d z = p (d p - sum_e d p_e p_e); the router: a linear layer.
    Reads router, probs, top, gates, picked_sum, experts, weights and load; a
    dropped assignment is in no expert's slots, so keep itself is not needed.
    """
    C, E = cache.router.w.shape
    fc_w, fc_b, proj_w, proj_b = cache.weights
    dy = dout.reshape(-1, C)  # (N, C)
    N, k = cache.gates.shape
    xf = cache.router.x  # (N, C)
    gate_of = cache.gates.T.reshape(-1)  # (kN,)
    dgate_of = np.zeros(k * N, dtype=dy.dtype)  # (kN,) stays 0 for dropped assignments
    dx = np.zeros_like(xf)  # (N, C)
    dfc_w, dfc_b = np.empty_like(fc_w), np.empty_like(fc_b)  # every slice [e] is written below
    dproj_w, dproj_b = np.empty_like(proj_w), np.empty_like(proj_b)
    for e, ex in enumerate(cache.experts):
        if ex.slots.size == 0:  # an idle expert: its gradients are 0
            dfc_w[e], dfc_b[e], dproj_w[e], dproj_b[e] = 0.0, 0.0, 0.0, 0.0
            continue
        rows = ex.slots % N  # (M_e,) distinct tokens
        dy_rows = dy[rows]  # (M_e, C)
        dgate_of[ex.slots] = np.einsum("mc,mc->m", dy_rows, ex.out)
        dh, dproj_w[e], dproj_b[e] = linear_backward(gate_of[ex.slots, None] * dy_rows, ex.proj)  # (M_e, F)
        (dh,) = gelu_backward(dh, ex.gelu)
        dxe, dfc_w[e], dfc_b[e] = linear_backward(dh, ex.fc)  # (M_e, C)
        dx[rows] += dxe  # a token reaches each expert at most once: distinct rows
    dgates = dgate_of.reshape(k, N).T  # (N, k)
    dpicked = (dgates - np.sum(dgates * cache.gates, axis=1, keepdims=True)) / cache.picked_sum  # (N, k)
    dprobs = np.zeros_like(cache.probs)  # (N, E)
    np.put_along_axis(dprobs, cache.top, dpicked, axis=1)  # the k columns of a row are distinct
    if daux:
        dprobs += load_balancing_backward(float(daux), cache.load, N, dprobs.dtype)  # (E,) broadcast over rows
    dz = cache.probs * (dprobs - np.sum(dprobs * cache.probs, axis=1, keepdims=True))  # (N, E) softmax
    dxr, drouter_w, drouter_b = linear_backward(dz, cache.router)
    dx += dxr  # x feeds both the router and the experts
    return dx.reshape(cache.shape), drouter_w, drouter_b, dfc_w, dfc_b, dproj_w, dproj_b


# ------------------------------------------------------------------ the MLP part of a model with experts
class DenseMlpCache(NamedTuple):
    part: tuple  # the dense MLP part that ran (a block without a router)
    cache: tuple  # its cache


class ExpertMlpCache(NamedTuple):
    name: str  # "h.{i}.mlp": the parameters are NAME.router.weight, NAME.experts.c_fc.weight, ...
    layer: MoECache
    daux: float  # aux_loss_coef * ctx.aux_scale: the weight of this block's aux in the differentiated loss


def moe_mlp_forward(x, params, name, ctx, dense):
    """The MLP part of a model with experts (a tinygen.parts.Part with `dense` bound).

    x (B,T,C) -> (B,T,C). A block with a router (NAME.router.weight in params) runs
    moe_forward; a block without one runs `dense`, GPT-2's MLP part.
    A training forward (ctx.rng given, as for dropout) applies the capacity and
    appends (NAME.aux, aux_loss_coef * aux) to ctx.aux; evaluation and decoding
    route every token and measure the language-model loss alone (docs/moe.md: the
    capacity depends on the rest of the batch, so it has no place at inference).
    ctx.stats receives "expert_load" (each expert's share of the assignments) and
    "expert_dropped" (the share the capacity dropped), by block ("h.{i}").
    """
    if name + ".router.weight" not in params:
        out, cache = dense.forward(x, params, name, ctx)
        return out, DenseMlpCache(dense, cache)
    config, training = ctx.config, ctx.rng is not None
    y, layer = moe_forward(x, *(params[f"{name}.{n}"] for n in NAMES), top_k=config.expert_top_k,
                           capacity_factor=config.capacity_factor if training else None)
    if training and ctx.aux is not None:
        ctx.aux.append((name + ".aux", config.aux_loss_coef * layer.aux))
    if ctx.stats is not None:
        block = name.rsplit(".", 1)[0]  # "h.3.mlp" -> "h.3"
        ctx.stats.setdefault("expert_load", {})[block] = layer.load.tolist()
        ctx.stats.setdefault("expert_dropped", {})[block] = layer.dropped
    daux = config.aux_loss_coef * ctx.aux_scale if training else 0.0
    return y, ExpertMlpCache(name, layer, daux)


def moe_mlp_backward(dout, cache):
    """dout (B,T,C) -> (dx (B,T,C), {parameter name: gradient}); an expert block's
    gradients include its load-balancing loss's, weighted by cache.daux."""
    if isinstance(cache, DenseMlpCache):
        return cache.part.backward(dout, cache.cache)
    dx, *grads = moe_backward(dout, cache.layer, cache.daux)
    return dx, {f"{cache.name}.{n}": g for n, g in zip(NAMES, grads)}
