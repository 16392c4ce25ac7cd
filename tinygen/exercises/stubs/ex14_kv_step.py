"""Exercise 14: one decoding step with a KV cache.

When generating, position n's queries attend to the keys and values of
positions 0..n. Those of 0..n-1 were computed on earlier steps, so keep them:
k_cache and v_cache (B, H, T_max, D) hold them. One step:
1. split the new position's qkv (B, 3C) into q, k, v, each (B, H, D);
2. write k and v into the caches at position n;
3. y = softmax(q . K[0..n] / sqrt(D)) V[0..n] per head, merged back: (B, C).
No mask is needed: position n may see every cached position. The result must
equal row n of full causal attention over positions 0..n (exercise 6).
Read first: docs/sampling.md, "The KV cache". Check: tinygen exercises check DIR kv_step
Shapes: B batch, H heads, D head width, C = H * D.
"""
import math

import numpy as np


def kv_attention_step(qkv, k_cache, v_cache, n, n_head):
    """qkv (B, 3C), k_cache, v_cache (B, H, T_max, D) written in place at n -> y (B, C)."""
    raise NotImplementedError
