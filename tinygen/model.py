"""GPT-2: embeddings, n_layer pre-LN transformer blocks, final layer norm, tied LM head.

    x      = wte[idx] + wpe[pos]                              (B, T, C)
    for each block i:
        x  = x + c_proj(attention(c_attn(ln_1(x))))          (B, T, C)
        x  = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))          (B, T, C)
    logits = ln_f(x) @ wte^T                                  (B, T, V)

Parameters live in one flat dict named and shaped exactly as Hugging Face's
GPT-2 checkpoints ("h.0.attn.c_attn.weight" is (C, 3C), used as x @ w), so
the same keys index gradients, optimizer state and checkpoints.
`gpt_forward` / `gpt_backward` are the pure pair; `GPT` is a thin holder.

Fine-tuning hooks are data-driven: the same functions apply LoRA to a
projection when `NAME.lora_A` is in params (tinygen.finetuning.lora), an adapter after
each branch's c_proj when `h.{i}.adapter_attn.*` / `adapter_mlp.*` are
(tinygen.finetuning.adapters), and virtual prompt tokens when `prompt.weight` is
(tinygen.finetuning.prompt_tuning). A plain checkpoint has none of these keys and
takes the plain path. LoRA's scale and dropout are hyperparameters, passed
as a `LoraSpec`, not stored in params.

Shapes: B batch, T time, C n_embd, H n_head, D head width, V vocabulary,
L n_layer, n virtual prompt tokens.
"""
import math
from typing import NamedTuple, Optional

import numpy as np

from .attention import attend, causal_attention_backward, causal_attention_forward, merge_heads, split_heads
from .config import GPTConfig
from .finetuning.adapters import adapter_backward, adapter_forward, adapter_names
from .errors import TinygenError
from .layers import (
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from .finetuning.lora import LoraCache, LoraSpec, lora_linear_backward, lora_linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward
from .finetuning.prompt_tuning import NAME as PROMPT, prompt_backward, prompt_forward


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
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
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


def has_hooks(params: dict) -> bool:
    """True when params hold LoRA, adapter or prompt-tuning weights, which only
    gpt_forward applies (kv_decoding.decode_step's fast path knows the plain model only)."""
    return any(k.endswith(".lora_A") or ".adapter_" in k or k == PROMPT for k in params)


# ------------------------------------------------------------------ block
class BlockCache(NamedTuple):
    ln_1: tuple  # LayerNormCache
    c_attn: tuple  # LinearCache (LoraCache with LoRA): ln_1 out (B,T,C) -> qkv (B,T,3C)
    attn: Optional[tuple]  # AttentionCache, None when decoding with a KV cache
    c_proj: tuple  # LinearCache or LoraCache: y (B,T,C) -> (B,T,C)
    adapter_attn: Optional[tuple]  # AdapterCache (B,T,C) -> (B,T,C), None without adapters
    drop_attn: tuple  # DropoutCache on the attention branch
    ln_2: tuple
    c_fc: tuple  # LinearCache or LoraCache: (B,T,C) -> (B,T,4C)
    gelu: tuple  # GeluCache (B,T,4C)
    mlp_proj: tuple  # LinearCache or LoraCache: (B,T,4C) -> (B,T,C)
    adapter_mlp: Optional[tuple]  # AdapterCache, None without adapters
    drop_mlp: tuple


def block_forward(x, params, i, n_head, dropout=0.0, rng=None, kv=None, lora=None):
    """Pre-LN block i: x + attn(ln_1(x)), then + mlp(ln_2(x)).  x (B,T,C) -> (B,T,C).

    kv: for decoding, a (k, v, start) triple of preallocated (B,H,T_max,D)
    buffers; this block's keys and values are written at [start, start+T)
    and the queries attend to everything up to there.
    lora: the LoraSpec for any `*.lora_A` / `*.lora_B` entries of params.
    """
    h = f"h.{i}."
    p = params
    a, ln_1 = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
    qkv, c_attn = project(a, p, h + "attn.c_attn", lora, rng)  # (B,T,3C)
    if kv is None:
        y, attn = causal_attention_forward(qkv, n_head, dropout, rng)  # (B,T,C)
    else:
        y, attn = cached_attention(qkv, n_head, *kv), None
    a, c_proj = project(y, p, h + "attn.c_proj", lora, rng)
    a, adapter_attn = adapt(a, p, i, "adapter_attn")
    a, drop_attn = dropout_forward(a, dropout, rng)
    x = x + a
    m, ln_2 = layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
    m, c_fc = project(m, p, h + "mlp.c_fc", lora, rng)  # (B,T,4C)
    m, gelu = gelu_forward(m)
    m, mlp_proj = project(m, p, h + "mlp.c_proj", lora, rng)  # (B,T,C)
    m, adapter_mlp = adapt(m, p, i, "adapter_mlp")
    m, drop_mlp = dropout_forward(m, dropout, rng)
    x = x + m
    return x, BlockCache(ln_1, c_attn, attn, c_proj, adapter_attn, drop_attn, ln_2, c_fc, gelu, mlp_proj,
                         adapter_mlp, drop_mlp)


def block_backward(dx, cache, i):
    """dx (B,T,C) -> (dx_in (B,T,C), grads of block i's parameters by name).

    The residual connections pass dx straight through; each branch adds its
    own contribution on top (the two `+=` below)."""
    h = f"h.{i}."
    g = {}
    (dm,) = dropout_backward(dx, cache.drop_mlp)
    dm = adapt_backward(dm, cache.adapter_mlp, i, "adapter_mlp", g)
    dm = project_backward(dm, cache.mlp_proj, h + "mlp.c_proj", g)
    (dm,) = gelu_backward(dm, cache.gelu)
    dm = project_backward(dm, cache.c_fc, h + "mlp.c_fc", g)
    dm, g[h + "ln_2.weight"], g[h + "ln_2.bias"] = layernorm_backward(dm, cache.ln_2)
    dx = dx + dm  # residual: x_mid feeds both the MLP branch and the output
    (da,) = dropout_backward(dx, cache.drop_attn)
    da = adapt_backward(da, cache.adapter_attn, i, "adapter_attn", g)
    da = project_backward(da, cache.c_proj, h + "attn.c_proj", g)
    (da,) = causal_attention_backward(da, cache.attn)
    da = project_backward(da, cache.c_attn, h + "attn.c_attn", g)
    da, g[h + "ln_1.weight"], g[h + "ln_1.bias"] = layernorm_backward(da, cache.ln_1)
    dx += da  # residual: x_in feeds both the attention branch and x_mid
    return dx, g


def project(x, params, name, lora=None, rng=None):
    """x @ NAME.weight + NAME.bias, plus LoRA's (alpha/r) drop(x) @ A @ B when
    `NAME.lora_A` is in params. -> (out, LinearCache or LoraCache)."""
    w, b = params[name + ".weight"], params[name + ".bias"]
    if name + ".lora_A" not in params:
        return linear_forward(x, w, b)
    if lora is None:
        raise TinygenError(f"params hold LoRA weights ({name}.lora_A) but no LoraSpec was given (pass lora=...)")
    A, B = params[name + ".lora_A"], params[name + ".lora_B"]
    return lora_linear_forward(x, w, b, A, B, lora.scale, lora.dropout, rng)


def project_backward(dout, cache, name, g):
    """project's backward: writes NAME's gradients into g, returns dx."""
    if isinstance(cache, LoraCache):
        dx, g[name + ".weight"], g[name + ".bias"], g[name + ".lora_A"], g[name + ".lora_B"] = \
            lora_linear_backward(dout, cache)
    else:
        dx, g[name + ".weight"], g[name + ".bias"] = linear_backward(dout, cache)
    return dx


def adapt(x, params, i, site):
    """Block i's adapter at `site` ("adapter_attn" / "adapter_mlp") when params
    hold one, else the identity. x (B,T,C) -> (out (B,T,C), AdapterCache or None)."""
    names = adapter_names(i, site)
    if names[0] not in params:
        return x, None
    return adapter_forward(x, *(params[n] for n in names))


def adapt_backward(dout, cache, i, site, g):
    """adapt's backward: writes the adapter's gradients into g, returns dx."""
    if cache is None:
        return dout
    dx, *grads = adapter_backward(dout, cache)
    g.update(zip(adapter_names(i, site), grads))
    return dx


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


# ------------------------------------------------------------------ model
class GPTCache(NamedTuple):
    wte: tuple  # EmbeddingCache of idx
    prompt: Optional[tuple]  # PromptCache: n virtual tokens prepended, None without prompt tuning
    wpe: tuple  # EmbeddingCache of positions 0..n+T-1
    drop: tuple  # DropoutCache of the embedding sum
    blocks: list  # BlockCache per layer
    ln_f: tuple  # LayerNormCache
    head: tuple  # LinearCache: ln_f out (B,T,C) @ wte^T (C,V)


def gpt_forward(params, idx, config: GPTConfig, rng=None, kv=None, lora: Optional[LoraSpec] = None):
    """idx (B,T) ints -> (logits (B,T,V), cache).

    rng: a numpy Generator for dropout (training); None means no dropout.
    kv: a KVCache for decoding; idx are then the next T tokens after
    kv.length, whose keys and values are appended (kv.length advances).
    lora: the LoraSpec (scale, dropout) of any LoRA weights in params.
    With `prompt.weight` (n, C) in params, n virtual tokens are prepended
    (on the first call when decoding) and their logits dropped.
    """
    B, T = idx.shape
    start = 0 if kv is None else kv.length
    tok, wte = embedding_forward(idx, params["wte.weight"])  # (B,T,C)
    prompt = None
    if PROMPT in params and start == 0:
        tok, prompt = prompt_forward(tok, params[PROMPT])  # (B,n+T,C)
    T_in = tok.shape[1]  # T, or n + T with a prompt
    if start + T_in > config.block_size:
        virtual = f" ({prompt.n} virtual prompt tokens + {T} tokens)" if prompt else ""
        raise TinygenError(f"positions {start}..{start + T_in - 1}{virtual} exceed block_size={config.block_size}")
    pos, wpe = embedding_forward(np.arange(start, start + T_in), params["wpe.weight"])  # (T_in,C)
    x, drop = dropout_forward(tok + pos, config.dropout, rng)  # (B,T_in,C)
    blocks = []
    for i in range(config.n_layer):
        layer_kv = None if kv is None else (kv.k[i], kv.v[i], start)
        x, c = block_forward(x, params, i, config.n_head, config.dropout, rng, layer_kv, lora)
        blocks.append(c)
    if prompt is not None:
        x = x[:, prompt.n:]  # (B,T,C): virtual positions predict nothing
    x, ln_f = layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"])
    logits, head = linear_forward(x, params["wte.weight"].T, None)  # (B,T,V), tied to wte
    if kv is not None:
        kv.length = start + T_in
    return logits, GPTCache(wte, prompt, wpe, drop, blocks, ln_f, head)


def gpt_backward(dlogits, cache: GPTCache) -> dict:
    """dlogits (B,T,V) -> grads, a dict with every parameter's name and shape.

    wte is used twice (input embedding and LM head), so its gradient is the
    sum of both uses: the one explicit `+=` of tied weights."""
    g = {}
    dx, dhead_t, _ = linear_backward(dlogits, cache.head)  # dhead_t (C,V) is d(wte^T)
    dx, g["ln_f.weight"], g["ln_f.bias"] = layernorm_backward(dx, cache.ln_f)
    if cache.prompt is not None:  # the dropped virtual positions get no gradient from the head
        B, T, C = dx.shape
        dx = np.concatenate([np.zeros((B, cache.prompt.n, C), dx.dtype), dx], axis=1)  # (B,n+T,C)
    for i in reversed(range(len(cache.blocks))):
        dx, gb = block_backward(dx, cache.blocks[i], i)
        g.update(gb)
    (dx,) = dropout_backward(dx, cache.drop)
    dtok = dx
    if cache.prompt is not None:
        dtok, g[PROMPT] = prompt_backward(dx, cache.prompt)  # (B,T,C), (n,C)
    (g["wte.weight"],) = embedding_backward(dtok, cache.wte)
    g["wte.weight"] += dhead_t.T  # tied LM head
    (g["wpe.weight"],) = embedding_backward(dx.sum(axis=0), cache.wpe)  # positions are shared by the batch
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


class GPT:
    """A GPT-2 model: `config`, the flat `params` dict, and the pure functions above.

        model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32))
        logits = model.forward(idx)                    # (B, T, V)
        loss, grads = model.loss_and_grads(idx, targets)
    """

    def __init__(self, config: GPTConfig, seed: int = 0, params: Optional[dict] = None,
                 lora: Optional[LoraSpec] = None):
        if not isinstance(config, GPTConfig):
            raise TinygenError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.lora = lora  # LoraSpec of any LoRA weights in params (tinygen.finetuning.lora)
        if params is None:
            params = init_params(config, np.random.default_rng(seed))
        else:
            check_params(params, config)
            params = {k: np.ascontiguousarray(v, dtype=config.np_dtype) for k, v in params.items()}
        self.params = params

    @property
    def num_params(self) -> int:
        return sum(p.size for p in self.params.values())

    def forward(self, idx, kv: Optional[KVCache] = None) -> np.ndarray:
        """idx (B,T) ints -> logits (B,T,V), without dropout."""
        idx = check_ids(idx, self.config)
        if kv is not None and kv.k.shape[1] != idx.shape[0]:  # would broadcast silently
            raise TinygenError(f"idx has batch size {idx.shape[0]} but the KVCache was made for {kv.k.shape[1]}")
        logits, _ = gpt_forward(self.params, idx, self.config, kv=kv, lora=self.lora)
        return logits

    def generate(self, idx, max_new_tokens, **options) -> np.ndarray:
        """Continue each row of idx (B,T) by max_new_tokens ids; see tinygen.sampling.generate."""
        from .sampling import generate

        return generate(self, idx, max_new_tokens, **options)

    def save_pretrained(self, directory) -> None:
        """Write config.json + model.safetensors, a Hugging Face GPT-2 checkpoint."""
        from .checkpoint import save_model

        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory) -> "GPT":
        """Load a checkpoint written by save_pretrained or by transformers."""
        from .checkpoint import load_model

        return load_model(directory)

    def loss(self, idx, targets) -> float:
        """Mean cross-entropy of next-token predictions, without dropout."""
        targets = check_ids(targets, self.config, "targets", allow_ignore=True)
        loss, _ = cross_entropy_forward(self.forward(idx), targets)
        return loss

    def loss_and_grads(self, idx, targets, rng: Optional[np.random.Generator] = None, scale: float = 1.0):
        """Forward, cross-entropy and backward. targets (B,T) ids, -1 to ignore.

        rng drives dropout (pass one while training when config.dropout > 0).
        scale: the grads are those of scale * loss (the training loop weights
        each shard of a batch by its share of the counted positions).
        Returns (loss: float, grads: dict with the keys and shapes of params).
        """
        idx = check_ids(idx, self.config)
        targets = check_ids(targets, self.config, "targets", allow_ignore=True)
        if targets.shape != idx.shape:
            raise TinygenError(f"targets shape {targets.shape} must equal idx shape {idx.shape}")
        logits, cache = gpt_forward(self.params, idx, self.config, rng=rng, lora=self.lora)
        loss, ce = cross_entropy_forward(logits, targets)
        (dlogits,) = cross_entropy_backward(float(scale), ce)
        return loss, gpt_backward(dlogits, cache)
