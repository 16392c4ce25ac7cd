"""Parts: the pieces of a GPT-2 block that a fine-tuning method or a new layer type replaces.

A part is a forward/backward pair with one signature for all of them:

    forward(x, params, name, ctx) -> (out, cache)      backward(dout, cache) -> (dx, grads)

`name` is the parameter prefix this use of the part owns ("h.3.attn",
"h.3.attn.c_attn", "wte"); `grads` is a fresh dict {full parameter name:
gradient} of the parameters the part read. `Parts` collects one part per
role, and `Context` is what one forward call shares with every part (the
config, the parts themselves, dropout's rng, the KV buffers, auxiliary
losses). model.block_forward calls them; nothing in model.py asks which
part it got. `GPT2` is the plain model's parts:

    linear     every projection: x @ W + b                  (..., C_in) -> (..., N)
    attention  ln_1(x) -> c_attn, heads, causal attention, c_proj   (B,T,C) -> (B,T,C)
    mlp        ln_2(x) -> c_fc, GELU, c_proj                (B,T,C) -> (B,T,C)
    branch     a branch's output before dropout and the residual add: the identity
    embed      idx (B,T) -> wte[idx] (B,T',C), T' = T for GPT-2

A method replaces parts: `parts._replace(linear=...)` (LoRA), `branch=`
(adapters), `embed=` (prompt tuning); see tinygen.finetuning.methods.
A part's cache keeps whatever its backward needs, the sub-parts it called
included (their backward is the one to call).

Shapes: B batch, T time, C n_embd, H n_head, D head width, N output width.
"""
from functools import partial
from typing import Callable, NamedTuple, Optional

import numpy as np

from .attention import (attend, bidirectional_attention_backward, bidirectional_attention_forward,
                        causal_attention_backward, causal_attention_forward, merge_heads, split_heads)
from .config import GPTConfig
from .errors import TinygenError
from .layers import (
    EmbeddingCache,
    GeluCache,
    LinearCache,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    linear_backward,
    linear_forward,
)
from .moe import moe_mlp_backward, moe_mlp_forward


class Part(NamedTuple):
    """forward(x, params, name, ctx) -> (out, cache);  backward(dout, cache) -> (dx, grads).

    name: the parameter prefix this use of the part owns ("h.3.mlp", "h.3.attn.c_attn");
    grads: a dict {full parameter name: gradient} for the parameters the part used (fresh arrays)."""

    forward: Callable
    backward: Callable


class Parts(NamedTuple):
    linear: Part  # every projection (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj): x @ W + b. LoRA replaces it
    attention: Part  # ln_1(x) (B,T,C) -> attention branch output (B,T,C): c_attn, heads, c_proj
    mlp: Part  # ln_2(x) (B,T,C) -> MLP branch output (B,T,C): c_fc, GELU, c_proj
    branch: Part  # each branch's output before dropout and the residual add; the identity. Adapters
    #               replace it (name is "h.{i}.adapter_attn" / "h.{i}.adapter_mlp")
    embed: Part  # token embedding: idx (B,T) -> (B,T',C) with wte; prompt tuning prepends virtual tokens


class LayerKV(NamedTuple):
    """One block's key/value buffers when decoding (model.KVCache.layer(i))."""

    k: np.ndarray  # (B, H, T_max, D): positions [0, ctx.start) are filled; a call writes [start, start + T)
    v: np.ndarray  # (B, H, T_max, D)


class Context(NamedTuple):
    """What one forward call shares with every part."""

    config: GPTConfig
    parts: Parts  # parts call ctx.parts.linear for their projections
    rng: Optional[np.random.Generator] = None  # dropout; None = no dropout
    start: int = 0  # position of the call's first input: 0, or the KV cache's length when decoding
    kv: Optional[LayerKV] = None  # decoding: the current block's buffers (attention parts use it); else None
    aux: Optional[list] = None  # a part appends (name, value) of an auxiliary loss, value times its
    #                             coefficient (make_context gives a fresh list)
    aux_scale: float = 1.0  # the weight of the auxiliary losses' gradient (loss_and_grads' scale); a part
    #                         keeps it in its cache, so its backward adds the auxiliary gradient itself
    stats: Optional[dict] = None  # a part may record measurements for the training metrics, not losses:
    #                               stats[metric][name] = value (the experts' load: tinygen.moe)


def make_context(config: GPTConfig, parts: Optional[Parts] = None, rng=None, aux_scale: float = 1.0) -> Context:
    """A Context for one forward call outside decoding, with a fresh aux list; parts None = parts_for(config)."""
    return Context(config, parts_for(config) if parts is None else parts, rng, 0, None, [], aux_scale, {})


# ------------------------------------------------------------------ linear: every projection
class ProjectionCache(NamedTuple):
    name: str  # "h.0.attn.c_attn": the parameters are NAME.weight (C_in, N) and NAME.bias (N,)
    linear: LinearCache  # x (..., C_in), w (C_in, N)


def projection_forward(x, params, name, ctx):
    """out = x @ NAME.weight + NAME.bias.  x (..., C_in) -> out (..., N)."""
    out, linear = linear_forward(x, params[name + ".weight"], params[name + ".bias"])
    return out, ProjectionCache(name, linear)


def projection_backward(dout, cache):
    """layers.linear_backward, the gradients under their parameter names."""
    dx, dw, db = linear_backward(dout, cache.linear)
    return dx, {cache.name + ".weight": dw, cache.name + ".bias": db}


# ------------------------------------------------------------------ attention: the attention sublayer
class SelfAttentionCache(NamedTuple):
    linear: Part  # the linear part used for both projections
    c_attn: tuple  # its cache: ln_1 out (B,T,C) -> qkv (B,T,3C)
    attn: Optional[tuple]  # AttentionCache (or BidirectionalCache): q, k, v (B,H,T,D), the probabilities;
    #                        None when decoding (no backward)
    c_proj: tuple  # its cache: y (B,T,C) -> (B,T,C)


def self_attention_forward(x, params, name, ctx):
    """x (B,T,C) -> c_proj(causal_attention(c_attn(x))) (B,T,C); NAME is "h.{i}.attn".

    Decoding (ctx.kv given): the new keys and values go into the block's
    buffers at [ctx.start, ctx.start + T) and the queries attend to all of [0, start + T).
    """
    linear, n_head = ctx.parts.linear, ctx.config.n_head
    qkv, c_attn = linear.forward(x, params, name + ".c_attn", ctx)  # (B,T,3C)
    if ctx.kv is None:
        y, attn = causal_attention_forward(qkv, n_head, ctx.config.dropout, ctx.rng)  # (B,T,C)
    else:
        y, attn = cached_attention(qkv, n_head, ctx.kv.k, ctx.kv.v, ctx.start), None  # (B,T,C)
    y, c_proj = linear.forward(y, params, name + ".c_proj", ctx)  # (B,T,C)
    return y, SelfAttentionCache(linear, c_attn, attn, c_proj)


def self_attention_backward(dout, cache):
    """dout (B,T,C) -> dx (B,T,C): the three steps of the forward in reverse."""
    assert cache.attn is not None, "a forward with a KV cache (decoding) has no backward"
    linear = cache.linear
    dy, grads = linear.backward(dout, cache.c_proj)
    (dqkv,) = causal_attention_backward(dy, cache.attn)  # (B,T,3C)
    dx, g_attn = linear.backward(dqkv, cache.c_attn)
    grads.update(g_attn)
    return dx, grads


def cached_attention(qkv, n_head, k_buf, v_buf, start):
    """Attention for T new positions given the keys/values of the `start` before them.

    qkv (B,T,3C); k_buf, v_buf (B,H,T_max,D) are written in place at
    [start, start+T). Returns y (B,T,C), equal to the full recomputation's
    last T rows, because causality means earlier rows never change.
    """
    q, k, v = split_heads(qkv, n_head)  # (B,H,T,D)
    end = start + q.shape[2]
    k_buf[:, :, start:end] = k
    v_buf[:, :, start:end] = v
    y, _ = attend(q, k_buf[:, :, :end], v_buf[:, :, :end])
    return merge_heads(y)


# ------------------------------------------------------------------ attention without the mask
def bidirectional_self_attention_forward(x, params, name, ctx):
    """x (B,T,C) -> c_proj(bidirectional_attention(c_attn(x))) (B,T,C): every position sees every
    other, the future included (GPTConfig.causal False). The same parameters as GPT-2's attention.

    No decoding with a KV cache: a new token would change what every earlier position sees."""
    if ctx.kv is not None:
        raise TinygenError("a bidirectional model (causal=False) has no KV-cache decoding: it does not "
                           "generate left to right")
    linear, n_head = ctx.parts.linear, ctx.config.n_head
    qkv, c_attn = linear.forward(x, params, name + ".c_attn", ctx)  # (B,T,3C)
    y, attn = bidirectional_attention_forward(qkv, n_head, ctx.config.dropout, ctx.rng)  # (B,T,C)
    y, c_proj = linear.forward(y, params, name + ".c_proj", ctx)  # (B,T,C)
    return y, SelfAttentionCache(linear, c_attn, attn, c_proj)


def bidirectional_self_attention_backward(dout, cache):
    """dout (B,T,C) -> dx (B,T,C): the three steps of the forward in reverse."""
    linear = cache.linear
    dy, grads = linear.backward(dout, cache.c_proj)
    (dqkv,) = bidirectional_attention_backward(dy, cache.attn)  # (B,T,3C)
    dx, g_attn = linear.backward(dqkv, cache.c_attn)
    grads.update(g_attn)
    return dx, grads


# ------------------------------------------------------------------ mlp: the MLP sublayer
class MlpCache(NamedTuple):
    linear: Part  # the linear part used for both projections
    c_fc: tuple  # its cache: (B,T,C) -> (B,T,4C)
    gelu: GeluCache  # (B,T,4C)
    c_proj: tuple  # its cache: (B,T,4C) -> (B,T,C)


def mlp_forward(x, params, name, ctx):
    """x (B,T,C) -> c_proj(gelu(c_fc(x))) (B,T,C); NAME is "h.{i}.mlp"."""
    linear = ctx.parts.linear
    h, c_fc = linear.forward(x, params, name + ".c_fc", ctx)  # (B,T,4C)
    h, gelu = gelu_forward(h)
    h, c_proj = linear.forward(h, params, name + ".c_proj", ctx)  # (B,T,C)
    return h, MlpCache(linear, c_fc, gelu, c_proj)


def mlp_backward(dout, cache):
    """dout (B,T,C) -> dx (B,T,C): the three steps of the forward in reverse."""
    linear = cache.linear
    dh, grads = linear.backward(dout, cache.c_proj)  # (B,T,4C)
    (dh,) = gelu_backward(dh, cache.gelu)
    dx, g_fc = linear.backward(dh, cache.c_fc)  # (B,T,C)
    grads.update(g_fc)
    return dx, grads


# ------------------------------------------------------------------ branch: the identity
def identity_forward(x, params, name, ctx):
    """out = x: GPT-2 adds each branch's output to the residual stream as it is."""
    return x, None


def identity_backward(dout, cache):
    """dx = dout, no parameters. (dout itself, not a copy: the one backward that returns its input.)"""
    return dout, {}


# ------------------------------------------------------------------ embed: the token embedding
class TokenEmbeddingCache(NamedTuple):
    name: str  # "wte": the table is NAME.weight (V, C)
    embedding: EmbeddingCache  # the ids (B,T) that were read


def token_embedding_forward(idx, params, name, ctx):
    """tok = NAME.weight[idx].  idx (B,T) ints -> tok (B,T,C)."""
    tok, embedding = embedding_forward(idx, params[name + ".weight"])
    return tok, TokenEmbeddingCache(name, embedding)


def token_embedding_backward(dtok, cache):
    """dtok (B,T,C) -> (None: ids have no gradient, {NAME.weight: scatter-add of dtok})."""
    (dw,) = embedding_backward(dtok, cache.embedding)
    return None, {cache.name + ".weight": dw}


# ------------------------------------------------------------------ the plain model
LINEAR = Part(projection_forward, projection_backward)
CAUSAL_SELF_ATTENTION = Part(self_attention_forward, self_attention_backward)
BIDIRECTIONAL_SELF_ATTENTION = Part(bidirectional_self_attention_forward, bidirectional_self_attention_backward)
MLP = Part(mlp_forward, mlp_backward)
IDENTITY = Part(identity_forward, identity_backward)
TOKEN_EMBEDDING = Part(token_embedding_forward, token_embedding_backward)

GPT2 = Parts(linear=LINEAR, attention=CAUSAL_SELF_ATTENTION, mlp=MLP, branch=IDENTITY, embed=TOKEN_EMBEDDING)
EXPERT_MLP = Part(partial(moe_mlp_forward, dense=MLP), moe_mlp_backward)  # experts where a block has a router


def parts_for(config: GPTConfig) -> Parts:
    """The parts of config's architecture, before any fine-tuning method attaches its own.

    GPT2, with a part replaced for each config field that changes one (one
    row each: attention by `causal`, the MLP by `n_expert`); model.py stays as it is.
    """
    parts = GPT2
    if not config.causal:  # masked language modelling: attention sees both sides
        parts = parts._replace(attention=BIDIRECTIONAL_SELF_ATTENTION)
    if config.n_expert:  # every moe_every-th block has experts (tinygen.moe), the others GPT-2's MLP
        parts = parts._replace(mlp=EXPERT_MLP)
    return parts
