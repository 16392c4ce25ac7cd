"""Exercise 13: top-p (nucleus) filtering of next-token logits.

Keep the most probable tokens until their probabilities add up to at least p;
set every other logit to -inf. The most likely token always stays.
As Hugging Face transformers does it (so ties are broken the same way):
1. sort each row ascending, stably (np.argsort(..., kind="stable"));
2. softmax the sorted row and take its cumulative sum;
3. drop every token whose cumulative probability is <= 1 - p, but never the last (largest) one.

    top_p_filter(np.log([[0.1, 0.6, 0.3]]), 0.7)  ->  [[-inf, log 0.6, log 0.3]]

Read first: docs/sampling.md. Check: tinygen exercises check DIR top_p
"""
import numpy as np


def top_p_filter(logits, p):
    """logits (B, V), 0 < p <= 1 -> a new (B, V) float array, -inf where a token is dropped."""
    raise NotImplementedError
