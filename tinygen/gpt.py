"""`GPT`: a model as its users hold it, the config, the flat params and the parts.

    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32))
    logits = model.forward(idx)                          # (B, T, V)
    loss, grads = model.loss_and_grads(idx, targets)
    ids = model.generate(idx, 20, temperature=0)         # tinygen.sampling
    model.save_pretrained("out");  GPT.from_pretrained("out")   # tinygen.checkpoint
    GPT.from_pretrained("runs/lora")                     # any run directory: tinygen.runs
    GPT.from_pretrained("gpt2", adapter="peft-lora")     # a PEFT adapter over its base

The math is model.gpt_forward / gpt_backward; this class checks inputs at
the boundary and connects the pure functions to sampling, checkpoints and the loader of run
directories, which is why it sits above them (they never import it).

Fast by default: forward, loss and loss_and_grads split a batch's rows into
one shard per core and run the shards on threads (tinygen.sharding), with
nothing to call first; generate decodes in one stream unless given workers=
(shards measured slower for decoding: sampling.generate). `workers=` pins the count
(1: one stream, exactly the pure functions); the same count gives
bit-identical results run after run, and any count equals one stream to
rounding. The process-wide settings this touches are in
tinygen.plumbing.parallel (OpenBLAS threads: set for each call and
restored) and tinygen.plumbing.memory (malloc: applied once per process;
TINYGEN_MALLOC=default opts out).

Shapes: B batch, T time, V vocabulary.
"""
from typing import Optional

import numpy as np

from .checkpoint import save_model
from .config import GPTConfig
from .errors import TinygenError
from .loss import cross_entropy_backward, cross_entropy_forward
from .model import KVCache, check_ids, check_params, gpt_backward, gpt_forward, init_params
from .parts import Parts, make_context, parts_for
from .plumbing.memory import reuse_freed_memory_by_default
from .plumbing.parallel import Workers, default_workers
from .runs import load
from .sampling import generate
from .sharding import sharded_forward, sharded_loss, sharded_loss_and_grads


class GPT:
    """A GPT-2 model: `config`, the flat `params` dict and its `parts`.

    parts: None for the plain model of config (model.parts_for); a
    fine-tuning method passes its own (tinygen.finetuning.methods), and
    params then also hold the method's tensors.
    """

    def __init__(self, config: GPTConfig, seed: int = 0, params: Optional[dict] = None,
                 parts: Optional[Parts] = None):
        if not isinstance(config, GPTConfig):
            raise TinygenError(f"config must be a GPTConfig, got {type(config).__name__}")
        if parts is not None and not isinstance(parts, Parts):
            raise TinygenError(f"parts must be a tinygen.parts.Parts, got {type(parts).__name__}")
        self.config = config
        self.parts = parts_for(config) if parts is None else parts
        if params is None:
            params = init_params(config, np.random.default_rng(seed))
        else:
            check_params(params, config)
            params = {k: np.ascontiguousarray(v, dtype=config.np_dtype) for k, v in params.items()}
        self.params = params

    @property
    def num_params(self) -> int:
        return sum(p.size for p in self.params.values())

    @property
    def n_prefix(self) -> int:
        """Positions the embed part puts before the tokens (prompt tuning's virtual tokens; 0 for GPT-2).

        Measured by embedding one token, so any embed part answers it."""
        x, _ = self.parts.embed.forward(np.zeros((1, 1), dtype=np.int64), self.params, "wte",
                                        make_context(self.config, self.parts))
        return x.shape[1] - 1

    def forward(self, idx, kv: Optional[KVCache] = None, *, workers: Optional[int] = None) -> np.ndarray:
        """idx (B,T) ints -> logits (B,T,V), without dropout.

        kv: a KVCache to append to (decoding; one stream). workers: shards of rows run at once
        (None: one per core, see `workers_for`)."""
        idx = check_ids(idx, self.config)
        if kv is not None:
            if kv.k.shape[1] != idx.shape[0]:  # would broadcast silently
                raise TinygenError(f"idx has batch size {idx.shape[0]} but the KVCache was made for {kv.k.shape[1]}")
            return gpt_forward(self.params, idx, self.config, self.parts, kv=kv)[0]
        with self.workers_for(idx.shape[0], workers) as pool:
            return sharded_forward(lambda x: gpt_forward(self.params, x, self.config, self.parts)[0], idx, pool)

    def generate(self, idx, max_new_tokens, **options) -> np.ndarray:
        """Continue each row of idx (B,T) by max_new_tokens ids; see tinygen.sampling.generate.
        One stream by default (it measured faster than shards for decoding); workers=N shards the rows."""
        return generate(self, idx, max_new_tokens, **options)

    def workers_for(self, batch_size: int, workers: Optional[int] = None) -> Workers:
        """The threads one call of batch_size rows runs on, as a `with` block.

        workers=None: one per core, at most one per row (parallel.default_workers), and 1 for a
        model with experts (their routing couples the rows: the load-balancing loss and the
        capacity are per batch, so shards would change the math, not just the rounding).
        """
        reuse_freed_memory_by_default()
        if workers is None:
            workers = 1 if self.config.n_expert else default_workers(batch_size)
        return Workers(workers)

    def save_pretrained(self, directory) -> None:
        """Write config.json + model.safetensors, a Hugging Face GPT-2 checkpoint."""
        save_model(directory, self.config, self.params)

    @classmethod
    def from_pretrained(cls, directory, dtype: Optional[str] = None, *, adapter=None, base=None,
                        merged: bool = False) -> "GPT":
        """Load any run directory (tinygen.runs.load): a checkpoint written by save_pretrained or by
        transformers, a fine-tuning run of any method, or a PEFT adapter directory over its base.

        adapter: a fine-tuning run or PEFT adapter directory to put on the model of `directory`;
        base: where the base of a fine-tuning run or PEFT adapter is now (a run's base is checked
        against the checksum it recorded); merged: fold LoRA into the weights, giving a plain
        GPT-2 (decoding's fast path); dtype: "float32" / "float64" instead of the config's.
        """
        config, params, parts, _ = load(directory, dtype, adapter=adapter, base=base, merged=merged)
        return cls(config, params=params, parts=parts)

    def loss(self, idx, targets, *, workers: Optional[int] = None) -> float:
        """Mean cross-entropy of next-token predictions, without dropout, plus any auxiliary losses.
        workers: as in forward."""
        idx = check_ids(idx, self.config)
        targets = check_ids(targets, self.config, "targets", allow_ignore=True)
        with self.workers_for(idx.shape[0], workers) as pool:
            return sharded_loss(self._loss_one, idx, targets, pool)

    def _loss_one(self, idx, targets) -> float:
        logits, cache = gpt_forward(self.params, idx, self.config, self.parts)
        loss, _ = cross_entropy_forward(logits, targets)
        return loss + sum(value for _, value in cache.aux)

    def loss_and_grads(self, idx, targets, rng: Optional[np.random.Generator] = None, scale: float = 1.0,
                       return_aux: bool = False, stats: Optional[dict] = None, *, workers: Optional[int] = None):
        """Forward, cross-entropy and backward. targets (B,T) ids, -1 to ignore.

        rng drives dropout (pass one while training when config.dropout > 0).
        scale: the grads are those of scale * loss (the training loop weights
        each shard of a batch by its share of the counted positions).
        Returns (loss: float, grads: dict with the keys and shapes of params).
        The loss includes the parts' auxiliary losses (none for GPT-2); with
        return_aux=True a third item gives them apart, {name: value}.
        stats: a dict that receives the parts' measurements, {metric: {name: value}}
        (the experts' load: tinygen.moe); GPT-2's parts measure nothing.
        workers: shards of rows run at once, as in forward (tinygen.sharding: the
        gradients are the shards' sum, equal to one stream's to rounding).
        """
        idx = check_ids(idx, self.config)
        targets = check_ids(targets, self.config, "targets", allow_ignore=True)
        if targets.shape != idx.shape:
            raise TinygenError(f"targets shape {targets.shape} must equal idx shape {idx.shape}")
        with self.workers_for(idx.shape[0], workers) as pool:
            loss, grads, aux, measured = sharded_loss_and_grads(self._loss_and_grads_one, idx, targets, rng=rng,
                                                                scale=float(scale), workers=pool)
        if stats is not None:
            stats.update(measured)
        return (loss, grads, aux) if return_aux else (loss, grads)

    def _loss_and_grads_one(self, idx, targets, rng, scale, emit=None):
        """One stream: -> (loss with aux, grads of scale * loss, aux {name: value}, stats).
        emit: gpt_backward's (tinygen.sharding hands each block's gradients to its ShardSum)."""
        logits, cache = gpt_forward(self.params, idx, self.config, self.parts, rng=rng, aux_scale=scale)
        loss, ce = cross_entropy_forward(logits, targets)
        del logits  # (B,T,V), 103 MB per 2-row shard of GPT-2 small: ce holds the probabilities
        (dlogits,) = cross_entropy_backward(scale, ce)
        del ce  # the probabilities: the backward below reads dlogits only
        grads = gpt_backward(dlogits, cache, free_activations=True, emit=emit)  # nobody else holds this cache
        aux = {}
        for name, value in cache.aux:
            aux[name] = aux.get(name, 0.0) + value
        return loss + sum(aux.values()), grads, aux, cache.stats
