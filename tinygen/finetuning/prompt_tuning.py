"""Prompt tuning (Lester et al., 2021): n trainable "virtual token" embeddings.

    x = [P ; wte[idx]] + wpe[0 .. n + T - 1]          (B, n + T, C)

P (n, C), stored as `prompt.weight`, is prepended to every sequence's token
embeddings; the whole model is frozen and only P is trained (n C scalars).
As in Hugging Face PEFT for GPT-2, the virtual tokens take positions
0..n-1 and the real tokens n..n+T-1, so a sequence needs n + T <= block_size
(peft's PeftModelForCausalLM.forward passes GPT-2 no position ids, which then
counts from 0 over the n + T embeddings: tinygen.finetuning.peft, docs/peft.md).
The model drops the virtual positions before the LM head: their logits
would predict nothing, and the caller's logits stay (B, T, V).

In the model, prompt tuning is an embed part (tinygen.parts):
`prompt_embed(base)` prepends P to what the `base` embed part returns, on
a call that starts at position 0 (when decoding with a KV cache, later
calls find the virtual tokens' keys and values already in the cache).

Shapes: B batch, T real tokens, n virtual tokens, C width.
"""
from typing import NamedTuple, Optional

import numpy as np

from ..parts import Part

NAME = "prompt.weight"


def init_prompt(wte: np.ndarray, n_virtual: int, rng: np.random.Generator) -> dict:
    """{"prompt.weight": (n, C)}, initialised from the embeddings of n random
    vocabulary tokens (Lester et al.: better than random vectors). wte (V, C)."""
    rows = rng.integers(0, wte.shape[0], n_virtual)
    return {NAME: wte[rows].copy()}


class PromptCache(NamedTuple):
    n: int  # virtual tokens prepended


def prompt_forward(tok, prompt):
    """x = [prompt ; tok] along time.  tok (B, T, C), prompt (n, C) -> x (B, n + T, C)."""
    B, T, C = tok.shape
    n = prompt.shape[0]
    x = np.empty((B, n + T, C), dtype=tok.dtype)
    x[:, :n] = prompt  # broadcast over the batch
    x[:, n:] = tok
    return x, PromptCache(n)


def prompt_backward(dx, cache):
    """Concatenation's backward is a split; the prompt is shared by every row,
    so its gradient sums over the batch.

    dx (B, n + T, C) -> dtok (B, T, C), dprompt (n, C).
    """
    n = cache.n
    return dx[:, n:].copy(), dx[:, :n].sum(axis=0)


# ------------------------------------------------------------------ the embed part
class PromptPartCache(NamedTuple):
    base: tuple  # the base embed part's cache: idx (B,T) -> tok (B,T,C)
    prompt: Optional[PromptCache]  # None on a decoding call after the first (nothing prepended)


def prompt_embed(base: Part) -> Part:
    """The embed part with n virtual tokens: [prompt.weight ; base(idx)] (B, n + T, C)."""
    def forward(idx, params, name, ctx):
        tok, base_cache = base.forward(idx, params, name, ctx)  # (B,T,C)
        if ctx.start > 0:  # decoding: the virtual tokens are already in the KV cache
            return tok, PromptPartCache(base_cache, None)
        x, prompt = prompt_forward(tok, params[NAME])  # (B,n+T,C)
        return x, PromptPartCache(base_cache, prompt)

    def backward(dx, cache):
        if cache.prompt is None:
            return base.backward(dx, cache.base)
        dtok, dprompt = prompt_backward(dx, cache.prompt)  # (B,T,C), (n,C)
        _, grads = base.backward(dtok, cache.base)
        grads[NAME] = dprompt
        return None, grads

    return Part(forward, backward)
