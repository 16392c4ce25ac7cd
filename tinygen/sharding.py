"""One batch over all cores: split its rows into shards, run each on a thread, combine.

The rows of a GPT-2 batch never meet: every position attends within its own
row, and the loss is a mean over positions. So a batch can be cut into
shards of rows, one per core (tinygen.plumbing.parallel.Workers runs them
at once), and the results put back together:

    logits    = concatenate(shard logits, rows in order)
    loss      = sum_s w_s * loss_s,        w_s = n_s / n
    grads     = sum_s grads of (scale * w_s * loss_s)

where n_s counts the shard's positions whose target is not ignored and n
the batch's. The loss is then exactly the batch mean: sum_s (n_s/n) *
(sum over the shard's counted positions / n_s) = (sum over all / n). Only
the rounding differs from one stream, and only in the order of the sums.

The results depend on the number of shards W only through that rounding,
and are bit-identical from run to run for the same W (the shards are fixed
contiguous row ranges and are combined in order). Dropout is the exception
to "only rounding": each shard draws its masks from its own generator,
spawned from the caller's, so the masks depend on W (the distribution does
not).

Who uses it: the public API (GPT.forward, loss, loss_and_grads) shards by
default, generate when given workers=; the training loop (tinygen.train) computes the same
weights with `shard_weights` but sums the shards' gradients straight into
the optimizer's buffer.

Shapes: B batch, T time, V vocabulary, W workers.
"""
import threading
from typing import Callable, Optional

import numpy as np

from .loss import IGNORE
from .plumbing.parallel import Workers, ranges


def shard_rows(batch_size: int, n_shards: int) -> list:
    """Contiguous row slices, sizes differing by at most 1 (at most one shard per row).

    >>> shard_rows(5, 2)
    [slice(0, 2, None), slice(2, 5, None)]
    """
    return [slice(lo, hi) for lo, hi in ranges(batch_size, min(n_shards, batch_size))]


def shard_weights(targets: np.ndarray, rows: list) -> list:
    """w_s = n_s / n for each shard: its share of the counted positions (targets != -1).

    All 0 when nothing is counted (the loss is then 0, as cross_entropy_forward's).

    >>> shard_weights(np.array([[1, 2], [3, -1], [-1, -1]]), [slice(0, 1), slice(1, 3)])
    [0.6666666666666666, 0.3333333333333333]
    """
    counted = targets != IGNORE
    n = int(counted.sum())
    return [int(counted[rows_s].sum()) / n if n else 0.0 for rows_s in rows]


def spawn_rngs(rng: Optional[np.random.Generator], n: int) -> list:
    """n independent generators drawn from rng (None -> n Nones: no dropout)."""
    if rng is None:
        return [None] * n
    return [np.random.default_rng(seed) for seed in rng.integers(0, 2**63, size=n)]


def sharded_forward(forward: Callable, idx: np.ndarray, workers: Workers) -> np.ndarray:
    """forward(idx_s) (B_s, T, ...) on each shard of rows at once, concatenated back to (B, T, ...)."""
    rows = shard_rows(idx.shape[0], workers.n)
    if len(rows) == 1:
        return forward(idx)
    parts = workers.map(lambda rows_s: forward(idx[rows_s]), rows)
    return np.concatenate(parts, axis=0)


def sharded_loss(loss: Callable, idx: np.ndarray, targets: np.ndarray, workers: Workers) -> float:
    """sum_s w_s * loss(idx_s, targets_s): the batch's mean loss, from shards run at once."""
    rows = shard_rows(idx.shape[0], workers.n)
    if len(rows) == 1:
        return loss(idx, targets)
    weights = shard_weights(targets, rows)
    losses = workers.map(lambda rows_s: loss(idx[rows_s], targets[rows_s]), rows)
    return float(sum(w * value for w, value in zip(weights, losses)))


class ShardSum:
    """The shards' gradients summed name by name as they arrive, in shard order.

    Each shard hands over a block's gradients as soon as its backward has run
    them (gpt_backward's emit); once every shard has given a name, that name's
    arrays are added, g_0 += g_1 += ..., into shard 0's array and the others are
    dropped. So the shards hold one model's worth of gradients between them at
    the end instead of W (GPT-2 small at B = 4: 1.45x PyTorch's peak memory with
    a dict per shard). The order of the sum is fixed, so the bits do not depend
    on which thread finished first.
    """

    def __init__(self, n_shards: int):
        self.n = n_shards
        self.total = {}  # name -> the sum over all shards
        self._waiting = {}  # name -> [array or None] per shard
        self._lock = threading.Lock()

    def add(self, shard: int, grads: dict) -> None:
        for name, g in grads.items():
            with self._lock:
                parts = self._waiting.setdefault(name, [None] * self.n)
                parts[shard] = g
                complete = all(p is not None for p in parts)
                if complete:
                    del self._waiting[name]
            if complete:  # only this thread holds the parts now
                for p in parts[1:]:
                    parts[0] += p
                self.total[name] = parts[0]


def sharded_loss_and_grads(loss_and_grads: Callable, idx, targets, *, rng, scale: float, workers: Workers):
    """The batch's (loss, grads of scale * loss, aux {name: value}, stats) from shards run at once.

    loss_and_grads(idx_s, targets_s, rng_s, scale_s, emit) -> (loss_s, grads_s, aux_s, stats_s)
    is one stream's (emit: gpt_backward's, None in one stream); each shard gets
    scale_s = scale * w_s, so its gradients are already weighted and the batch's are
    their sum, made by a ShardSum while the backwards run.
    """
    rows = shard_rows(idx.shape[0], workers.n)
    if len(rows) == 1:
        return loss_and_grads(idx, targets, rng, scale, None)
    weights = shard_weights(targets, rows)
    summed = ShardSum(len(rows))
    jobs = list(enumerate(zip(rows, spawn_rngs(rng, len(rows)), weights)))

    def run(job):
        shard, (rows_s, rng_s, w_s) = job
        return loss_and_grads(idx[rows_s], targets[rows_s], rng_s, scale * w_s, lambda g: summed.add(shard, g))

    results = workers.map(run, jobs)
    for shard, r in enumerate(results):  # what the backwards did not emit: the embeddings, ln_f, wte
        summed.add(shard, r[1])
    loss = float(sum(w * r[0] for w, r in zip(weights, results)))
    aux = {}
    for w, r in zip(weights, results):
        for name, value in r[2].items():
            aux[name] = aux.get(name, 0.0) + w * value
    return loss, summed.total, aux, weighted_stats(weights, [r[3] for r in results])


def weighted_stats(weights: list, stats: list) -> dict:
    """The shards' measurements {metric: {name: value or list}} as one weighted mean.

    >>> weighted_stats([0.25, 0.75], [{"load": {"h.0": [1.0, 0.0]}}, {"load": {"h.0": [0.0, 1.0]}}])
    {'load': {'h.0': [0.25, 0.75]}}
    """
    total = sum(weights) or 1.0
    return {metric: {name: (sum(w * np.asarray(s[metric][name]) for w, s in zip(weights, stats)) / total).tolist()
                     for name in by_name}
            for metric, by_name in stats[0].items()}
