"""Reference solution of exercise 13."""
import numpy as np


def top_p_filter(logits, p):
    logits = np.asarray(logits, dtype=np.float64)
    order = np.argsort(logits, axis=-1, kind="stable")
    s = np.take_along_axis(logits, order, axis=-1)
    probs = np.exp(s - s.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    drop_sorted = np.cumsum(probs, axis=-1) <= 1.0 - p
    drop_sorted[:, -1] = False
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)
