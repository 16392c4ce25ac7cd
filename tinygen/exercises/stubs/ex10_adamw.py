"""Exercise 10: one AdamW step (Adam with decoupled weight decay), as torch.optim.AdamW.

    p = p * (1 - lr * weight_decay)            # decoupled decay, before the Adam step
    m = beta1 m + (1 - beta1) g                # first moment
    v = beta2 v + (1 - beta2) g^2              # second moment
    mhat = m / (1 - beta1^t),  vhat = v / (1 - beta2^t)      # bias correction, t = 1, 2, ...
    p = p - lr * mhat / (sqrt(vhat) + eps)

Read first: docs/optimizer.md. Check: tinygen exercises check DIR adamw
"""
import numpy as np


def adamw_step(p, g, m, v, t, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
    """One step for one parameter array. p, g, m, v same shape; t the step number (1 on the first step).

    Returns new arrays (p, m, v); the inputs are not modified.
    Hint: m and v start at zero, so without the bias correction the first steps
    are much too small (at t = 1, mhat / sqrt(vhat) is exactly sign(g)).
    """
    raise NotImplementedError
