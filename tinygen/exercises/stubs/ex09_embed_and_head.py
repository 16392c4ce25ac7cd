"""Exercise 9: the two ends of GPT-2, where gradients are summed.

    x      = wte[idx] + wpe[0..T-1]          (B, T, C)      token + position embeddings
    (the n_layer blocks sit here; in this exercise there are none)
    logits = ln_f(x) @ wte^T                  (B, T, V)      the LM head is wte itself ("tied")

The forward is written for you (it uses your layer norm of exercise 3).
Write the backward. Two places need a sum:
- wte is used twice, by the lookup and by the head: its gradient is the sum of both;
- every sequence of the batch uses the same rows of wpe: their gradients add up over the batch.
Read first: docs/one-step.md, "The backward of the whole model".
Check: tinygen exercises check DIR embed_and_head
Shapes: B batch, T time, C width, V vocabulary, T_max = wpe's rows.
"""
from typing import NamedTuple

import numpy as np

from ex03_layernorm import layernorm_backward, layernorm_forward  # noqa: F401 (your exercise 3)


class EndsCache(NamedTuple):
    idx: np.ndarray  # (B, T) token ids
    vocab_size: int  # V
    n_positions: int  # T_max
    ln_f: tuple  # your layer norm's cache
    h: np.ndarray  # (B, T, C) ln_f's output, the head's input
    wte: np.ndarray  # (V, C)


def ends_forward(idx, wte, wpe, ln_f_weight, ln_f_bias):
    """idx (B, T) ints, wte (V, C), wpe (T_max, C), ln_f_weight, ln_f_bias (C,) -> (logits (B, T, V), cache)."""
    T = idx.shape[1]
    x = wte[idx] + wpe[:T]  # (B, T, C)
    h, ln_f = layernorm_forward(x, ln_f_weight, ln_f_bias)
    logits = h @ wte.T  # (B, T, V)
    return logits, EndsCache(idx, wte.shape[0], wpe.shape[0], ln_f, h, wte)


def ends_backward(dlogits, cache):
    """dlogits (B, T, V) -> (dwte (V, C), dwpe (T_max, C), dln_f_weight (C,), dln_f_bias (C,)).

    Hints: the head: dh = dlogits @ wte and wte's first part, dlogits^T @ h
    summed over every position: (V, C). Then ln_f's backward gives dx (B, T, C).
    The lookup: scatter dx into wte's rows (np.add.at), and ADD it to the head's
    part. wpe: rows 0..T-1 get dx summed over the batch; the other rows get 0.
    """
    raise NotImplementedError
