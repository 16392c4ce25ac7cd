"""Prompt tuning (Lester et al., 2021): n trainable "virtual token" embeddings.

    x = [P ; wte[idx]] + wpe[0 .. n + T - 1]          (B, n + T, C)

P (n, C), stored as `prompt.weight`, is prepended to every sequence's token
embeddings; the whole model is frozen and only P is trained (n C scalars).
As in Hugging Face PEFT for GPT-2, the virtual tokens take positions
0..n-1 and the real tokens n..n+T-1, so a sequence needs n + T <= block_size.
The model drops the virtual positions before the LM head: their logits
would predict nothing, and the caller's logits stay (B, T, V).

Shapes: B batch, T real tokens, n virtual tokens, C width.
"""
from typing import NamedTuple

import numpy as np

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
