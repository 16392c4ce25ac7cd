"""GPT-2: embeddings, n_layer pre-LN transformer blocks, final layer norm, tied LM head.

    x      = embed(idx) + wpe[pos]                            (B, T, C)
    for each block i:
        x  = x + branch(attention(ln_1(x)))                   (B, T, C)
        x  = x + branch(mlp(ln_2(x)))                         (B, T, C)
    logits = ln_f(x) @ wte^T                                  (B, T, V)

attention, mlp, branch and embed are the model's parts (tinygen.parts): for
GPT-2, attention is c_proj(causal_attention(c_attn(.))), mlp is
c_proj(gelu(c_fc(.))), branch is the identity and embed is wte[idx]. A
fine-tuning method or a new layer type passes other parts; this module
never asks which it got.

Parameters live in one flat dict named and shaped exactly as Hugging Face's
GPT-2 checkpoints ("h.0.attn.c_attn.weight" is (C, 3C), used as x @ w), so
the same keys index gradients, optimizer state and checkpoints.
`gpt_forward` / `gpt_backward` are the pure pair; tinygen.gpt.GPT holds
config, params and parts.

Shapes: B batch, T time, C n_embd, H n_head, D head width, V vocabulary,
L n_layer, T' = T + the positions the embed part prepends (prompt tuning).
"""
import math
from typing import NamedTuple, Optional

import numpy as np

from .config import GPTConfig
from .errors import TinygenError
from .layers import (
    DropoutCache,
    LayerNormCache,
    LinearCache,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from .moe import moe_shapes
from .parts import Context, LayerKV, Parts, parts_for


def param_shapes(config: GPTConfig) -> dict:
    """Every parameter's name and shape, in Hugging Face GPT-2 order."""
    V, T, C = config.vocab_size, config.block_size, config.n_embd
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for i in range(config.n_layer):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
        })
        if config.is_moe_block(i):  # a router and n_expert stacked MLPs (tinygen.moe, docs/moe.md)
            shapes.update({h + "mlp." + k: shape for k, shape in moe_shapes(C, config.n_expert).items()})
        else:
            shapes.update({h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
                           h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,)})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def init_params(config: GPTConfig, rng: np.random.Generator) -> dict:
    """GPT-2's initialisation: weights ~ N(0, 0.02), the two residual output
    projections scaled by 1/sqrt(2 L) (each block adds twice to the residual
    stream), biases 0, layer-norm gains 1."""
    dtype = config.np_dtype
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p = np.ones(shape)
        elif name.endswith(".bias"):
            p = np.zeros(shape)
        else:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            p = rng.normal(0.0, std, size=shape)
        params[name] = p.astype(dtype)
    return params


def check_params(params: dict, config: GPTConfig, what="parameters"):
    """Raise TinygenError unless `params` has exactly the model's names, shapes and dtype."""
    shapes = param_shapes(config)
    missing = [k for k in shapes if k not in params]
    if missing:
        raise TinygenError(f"{what}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise TinygenError(f"{what}: {name!r} has shape {tuple(params[name].shape)}, expected {shape}")


def check_ids(idx, config: GPTConfig, what="idx", allow_ignore=False):
    """Validate a (B, T) integer array of token ids; returns it as an ndarray."""
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TinygenError(f"{what} must be an integer array of token ids, got dtype {idx.dtype}")
    if idx.ndim != 2:
        raise TinygenError(f"{what} must have shape (B, T), got {idx.shape} (for one sequence use idx[None, :])")
    if idx.shape[1] > config.block_size:
        raise TinygenError(f"{what} has T={idx.shape[1]} positions, more than block_size={config.block_size}")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise TinygenError(f"{what} is empty (shape {idx.shape}): need at least one token")
    low = -1 if allow_ignore else 0
    bad = (idx < low) | (idx >= config.vocab_size)
    if bad.any():
        raise TinygenError(f"{what} holds id {idx[bad][0]}, outside the vocabulary [0, {config.vocab_size})")
    return idx


# ------------------------------------------------------------------ block
class BlockCache(NamedTuple):
    i: int  # the block's index: its parameters are "h.{i}.*"
    parts: Parts  # the parts the forward called (the backward calls the same)
    ln_1: LayerNormCache  # x (B,T,C)
    attn: tuple  # the attention part's cache: ln_1 out (B,T,C) -> (B,T,C)
    branch_attn: tuple  # the branch part's cache at "h.{i}.adapter_attn" (B,T,C) -> (B,T,C)
    drop_attn: DropoutCache  # (B,T,C)
    ln_2: LayerNormCache  # x + a (B,T,C)
    mlp: tuple  # the mlp part's cache: ln_2 out (B,T,C) -> (B,T,C)
    branch_mlp: tuple  # the branch part's cache at "h.{i}.adapter_mlp" (B,T,C) -> (B,T,C)
    drop_mlp: DropoutCache  # (B,T,C)


def block_forward(x, params, i, ctx: Context):
    """Pre-LN block i: x + drop(branch(attention(ln_1(x)))), then the same with mlp and ln_2.

    x (B,T,C) -> (B,T,C). The parts come from ctx.parts; names are "h.{i}.attn", ...
    """
    h, parts, p = f"h.{i}.", ctx.parts, ctx.config.dropout
    a, ln_1 = layernorm_forward(x, params[h + "ln_1.weight"], params[h + "ln_1.bias"])
    a, attn = parts.attention.forward(a, params, h + "attn", ctx)  # (B,T,C)
    a, branch_attn = parts.branch.forward(a, params, h + "adapter_attn", ctx)
    a, drop_attn = dropout_forward(a, p, ctx.rng)
    x = x + a  # residual
    m, ln_2 = layernorm_forward(x, params[h + "ln_2.weight"], params[h + "ln_2.bias"])
    m, mlp = parts.mlp.forward(m, params, h + "mlp", ctx)  # (B,T,C)
    m, branch_mlp = parts.branch.forward(m, params, h + "adapter_mlp", ctx)
    m, drop_mlp = dropout_forward(m, p, ctx.rng)
    x += m  # residual (x is this block's own array since the first add)
    return x, BlockCache(i, parts, ln_1, attn, branch_attn, drop_attn, ln_2, mlp, branch_mlp, drop_mlp)


def block_backward(dx, cache: BlockCache):
    """dx (B,T,C) -> (dx_in (B,T,C), grads of block i's parameters by name).

    The residual connections pass dx straight through; each branch adds its
    own contribution on top (the two `+=` below)."""
    h, parts = f"h.{cache.i}.", cache.parts
    (dm,) = dropout_backward(dx, cache.drop_mlp)
    dm, g_branch_mlp = parts.branch.backward(dm, cache.branch_mlp)
    dm, g_mlp = parts.mlp.backward(dm, cache.mlp)
    dm, d_ln_2_w, d_ln_2_b = layernorm_backward(dm, cache.ln_2)
    dx = dx + dm  # residual: x_mid feeds both the MLP branch and the output
    (da,) = dropout_backward(dx, cache.drop_attn)
    da, g_branch_attn = parts.branch.backward(da, cache.branch_attn)
    da, g_attn = parts.attention.backward(da, cache.attn)
    da, d_ln_1_w, d_ln_1_b = layernorm_backward(da, cache.ln_1)
    dx += da  # residual: x_in feeds both the attention branch and x_mid
    return dx, {h + "ln_1.weight": d_ln_1_w, h + "ln_1.bias": d_ln_1_b, **g_attn, **g_branch_attn,
                h + "ln_2.weight": d_ln_2_w, h + "ln_2.bias": d_ln_2_b, **g_mlp, **g_branch_mlp}


# ------------------------------------------------------------------ model
class GPTCache(NamedTuple):
    parts: Parts  # the parts the forward called
    embed: tuple  # the embed part's cache: idx (B,T) -> (B,T',C)
    wpe: tuple  # EmbeddingCache of positions start..start+T'-1
    drop: DropoutCache  # of the embedding sum (B,T',C)
    blocks: list  # BlockCache per layer
    extra: int  # T' - T: positions the embed part prepended, dropped before the head
    ln_f: LayerNormCache  # (B,T,C)
    head: LinearCache  # ln_f out (B,T,C) @ wte^T (C,V)
    aux: list  # (name, value) of the auxiliary losses the parts added (values already weighted)
    stats: dict  # the parts' measurements for the metrics (Context.stats)


def gpt_forward(params, idx, config: GPTConfig, parts: Optional[Parts] = None, rng=None, kv=None,
                aux_scale: float = 1.0):
    """idx (B,T) ints -> (logits (B,T,V), cache).

    parts: the model's parts; None means parts_for(config), the plain GPT-2.
    rng: a numpy Generator for dropout (training); None means no dropout.
    kv: a KVCache for decoding; idx are then the next T tokens after
    kv.length, whose keys and values are appended (kv.length advances).
    aux_scale: the weight of the auxiliary losses' gradient (see tinygen.parts.Context).
    """
    T = idx.shape[1]
    start = 0 if kv is None else kv.length
    ctx = Context(config, parts_for(config) if parts is None else parts, rng, start, None, [], aux_scale, {})
    x, embed = ctx.parts.embed.forward(idx, params, "wte", ctx)  # (B,T',C)
    T_in = x.shape[1]
    if start + T_in > config.block_size:
        extra = f" ({T_in - T} virtual tokens + {T} tokens)" if T_in > T else ""
        raise TinygenError(f"positions {start}..{start + T_in - 1}{extra} exceed block_size={config.block_size}")
    pos, wpe = embedding_forward(np.arange(start, start + T_in), params["wpe.weight"])  # (T',C)
    x, drop = dropout_forward(x + pos, config.dropout, rng)  # (B,T',C)
    blocks = []
    for i in range(config.n_layer):
        x, block = block_forward(x, params, i, ctx if kv is None else ctx._replace(kv=kv.layer(i)))
        blocks.append(block)
    x = x[:, T_in - T:]  # (B,T,C): positions the embed part prepended predict nothing
    x, ln_f = layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"])
    logits, head = linear_forward(x, params["wte.weight"].T, None)  # (B,T,V), tied to wte
    if kv is not None:
        kv.length = start + T_in
    return logits, GPTCache(ctx.parts, embed, wpe, drop, blocks, T_in - T, ln_f, head, ctx.aux, ctx.stats)


def gpt_backward(dlogits, cache: GPTCache, free_activations: bool = False, emit=None) -> dict:
    """dlogits (B,T,V) -> grads, a dict with every parameter's name and shape.

    wte is used twice (input embedding and LM head), so its gradient is the
    sum of both uses: the one explicit `+=` of tied weights.

    free_activations: drop each block's cache as soon as its backward has run,
    as PyTorch's backward frees its graph, so the activations shrink while the
    gradients grow instead of both being held at the end (GPT.loss_and_grads
    does; GPT-2 small at B = 4: the training step's peak RSS 4122 -> 3686 MiB,
    benchmarks/bench_train.py --configs L). The cache
    is then spent: a second backward through it raises.

    emit: called with each block's gradients ({name: array}) as soon as that block's
    backward has run; those then are not in the returned dict (the sharded API sums
    the shards' block gradients while the backward goes on: tinygen.sharding.ShardSum).

    The head's backward is written out rather than linear_backward's: that
    would give d(wte^T), (C, V), whose transpose added into the (V, C)
    gradient strides through memory (94 ms against 19 ms for a contiguous
    add, one thread, L's 50257 x 768 at B = 2), and sum a bias the head does not have."""
    if any(block is None for block in cache.blocks):
        raise TinygenError("gpt_backward: this cache's activations were freed by an earlier "
                           "gpt_backward(..., free_activations=True); run gpt_forward again")
    x_head, wte_t = cache.head  # ln_f out (B,T,C), wte^T (C,V)
    d2 = dlogits.reshape(-1, dlogits.shape[-1])  # (B*T, V)
    dx = (d2 @ wte_t.T).reshape(x_head.shape)  # (B,T,C)
    dwte_head = d2.T @ x_head.reshape(-1, x_head.shape[-1])  # (V,C): d(wte) through the head, wte's layout
    g = {}
    dx, g["ln_f.weight"], g["ln_f.bias"] = layernorm_backward(dx, cache.ln_f)
    if cache.extra:  # the prepended positions get no gradient from the head
        B, T, C = dx.shape
        dx = np.concatenate([np.zeros((B, cache.extra, C), dx.dtype), dx], axis=1)  # (B,T',C)
    for i in reversed(range(len(cache.blocks))):
        dx, g_block = block_backward(dx, cache.blocks[i])
        if emit is None:
            g.update(g_block)
        else:
            emit(g_block)
        if free_activations:
            cache.blocks[i] = None  # block i's activations are no longer needed
    (dx,) = dropout_backward(dx, cache.drop)
    (g["wpe.weight"],) = embedding_backward(dx.sum(axis=0), cache.wpe)  # positions are shared by the batch
    _, g_embed = cache.parts.embed.backward(dx, cache.embed)
    g.update(g_embed)
    g["wte.weight"] += dwte_head  # tied LM head
    return g


class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated.

    k, v: (L, B, H, T_max, D) with T_max = block_size. Decoding writes each
    new position once, so a token costs O(T C) instead of recomputing O(T^2 C).
    """

    def __init__(self, config: GPTConfig, batch_size: int):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.head_size)
        self.k = np.zeros(shape, dtype=config.np_dtype)
        self.v = np.zeros(shape, dtype=config.np_dtype)
        self.length = 0

    def layer(self, i: int) -> LayerKV:
        """Block i's buffers, (B, H, T_max, D) views."""
        return LayerKV(self.k[i], self.v[i])
