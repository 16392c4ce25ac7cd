"""The training loop, shared by pretraining and fine-tuning.

One step, for step = start .. max_steps - 1:

    x, y      = batches(step)                          (B*A, T) ids; y = -1 is ignored
    for each of the A micro-batches:                   A = grad_accum
        split its B rows into W shards                 W = workers, run at once (parallel.py)
        loss, g = model.loss_and_grads(x, y, rng, scale=w)    w: the shard's share of the step's loss
        opt.sum_grads(the shards' g)                   = the gradient of the mean over the A micro-batches
    norm      = opt.grad_norm()                        NaN or inf here -> stop, no update
    opt.step(lr=lr_at(step), grad_scale=clip_coef(norm, grad_clip))
                                                       clipping and AdamW, in one pass over memory
                                                       (grad_scale 1 when grad_clip is 0: no clipping)
    every eval_interval steps:       val_loss over fixed held-out batches
    every step:                      a row in RUN_DIR/metrics.jsonl
    every checkpoint_interval steps: model.safetensors, then train_state.safetensors

The loop knows nothing about what it trains: pretraining and fine-tuning
differ only in the model object (anything with `.params`, a flat dict of
arrays, `.loss_and_grads(x, y, rng, scale)` and `.loss(x, y)`), the batches, the
`trainable` name predicate and how weights are saved. Every random draw
comes from a generator derived from (seed, step, shard), so a resumed run
reproduces an uninterrupted one bit for bit, given the same number of
workers (another W changes the dropout masks and the rounding of the
gradient sums, not the math).

Shapes: B batch, A gradient-accumulation steps, T block size, W workers.
"""
import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np

from .checkpoint import checkpoint_step, load_train_state, report_kept, save_train_state
from .config import (NON_NEGATIVE, POSITIVE, PROBABILITY, GPTConfig, number, one_of, optional, option,
                     validate)
from .data import STREAM_DROPOUT
from .errors import TinygenError
from .optim import AdamW, clip_coef, lr_at
from .plumbing.lock import run_lock
from .plumbing.memory import reuse_freed_memory_by_default
from .plumbing.metrics import MetricsLog, read_metrics, truncate_after
from .plumbing.parallel import Workers, default_workers
from .plumbing.plot import write_expert_load_svg, write_loss_svg
from .plumbing.progress import Progress, format_rate
from .plumbing.rundir import EXPERT_LOAD_SVG, LOSS_SVG, METRICS, TRAIN_STATE
from .sharding import shard_rows, shard_weights, weighted_stats


NON_NEGATIVE_NUMBER = number(0.0)  # a rate, a decay, a clipping norm: finite and >= 0
BETA = number(0.0, 1.0, high_open=True)  # an Adam moment decay: [0, 1)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes; defaults are the `small` preset."""

    # model (vocab_size: the tokenizer's target size when one is trained)
    vocab_size: int = option(2048, "size of the BPE vocabulary to train, <|endoftext|> included", POSITIVE)
    block_size: int = option(128, "context length T: tokens the model sees at once", POSITIVE)
    n_layer: int = option(4, "transformer blocks", POSITIVE)
    n_head: int = option(4, "attention heads per block (must divide --n-embd)", POSITIVE)
    n_embd: int = option(128, "width of the residual stream", POSITIVE)
    dropout: float = option(0.0, "dropout probability while training (0 = off)", PROBABILITY)
    dtype: str = option("float32", "float32 or float64 parameters and activations", one_of("float32", "float64"))
    n_expert: int = option(0, "experts in each mixture-of-experts block (0 = dense GPT-2; docs/moe.md)",
                           NON_NEGATIVE)
    expert_top_k: int = option(2, "experts each token is routed to (GLaM: 2), at most --n-expert", POSITIVE)
    moe_every: int = option(2, "every moe_every-th block has experts (GLaM: 2, every other block)", POSITIVE)
    aux_loss_coef: float = option(0.01, "weight of the experts' load-balancing loss in the training loss",
                                  NON_NEGATIVE_NUMBER)
    capacity_factor: Optional[float] = option(None, "each expert takes at most ceil(factor * tokens * k / E) "
                                              "tokens of a training batch, the rest skip the layer (None = no "
                                              "limit)", optional(number(0.0, low_open=True)))
    # optimization
    batch_size: int = option(16, "sequences per micro-batch", POSITIVE)
    grad_accum: int = option(1, "micro-batches summed into each optimizer step", POSITIVE)
    max_steps: int = option(1600, "optimizer steps to train to (with --resume: continue up to this step)",
                            NON_NEGATIVE)
    lr: float = option(2e-3, "peak learning rate, reached after the warm-up", NON_NEGATIVE_NUMBER)
    min_lr: float = option(2e-4, "learning rate at the end of the cosine decay", NON_NEGATIVE_NUMBER)
    warmup_steps: int = option(30, "steps of linear warm-up from lr/(warmup+1) to lr (cut to the decay's "
                               "length if longer)", NON_NEGATIVE)
    lr_decay_steps: Optional[int] = option(None, "step where the cosine decay reaches min_lr; None means "
                                           "--max-steps, fixed when the run starts", optional(NON_NEGATIVE))
    weight_decay: float = option(0.1, "AdamW decoupled weight decay of the 2-D weights", NON_NEGATIVE_NUMBER)
    beta1: float = option(0.9, "AdamW first-moment decay", BETA)
    beta2: float = option(0.99, "AdamW second-moment decay", BETA)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)", NON_NEGATIVE_NUMBER)
    # evaluation, checkpoints, randomness
    eval_interval: int = option(100, "steps between validation-loss measurements", POSITIVE)
    eval_batches: int = option(8, "held-out batches per validation measurement", POSITIVE)
    checkpoint_interval: int = option(100, "steps between checkpoints (also saved at the end and on Ctrl-C)",
                                      POSITIVE)
    seed: int = option(1337, "seed of the weights, the batches and dropout", NON_NEGATIVE)
    workers: int = option(0, "threads that each run a shard of every batch (0 = one per core, see "
                          "parallel.default_workers; 1 = one stream, BLAS threads as set)", NON_NEGATIVE)

    def __post_init__(self):
        validate(self)
        if self.min_lr > self.lr:
            raise TinygenError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        self.model_config(self.vocab_size)  # n_embd % n_head: GPTConfig's check
        if self.n_expert and self.moe_every > self.n_layer:  # GPTConfig allows it (a model cut short has none)
            raise TinygenError(f"TrainConfig.moe_every ({self.moe_every}) must be at most n_layer ({self.n_layer}): "
                               "with n_expert > 0 at least one block must have experts")

    @property
    def decay_steps(self) -> int:
        """The step where the cosine schedule reaches min_lr: lr_decay_steps, else max_steps."""
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    def model_config(self, vocab_size: int) -> GPTConfig:
        try:
            return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                             n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, dtype=self.dtype,
                             n_expert=self.n_expert, expert_top_k=self.expert_top_k, moe_every=self.moe_every,
                             aux_loss_coef=self.aux_loss_coef, capacity_factor=self.capacity_factor)
        except TinygenError as e:
            raise TinygenError(str(e).replace("GPTConfig.", "TrainConfig.")) from None

    def lr_at(self, step: int) -> float:
        """Warm-up then cosine decay (tinygen.optim.lr_at); a warm-up longer than the decay is cut to it."""
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup_steps=min(self.warmup_steps, self.decay_steps),
                     max_steps=self.decay_steps)


# Presets are overrides of TrainConfig and DataConfig fields.
class TrainingDiverged(TinygenError):
    """The loss or the gradients became NaN or infinite."""


class TrainResult(NamedTuple):
    step: int  # steps completed
    interrupted: bool  # stopped early by Ctrl-C (a checkpoint was saved)
    train_loss: Optional[float]  # of the last step
    val_loss: Optional[float]  # of the last evaluation
    elapsed_s: float  # training time, summed over resumed segments


def evaluate(model, batches) -> float:
    """Mean loss of `model` over the held-out batches [(x, y)], no dropout, no gradients."""
    return float(np.mean([model.loss(x, y) for x, y in batches]))


def train(model, batches: Callable, config: TrainConfig, run_dir, *, val_batches=(), trainable=None,
          resume: bool = False, save_weights: Optional[Callable] = None, progress=None,
          log: Callable = print) -> TrainResult:
    """Train `model` in place from step 0 (or from RUN_DIR's checkpoint if `resume`) to config.max_steps.

    batches(step) -> (x, y): (B*A, T) int arrays, targets -1 where ignored.
    val_batches: fixed [(x, y)] for the validation loss (empty: no evaluation).
    trainable: None (all), a predicate on names, or a set of names; the other
      parameters are frozen and not saved in the train state.
    save_weights(run_dir): writes the weights at a checkpoint (default:
      model.save_pretrained, i.e. config.json + model.safetensors).
    progress: a Progress, or None for the default one on stderr; False for none.
    log(message): where one-off messages (evaluations, Ctrl-C) go.
    Raises TrainingDiverged (naming the step) on a NaN or inf loss or gradient,
    RunDirBusy if another process is writing run_dir (tinygen.plumbing.lock),
    WriteError (naming the checkpoint kept) if a file cannot be written.

    The worker threads' BLAS setting and the Ctrl-C handler are restored
    when it returns; malloc's thresholds are raised once per process, as by
    every tinygen computation (tinygen.plumbing.memory; TINYGEN_MALLOC=default
    opts out).
    """
    run_dir = os.fspath(run_dir)
    # one writer per run directory (run_lock creates it; RunDirBusy names the other's pid; a
    # caller that holds the lock already passes through), and a failed write says what is kept
    reuse_freed_memory_by_default()
    with run_lock(run_dir), report_kept(run_dir):
        save_weights = save_weights or (lambda directory: model.save_pretrained(directory))
        with Workers(config.workers or default_workers(config.batch_size)) as workers:
            opt = AdamW(model.params, lr=config.lr, betas=(config.beta1, config.beta2),
                        weight_decay=config.weight_decay, trainable=trainable, workers=workers)
            return _loop(model=model, opt=opt, workers=workers, batches=batches, config=config,
                         run_dir=run_dir, val_batches=val_batches, resume=resume, save_weights=save_weights,
                         progress=progress, log=log)


def _loop(*, model, opt, workers, batches, config, run_dir, val_batches, resume, save_weights, progress, log):
    """train()'s loop, given the optimizer and the worker threads (the ones the optimizer uses too)."""
    start, elapsed0, saved_workers = _start(model=model, opt=opt, run_dir=run_dir, resume=resume)
    metrics = MetricsLog(os.path.join(run_dir, METRICS))
    if progress is None:
        progress = Progress(total=config.max_steps, desc="step", unit="step", start=start)
    elif progress is False:
        progress = Progress(total=config.max_steps, enabled=False)
    say = progress.write if progress.enabled else log
    if saved_workers is not None and saved_workers != workers.n:
        say(f"note: resuming on {workers.n} worker threads, the checkpoint was trained on {saved_workers}: "
            f"same training, other rounding (and dropout masks), so not bit-identical to an uninterrupted run")

    def save(step, elapsed):
        _save(run_dir=run_dir, step=step, model=model, opt=opt, config=config, elapsed=elapsed,
              save_weights=save_weights)

    train_loss = val_loss = None
    if start == 0 and val_batches:
        val_loss = evaluate(model, val_batches)
        metrics.append({"step": 0, "tokens": 0, "train_loss": None, "val_loss": val_loss, "lr": None,
                        "grad_norm": None, "tokens_per_sec": None, "elapsed_s": elapsed0})
        say(f"step 0: val loss {val_loss:.4f}")
    t_start, done, interrupted = time.perf_counter(), start, False
    with _stop_on_sigint(say) as stop:
        for step in range(start, config.max_steps):
            t0 = time.perf_counter()
            lr = config.lr_at(step)
            measured = {}  # the step's auxiliary losses and the parts' measurements (the experts' load)
            with np.errstate(over="ignore", invalid="ignore"):  # non-finite values are caught just below
                train_loss = accumulate_grads(model, opt, batches(step), workers=workers, config=config, step=step,
                                              measured=measured)
                norm = opt.grad_norm()
            if not (math.isfinite(train_loss) and math.isfinite(norm)):
                progress.close()
                raise TrainingDiverged(_diverged(step=step + 1, loss=train_loss, norm=norm, run_dir=run_dir))
            # the gradients accumulate_grads summed into the optimizer's buffer, clipped inside the update
            # (the bits of opt.clip_grads then opt.step, one pass over memory fewer)
            opt.step(lr=lr, grad_scale=clip_coef(norm, config.grad_clip) if config.grad_clip > 0 else 1.0)
            dt, done = time.perf_counter() - t0, step + 1
            is_eval = bool(val_batches) and (done % config.eval_interval == 0 or done == config.max_steps)
            if is_eval:
                val_loss = evaluate(model, val_batches)
                say(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
            elapsed = elapsed0 + time.perf_counter() - t_start
            metrics.append({"step": done, "tokens": done * config.tokens_per_step, "train_loss": train_loss,
                            "val_loss": val_loss if is_eval else None, "lr": lr, "grad_norm": norm,
                            "tokens_per_sec": config.tokens_per_step / dt, "elapsed_s": elapsed, **measured})
            progress.update(done, loss=round(train_loss, 4), **{"tok/s": format_rate(config.tokens_per_step / dt)})
            interrupted = stop.is_set()
            if interrupted or done % config.checkpoint_interval == 0 or done == config.max_steps:
                save(done, elapsed)
            if interrupted:
                say(f"interrupted: checkpoint of step {done} saved in {run_dir}")
                break
        if done == start and not os.path.isfile(os.path.join(run_dir, TRAIN_STATE)):
            save(start, elapsed0)  # max_steps 0: still leave a loadable run directory
        progress.close()
    return TrainResult(done, interrupted, train_loss, val_loss, elapsed0 + time.perf_counter() - t_start)


def _start(*, model, opt, run_dir, resume):
    """-> (first step, elapsed seconds so far, the checkpoint's worker count or None):
    restore RUN_DIR's checkpoint when resuming.

    The metrics log keeps the rows up to the checkpoint's step (a resumed log
    then equals an uninterrupted one); a fresh start begins a new log.
    """
    state_path, metrics_path = os.path.join(run_dir, TRAIN_STATE), os.path.join(run_dir, METRICS)
    if resume and os.path.isfile(state_path):
        start, elapsed, saved_workers = _restore(model=model, opt=opt, path=state_path)
        truncate_after(metrics_path, start)
        return start, elapsed, saved_workers
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    return 0, 0.0, None


def _save(*, run_dir, step, model, opt, config, elapsed, save_weights):
    """A checkpoint: weights first, then the train state (the commit point), then loss.svg
    (and expert_load.svg when the metrics hold the experts' load)."""
    save_weights(run_dir)
    params = {n: model.params[n] for n in opt.names}
    info = {"seed": config.seed, "elapsed_s": elapsed, "tokens": step * config.tokens_per_step,
            "workers": opt.workers.n}  # the resolved count: --workers 0 depends on the machine
    save_train_state(os.path.join(run_dir, TRAIN_STATE), step, params, opt.state_dict(), info)
    rows = read_metrics(os.path.join(run_dir, METRICS))
    write_loss_svg(os.path.join(run_dir, LOSS_SVG), rows)
    if any("expert_load" in row for row in rows):
        write_expert_load_svg(os.path.join(run_dir, EXPERT_LOAD_SVG), rows)


def _diverged(*, step, loss, norm, run_dir) -> str:
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
    last = checkpoint_step(run_dir)
    last = "none saved yet" if last is None else f"step {last}"
    return (f"step {step}: the {what} is {value}; stopped without updating. The last checkpoint "
            f"({last}) is intact; try a lower --lr or --grad-clip")


def accumulate_grads(model, opt, batch, *, workers, config, step, measured: Optional[dict] = None) -> float:
    """One step's gradient, summed over its shards into the optimizer's gradient buffer
    (`opt.sum_grads`); returns the step's loss.

    The step's loss is the mean over the A micro-batches of each one's mean
    over its counted positions (targets != -1). A shard holding n_s of its
    micro-batch's n counted positions therefore has weight n_s / n / A: the
    loss is the sum of weight * shard loss, the gradient the sum of the
    shards' gradients of weight * shard loss. W shards of one micro-batch
    run at once, on the W threads of `workers`.
    measured: a dict that receives, when the model reports any, "lm_loss" and
    "aux_loss" (the step's loss without its auxiliary losses, and those alone,
    same weights) and the parts' measurements ({metric: {name: value}}, each the
    same weighted mean over the shards: the experts' "expert_load").
    """
    x, y = batch
    if x.shape != y.shape or x.shape[0] != config.batch_size * config.grad_accum:
        raise TinygenError(f"batches({step}) gave x {x.shape}, y {y.shape}; expected both "
                           f"({config.batch_size * config.grad_accum}, T) = batch_size * grad_accum rows")
    B, A = config.batch_size, config.grad_accum
    shards = shard_rows(B, workers.n)  # rows of a micro-batch
    trainable = opt.names

    def run(shard):  # -> (weighted loss, grads of the weighted loss, weighted aux loss, weight, stats)
        index, rows, weight = shard
        rng = np.random.default_rng([config.seed, STREAM_DROPOUT, step, index])  # this shard's dropout masks
        stats = {}
        loss, grads, aux = model.loss_and_grads(x[rows], y[rows], rng, scale=weight, return_aux=True, stats=stats,
                                                workers=1)  # this thread is one of the shards already
        grads = {n: grads[n] for n in trainable}  # frozen ones' are dropped now
        return weight * float(loss), grads, weight * sum(aux.values()), weight, stats

    total, reports = 0.0, []
    for a in range(A):
        micro = slice(a * B, (a + 1) * B)
        weights = [w / A for w in shard_weights(y[micro], shards)]  # of the step's mean over A micro-batches
        jobs = [(a * len(shards) + i, slice(a * B + rows.start, a * B + rows.stop), w)
                for i, (rows, w) in enumerate(zip(shards, weights))]  # (shard index in the step, rows, weight)
        results = workers.map(run, jobs)
        total += sum(r[0] for r in results)
        opt.sum_grads([r[1] for r in results], accumulate=a > 0)
        reports += [r[2:] for r in results]
    if measured is not None and any(aux or stats for aux, _, stats in reports):
        aux = sum(r[0] for r in reports)
        measured.update({"lm_loss": total - aux, "aux_loss": aux},
                        **weighted_stats([w for _, w, _ in reports], [s for _, _, s in reports]))
    return total


def _restore(*, model, opt, path):
    """Load RUN_DIR/train_state.safetensors into the model's params and the optimizer."""
    state = load_train_state(path)
    names = set(opt.names)
    if set(state.params) != names:
        missing, extra = sorted(names - set(state.params)), sorted(set(state.params) - names)
        raise TinygenError(f"{path}: its parameters do not match the trainable ones "
                           f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, value in state.params.items():
        if value.shape != model.params[name].shape or value.dtype != model.params[name].dtype:
            raise TinygenError(f"{path}: {name!r} is {value.dtype}{list(value.shape)}, the model's is "
                               f"{model.params[name].dtype}{list(model.params[name].shape)}")
        model.params[name][...] = value  # in place: the optimizer holds views
    opt.load_state_dict(state.optimizer)
    if opt.t != state.step:
        raise TinygenError(f"{path}: optimizer step {opt.t} differs from the checkpoint's step {state.step}")
    return state.step, float(state.info.get("elapsed_s", 0.0)), state.info.get("workers")


@contextlib.contextmanager
def _stop_on_sigint(say):
    """First Ctrl-C: set the event (the loop saves and stops after this step); second: abort."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        say("Ctrl-C: saving a checkpoint after this step (press Ctrl-C again to abort without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
