"""The training loop, shared by pretraining and fine-tuning.

One step, for step = start .. max_steps - 1:

    x, y      = batches(step)                          (B*A, T) ids; y = -1 is ignored
    for each of the A micro-batches:                   A = grad_accum
        split its B rows into W shards                 W = workers, run at once (parallel.py)
        loss, g = model.loss_and_grads(x, y, rng, scale=w)    w: the shard's share of the step's loss
        summed into AdamW's flat grad buffer           = the gradient of the mean over the A micro-batches
    norm      = clip_grad_norm(grads, grad_clip)       NaN or inf here -> stop, no update
    AdamW.step(grads, lr_at(step))
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
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np

from .checkpoint import (LOSS_SVG, METRICS, TRAIN_STATE, checkpoint_step, load_train_state, report_kept,
                         save_train_state)
from .config import GPTConfig
from .data import STREAM_DROPOUT
from .errors import TinygenError
from .plumbing.lock import run_lock
from .plumbing.memory import reuse_freed_memory
from .plumbing.metrics import MetricsLog, read_metrics, truncate_after
from .loss import IGNORE
from .optim import AdamW, clip_grad_norm, global_norm, lr_at
from .plumbing.parallel import Workers, default_workers, ranges
from .plumbing.plot import write_loss_svg
from .plumbing.progress import Progress, format_rate


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes; defaults are the `small` preset."""

    # model (vocab_size: the tokenizer's target size when one is trained)
    vocab_size: int = 2048
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    dtype: str = "float32"
    # optimization
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1600
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    lr_decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # evaluation, checkpoints, randomness
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 100
    seed: int = 1337
    workers: int = 0  # threads, each running a shard of the batch; 0: one per core (parallel.default_workers)

    def __post_init__(self):
        positive = ["vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size", "grad_accum",
                    "eval_interval", "eval_batches", "checkpoint_interval"]
        non_negative = ["max_steps", "warmup_steps", "seed", "workers"]
        for name in positive + non_negative + ["lr_decay_steps"]:
            value = getattr(self, name)
            if name == "lr_decay_steps" and value is None:
                continue
            low = 1 if name in positive else 0
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                kind = "a positive" if low else "a non-negative"
                raise TinygenError(f"TrainConfig.{name} must be {kind} integer, got {value!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "dropout", "beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise TinygenError(f"TrainConfig.{name} must be a non-negative number, got {value!r}")
        if self.min_lr > self.lr:
            raise TinygenError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        for name in ("beta1", "beta2"):
            if not getattr(self, name) < 1:
                raise TinygenError(f"TrainConfig.{name} must be below 1, got {getattr(self, name)!r}")
        self.model_config(self.vocab_size)  # n_embd % n_head, dropout < 1, dtype: GPTConfig's checks

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
                             n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, dtype=self.dtype)
        except TinygenError as e:
            raise TinygenError(str(e).replace("GPTConfig.", "TrainConfig.")) from None

    def lr_at(self, step: int) -> float:
        """Warm-up then cosine decay (tinygen.optim.lr_at); a warm-up longer than the decay is cut to it."""
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup_steps=min(self.warmup_steps, self.decay_steps),
                     max_steps=self.decay_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig(**{**asdict(self), **changes})


HELP = {
    "vocab_size": "size of the BPE vocabulary to train, <|endoftext|> included",
    "block_size": "context length T: tokens the model sees at once",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block (must divide --n-embd)",
    "n_embd": "width of the residual stream",
    "dropout": "dropout probability while training (0 = off)",
    "dtype": "float32 or float64 parameters and activations",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches summed into each optimizer step",
    "max_steps": "optimizer steps to train to (with --resume: continue up to this step)",
    "lr": "peak learning rate, reached after the warm-up",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear warm-up from lr/(warmup+1) to lr (cut to the decay's length if longer)",
    "lr_decay_steps": "step where the cosine decay reaches min_lr; None means --max-steps, fixed when the run starts",
    "weight_decay": "AdamW decoupled weight decay of the 2-D weights",
    "beta1": "AdamW first-moment decay",
    "beta2": "AdamW second-moment decay",
    "grad_clip": "clip the global gradient norm to this (0 = no clipping)",
    "eval_interval": "steps between validation-loss measurements",
    "eval_batches": "held-out batches per validation measurement",
    "checkpoint_interval": "steps between checkpoints (also saved at the end and on Ctrl-C)",
    "seed": "seed of the weights, the batches and dropout",
    "workers": "threads that each run a shard of every batch (0 = one per core; 1 = one stream, BLAS threads as set)",
}

# Presets are overrides of TrainConfig and DataConfig fields.
PRESETS = {
    # seconds: for tests and a first look
    "tiny": dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64, batch_size=8,
                 max_steps=60, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=20, eval_batches=2,
                 checkpoint_interval=20, corpus_bytes=300_000, tokenizer_bytes=300_000),
    # the default: about 4 minutes on 2 cores (the TrainConfig/DataConfig defaults)
    "small": dict(),
}


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
    """
    run_dir = os.fspath(run_dir)
    # issue 17: one writer per run directory (RunDirBusy names the other's pid), and a failed
    # write (WriteError) says which checkpoint is kept. Re-apply as one `with` around the body.
    with run_lock(run_dir), report_kept(run_dir):
        reuse_freed_memory()  # a step's large temporaries are reused, not re-mapped: see memory.py
        save_weights = save_weights or (lambda directory: model.save_pretrained(directory))
        with Workers(config.workers or default_workers(config.batch_size)) as workers:
            opt = AdamW(model.params, lr=config.lr, betas=(config.beta1, config.beta2),
                        weight_decay=config.weight_decay, trainable=trainable, workers=workers)
            return _train(model, opt, workers, batches, config, run_dir, val_batches, resume, save_weights,
                          progress, log)


def _train(model, opt, workers, batches, config, run_dir, val_batches, resume, save_weights, progress, log):
    """train()'s loop, given the optimizer and the worker threads."""
    start, elapsed0, saved_workers = _start(model, opt, run_dir, resume)
    metrics = MetricsLog(os.path.join(run_dir, METRICS))
    if progress is None:
        progress = Progress(total=config.max_steps, desc="step", unit="step", start=start)
    elif progress is False:
        progress = Progress(total=config.max_steps, enabled=False)
    say = progress.write if progress.enabled else log
    if saved_workers is not None and saved_workers != workers.n:
        say(f"note: resuming on {workers.n} worker threads, the checkpoint was trained on {saved_workers}: "
            f"same training, other rounding (and dropout masks), so not bit-identical to an uninterrupted run")
    save = lambda step, elapsed: _save(run_dir, step, model, opt, config, elapsed, save_weights)  # noqa: E731

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
            with np.errstate(over="ignore", invalid="ignore"):  # non-finite values are caught just below
                train_loss = accumulate_grads(model, opt, workers, batches(step), config, step)
                if config.grad_clip > 0:
                    norm = clip_grad_norm(opt.grad_buffer, config.grad_clip, workers)
                else:
                    norm = global_norm(opt.grad_buffer, workers)
            if not (math.isfinite(train_loss) and math.isfinite(norm)):
                progress.close()
                raise TrainingDiverged(_diverged(step + 1, train_loss, norm, run_dir))
            opt.step(opt.grads, lr)
            dt, done = time.perf_counter() - t0, step + 1
            is_eval = bool(val_batches) and (done % config.eval_interval == 0 or done == config.max_steps)
            if is_eval:
                val_loss = evaluate(model, val_batches)
                say(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
            elapsed = elapsed0 + time.perf_counter() - t_start
            metrics.append({"step": done, "tokens": done * config.tokens_per_step, "train_loss": train_loss,
                            "val_loss": val_loss if is_eval else None, "lr": lr, "grad_norm": norm,
                            "tokens_per_sec": config.tokens_per_step / dt, "elapsed_s": elapsed})
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


def _start(model, opt, run_dir, resume):
    """-> (first step, elapsed seconds so far, the checkpoint's worker count or None):
    restore RUN_DIR's checkpoint when resuming.

    The metrics log keeps the rows up to the checkpoint's step (a resumed log
    then equals an uninterrupted one); a fresh start begins a new log.
    """
    state_path, metrics_path = os.path.join(run_dir, TRAIN_STATE), os.path.join(run_dir, METRICS)
    if resume and os.path.isfile(state_path):
        start, elapsed, saved_workers = _restore(model, opt, state_path)
        truncate_after(metrics_path, start)
        return start, elapsed, saved_workers
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    return 0, 0.0, None


def _save(run_dir, step, model, opt, config, elapsed, save_weights):
    """A checkpoint: weights first, then the train state (the commit point), then loss.svg."""
    save_weights(run_dir)
    params = {n: model.params[n] for n in opt.names}
    info = {"seed": config.seed, "elapsed_s": elapsed, "tokens": step * config.tokens_per_step,
            "workers": opt.workers.n}  # the resolved count: --workers 0 depends on the machine
    save_train_state(os.path.join(run_dir, TRAIN_STATE), step, params, opt.state_dict(), info)
    write_loss_svg(os.path.join(run_dir, LOSS_SVG), read_metrics(os.path.join(run_dir, METRICS)))


def _diverged(step, loss, norm, run_dir) -> str:
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
    last = checkpoint_step(run_dir)
    last = "none saved yet" if last is None else f"step {last}"
    return (f"step {step}: the {what} is {value}; stopped without updating. The last checkpoint "
            f"({last}) is intact; try a lower --lr or --grad-clip")


def accumulate_grads(model, opt, workers, batch, config, step) -> float:
    """One step's gradient, summed over its shards into opt.grads; returns the step's loss.

    The step's loss is the mean over the A micro-batches of each one's mean
    over its counted positions (targets != -1). A shard holding n_s of its
    micro-batch's n counted positions therefore has weight n_s / n / A: the
    loss is the sum of weight * shard loss, the gradient the sum of the
    shards' gradients of weight * shard loss. W shards of one micro-batch
    run at once, on W threads.
    """
    x, y = batch
    if x.shape != y.shape or x.shape[0] != config.batch_size * config.grad_accum:
        raise TinygenError(f"batches({step}) gave x {x.shape}, y {y.shape}; expected both "
                           f"({config.batch_size * config.grad_accum}, T) = batch_size * grad_accum rows")
    B, A = config.batch_size, config.grad_accum
    shards = ranges(B, min(workers.n, B))  # (start, stop) rows of a micro-batch

    def run(shard):  # -> (weighted loss, grads of the weighted loss)
        index, rows, weight = shard
        rng = np.random.default_rng([config.seed, STREAM_DROPOUT, step, index])  # this shard's dropout masks
        loss, grads = model.loss_and_grads(x[rows], y[rows], rng, scale=weight)
        return weight * float(loss), {n: grads[n] for n in opt.flat.slices}  # frozen ones' are dropped now

    total = 0.0
    for a in range(A):
        counted = y[a * B:(a + 1) * B] != IGNORE  # (B, T)
        n = int(counted.sum())
        jobs = []  # (shard index in the step, rows of x and y, weight)
        for i, (lo, hi) in enumerate(shards):
            weight = int(counted[lo:hi].sum()) / n / A if n else 0.0
            jobs.append((a * len(shards) + i, slice(a * B + lo, a * B + hi), weight))
        results = workers.map(run, jobs)
        total += sum(loss for loss, _ in results)
        _sum_into(opt, [grads for _, grads in results], workers, accumulate=a > 0)
    return total


def _sum_into(opt, grads, workers, accumulate):
    """opt.grads (+)= the sum of the dicts in `grads`, each thread summing one
    contiguous range of the flat gradient buffer (the names' slices of it)."""

    def add(span):
        lo, hi = span
        for name, (start, stop) in opt.flat.slices.items():
            a, b = max(lo, start), min(hi, stop)  # the part of this name inside [lo, hi)
            if a >= b:
                continue
            target = opt.grad_buffer[a:b]
            parts = [g[name].reshape(-1)[a - start:b - start] for g in grads]
            if accumulate:
                target += parts[0]
            else:
                np.copyto(target, parts[0])
            for part in parts[1:]:
                target += part

    workers.map(add, ranges(opt.flat.size, workers.n))


def _restore(model, opt, path):
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
