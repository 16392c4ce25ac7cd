"""The optimizer: AdamW over one flat buffer, gradient clipping, the LR schedule.

Shapes: N is the number of trainable scalars, the sum of `p.size` over the
trainable parameters; every optimizer buffer below is a 1-D array of length N.

The flat buffer trick. `FlatParams` copies a dict of arrays into ONE
contiguous 1-D buffer and hands back a dict of *views* into it, one per name,
with the original shapes. Writing through a view writes the buffer and the
other way round, so the model keeps indexing `params["h.0.attn.c_attn.weight"]`
while the optimizer updates all of them with a handful of whole-buffer NumPy
operations instead of a Python loop per tensor:

    buffer:  [ wte.weight ... | h.0.attn.c_attn.weight ... | ln_f.bias ]
    views:     (V, C)            (C, 3C)                      (C,)

`AdamW` packs the trainable parameters in the order [decayed | not decayed],
so decoupled weight decay is one slice, `p[:n_decay] *= 1 - lr * wd`.

Contract:
- `AdamW(params, ...)` rebinds each trainable `params[name]` to a view into
  its flat buffer (same values, shape and dtype). From then on write
  parameters in place, `params[name][...] = value`; `step` raises if an
  entry was replaced by another array. Frozen parameters are left alone and
  get no optimizer state.
- The optimizer owns its buffers' layout; a training loop talks to it by
  name: `sum_grads([grads, ...])` sums the shards' gradient dicts into the
  flat gradient buffer (each worker thread one range of it), `grad_norm`
  measures that buffer, and `step(lr=..., grad_scale=clip_coef(norm, max_norm))`
  clips it and applies it in one pass (`clip_grads` then `step(lr=...)` gives
  the same bits in two).
  `step(grads, lr)` also takes any dict with the parameters' keys, shapes
  and dtype, copied in first; `opt.grads` is a dict of views into the
  gradient buffer, for a loop that writes gradients in place.
- Nothing is ever promoted: float32 parameters keep float32 moments.
"""
import math
from typing import Callable, Iterable, Mapping

import numpy as np

from .config import NON_NEGATIVE, number, require
from .errors import TinygenError
from .plumbing.parallel import ranges

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ adds this to the norm
CHUNK = 1 << 15  # elements per piece of an AdamW update: its five (CHUNK,) float32 slices (640 KiB)
#                  fit in a 2 MiB L2 with room to spare. One step over M's 11.5M parameters, one
#                  thread: 62 ms of CPU in pieces of 2^18 (5 MiB, past L2), 50 ms in pieces of 2^15
THREADED_CHUNK = 1 << 17  # elements per piece on worker threads: fewer NumPy calls, each of which takes the
#                          GIL back when its loop ends (two threads often wait for each other there), at the
#                          price of L2 (five 512 KiB slices are past 2 MiB). M's update on 2 threads: 29 / 22.5
#                          / 20 / 19 ms in pieces of 2^15 / 2^16 / 2^17 / 2^18; GPT-2 small's 317 / - / 207 /
#                          203 ms, 264 in pieces of 2^20


# ---------------------------------------------------------------------------
# one contiguous buffer, many named views
# ---------------------------------------------------------------------------


class FlatParams:
    """Named arrays packed into one contiguous 1-D buffer.

    `buffer` is the 1-D array; `views[name]` is `buffer[start:stop]` reshaped
    to the original shape; `slices[name]` is that (start, stop) range.

    >>> flat = FlatParams({"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)})
    >>> flat.buffer.shape, flat.slices
    ((9,), {'w': (0, 6), 'b': (6, 9)})
    >>> flat.views["b"][:] = 7; flat.buffer[6:]     # a view writes the buffer
    array([7., 7., 7.], dtype=float32)
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], order: Iterable[str] | None = None):
        names = list(arrays) if order is None else list(order)
        missing = [n for n in names if n not in arrays]
        if missing:
            raise TinygenError(f"FlatParams: order names {missing} that are not in the arrays")
        dtypes = {np.asarray(arrays[n]).dtype for n in names}
        if len(dtypes) > 1:
            raise TinygenError(
                f"FlatParams: all arrays must share one dtype, got {sorted(map(str, dtypes))}"
            )
        dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        self.shapes = {n: np.shape(arrays[n]) for n in names}
        self.slices, start = {}, 0
        for n in names:
            stop = start + math.prod(self.shapes[n])
            self.slices[n] = (start, stop)
            start = stop
        self.buffer = np.empty(start, dtype=dtype)  # (N,)
        self.views = self.views_of(self.buffer)
        for n in names:
            self.views[n][...] = arrays[n]

    @property
    def size(self) -> int:
        return self.buffer.size

    def views_of(self, buffer: np.ndarray) -> dict[str, np.ndarray]:
        """Views with this layout into another (N,) buffer: gradients, moments."""
        assert buffer.shape == self.buffer.shape, (buffer.shape, self.buffer.shape)
        return {
            n: buffer[start:stop].reshape(self.shapes[n])
            for n, (start, stop) in self.slices.items()
        }

    def zeros(self) -> np.ndarray:
        """A fresh (N,) buffer of zeros with this layout's dtype."""
        return np.zeros(self.buffer.shape, self.buffer.dtype)  # calloc: cheap until touched

    def flatten(self, arrays: Mapping[str, np.ndarray], out: np.ndarray | None = None,
                what: str = "arrays") -> np.ndarray:
        """Copy a dict with this layout's names, shapes and dtype into an (N,) buffer.

        Extra names in `arrays` are ignored; a missing name, another shape or
        another dtype is a TinygenError naming `what` and the key.
        """
        out = self.zeros() if out is None else out
        for n, (start, stop) in self.slices.items():
            if n not in arrays:
                raise TinygenError(f"{what} has no entry {n!r}; expected one for every trainable parameter")
            a = arrays[n]
            if np.shape(a) != self.shapes[n]:
                raise TinygenError(f"{what}[{n!r}] has shape {np.shape(a)}, expected {self.shapes[n]}")
            if a.dtype != self.buffer.dtype:
                raise TinygenError(
                    f"{what}[{n!r}] has dtype {a.dtype}, expected {self.buffer.dtype} like the parameters"
                )
            out[start:stop] = a.reshape(-1)
        return out


def _name_predicate(trainable, params: Mapping) -> Callable[[str], bool]:
    """None -> every name; a callable -> itself; a collection of names -> membership."""
    if trainable is None:
        return lambda name: True
    if callable(trainable):
        return trainable
    names = set(trainable)
    unknown = sorted(names - set(params))
    if unknown:
        raise TinygenError(f"trainable names {unknown} are not parameters of the model")
    return names.__contains__


# ---------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------


class AdamW:
    """AdamW (Loshchilov & Hutter) with decoupled weight decay, as torch.optim.AdamW.

    One step, t = t + 1, over the flat buffers p, g, m, v of length N:

        p[:n_decay] *= 1 - lr * weight_decay         # decoupled decay, 2-D weights only
        m = m + (1 - beta1) * (g - m)                # = beta1 m + (1 - beta1) g
        v = beta2 * v + (1 - beta2) * g * g
        bias_correction1 = 1 - beta1 ** t
        bias_correction2 = 1 - beta2 ** t
        step_size = lr / bias_correction1
        denom = sqrt(v) / sqrt(bias_correction2) + eps
        p -= step_size * m / denom

    which is the textbook p -= lr * mhat / (sqrt(vhat) + eps) with the
    bias-corrected moments mhat = m / bias_correction1 and
    vhat = v / bias_correction2, since sqrt(v) / sqrt(bias_correction2) =
    sqrt(vhat). The order of operations is torch's `_single_tensor_adam`
    (AdamW = Adam with decoupled decay), so results agree to float rounding.

    Every element's update depends on that element alone, so the buffers are
    updated in cache-sized pieces of CHUNK elements (a whole-buffer op per
    line would stream all of p, g, m, v through memory ~15 times) and, given
    `workers` (tinygen.plumbing.parallel.Workers), in one contiguous range per
    thread, in pieces of THREADED_CHUNK. The result is the same bits either way.

    `trainable`: None (all), a predicate on the name, or a collection of names.
    `decay(name, p)`: which trainable parameters get weight decay; by default
    those with 2 or more dimensions (matrices and embeddings, not biases or
    layer norm gains).
    """

    def __init__(self, params: dict, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1,
                 decay: Callable[[str, np.ndarray], bool] = lambda name, p: p.ndim >= 2,
                 trainable=None, workers=None):
        beta1, beta2 = betas
        for label, value, check in [("lr", lr, number(0.0)), ("beta1", beta1, number(0.0, 1.0, high_open=True)),
                                    ("beta2", beta2, number(0.0, 1.0, high_open=True)),
                                    ("eps", eps, number(0.0, low_open=True)),
                                    ("weight_decay", weight_decay, number(0.0))]:
            require(f"AdamW {label}", value, check)
        self.params, self.lr, self.betas = params, float(lr), (float(beta1), float(beta2))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        is_trainable = _name_predicate(trainable, params)
        names = [n for n in params if is_trainable(n)]
        decayed = [n for n in names if decay(n, params[n])]
        self.decayed = set(decayed)
        self.frozen = [n for n in params if not is_trainable(n)]
        self.n_decay = sum(params[n].size for n in decayed)  # p[:n_decay] gets weight decay

        self.flat = FlatParams(params, order=decayed + [n for n in names if n not in self.decayed])
        params.update(self.flat.views)  # the caller's dict now holds views into flat.buffer
        self.m = self.flat.zeros()  # (N,) first moment
        self.v = self.flat.zeros()  # (N,) second moment
        self.t = 0  # number of steps taken
        self.grad_buffer = self.flat.zeros()  # (N,) gradients, accumulated or gathered by step
        self.grads = self.flat.views_of(self.grad_buffer)
        self.workers = workers  # a Workers to spread the update over threads, or None

    @property
    def names(self) -> list[str]:
        """Trainable parameter names, in buffer order."""
        return list(self.flat.slices)

    def zero_grad(self) -> None:
        """Zero `grads` (the views into `grad_buffer`) before accumulating a step."""
        self.grad_buffer.fill(0)

    def sum_grads(self, shard_grads: list, *, accumulate: bool = False) -> None:
        """The gradient buffer (+)= the sum of the dicts in `shard_grads`.

        Each dict holds a gradient per trainable name (its shape and dtype;
        other names are ignored), e.g. one per batch shard. accumulate=False
        overwrites the buffer (a step's first micro-batch), True adds to it
        (the next ones). Each worker thread sums one contiguous range of the
        buffer, for every parameter overlapping it the same range of each
        dict's flattened array; every element gets the same additions in the
        same order whatever the thread count, so the bits do not depend on it.
        """
        if not shard_grads:
            raise TinygenError("sum_grads needs at least one dict of gradients")
        for grads in shard_grads:
            for name, shape in self.flat.shapes.items():
                g = grads.get(name)
                if g is None or g.shape != shape or g.dtype != self.flat.buffer.dtype:
                    got = "nothing" if g is None else f"{g.dtype}{list(g.shape)}"
                    raise TinygenError(f"sum_grads: the gradient of {name!r} is {got}, expected "
                                       f"{self.flat.buffer.dtype}{list(shape)} like the parameter")

        def add(span):
            lo, hi = span
            for name, (start, stop) in self.flat.slices.items():
                a, b = max(lo, start), min(hi, stop)  # the part of this name inside [lo, hi)
                if a >= b:
                    continue
                target = self.grad_buffer[a:b]
                parts = [g[name].reshape(-1)[a - start:b - start] for g in shard_grads]
                if accumulate:
                    target += parts[0]
                else:
                    np.copyto(target, parts[0])
                for part in parts[1:]:
                    target += part

        _map(self.workers, add, ranges(self.flat.size, self._threads))

    def grad_norm(self) -> float:
        """The global norm of the gradient buffer (`global_norm`), summed on the worker threads."""
        return global_norm(self.grad_buffer, self.workers)

    def clip_grads(self, max_norm: float) -> float:
        """Clip the gradient buffer in place to global norm `max_norm` (`clip_grad_norm`, on the
        worker threads); returns the norm before clipping."""
        return clip_grad_norm(self.grad_buffer, max_norm, self.workers)

    def step(self, grads: Mapping[str, np.ndarray] | None = None, lr: float | None = None,
             grad_scale: float = 1.0) -> None:
        """One AdamW update of every trainable parameter, in place.

        `grads`: None or `self.grads` for the gradient buffer as it stands
        (summed by `sum_grads` or written through the `grads` views), or any
        dict with the trainable names, which is first copied into it.
        `grad_scale`: multiply the gradient buffer by this first, in place, piece
        by piece inside the update: clipping without a pass of its own over memory,
        `opt.step(grad_scale=clip_coef(opt.grad_norm(), max_norm))` (the training
        loop) leaves the same bits as `opt.clip_grads(max_norm); opt.step()`.
        """
        lr = self.lr if lr is None else float(lr)
        grad_scale = float(grad_scale)
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise TinygenError(f"AdamW step grad_scale must be a positive finite number, got {grad_scale!r}")
        self._check_params_are_views()
        if grads is not None and grads is not self.grads:
            self.flat.flatten(grads, out=self.grad_buffer, what="grads")
        self.t += 1
        _map(self.workers, lambda span: self._update(*span, lr, grad_scale), ranges(self.flat.size, self._threads))

    @property
    def _threads(self) -> int:
        return 1 if self.workers is None else self.workers.n

    def _update(self, start: int, stop: int, lr: float, grad_scale: float = 1.0) -> None:
        """The update of elements [start, stop) of the flat buffers, CHUNK at a time
        (THREADED_CHUNK on worker threads)."""
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1**self.t
        bias_correction2 = 1 - beta2**self.t
        step_size = lr / bias_correction1
        decay = 1 - lr * self.weight_decay
        chunk = CHUNK if self._threads == 1 else THREADED_CHUNK
        scratch = np.empty(min(chunk, stop - start), dtype=self.flat.buffer.dtype)  # this thread's, one piece
        # (a whole (N,) scratch buffer would be one more copy of the model: 497 MB on GPT-2 small)
        for lo in range(start, stop, chunk):
            hi = min(lo + chunk, stop)
            p, g, m, v = (a[lo:hi] for a in (self.flat.buffer, self.grad_buffer, self.m, self.v))
            tmp = scratch[:hi - lo]
            if grad_scale != 1.0:
                g *= grad_scale  # clipping (clip_coef), as clip_grad_norm's g *= coef
            if self.weight_decay and lo < self.n_decay:  # the decayed parameters come first
                p[: self.n_decay - lo] *= decay

            np.subtract(g, m, out=tmp)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            tmp *= 1 - beta1
            m += tmp
            np.multiply(g, 1 - beta2, out=tmp)  # torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            tmp *= g
            v *= beta2
            v += tmp

            denom = np.sqrt(v, out=tmp)
            denom /= math.sqrt(bias_correction2)
            denom += self.eps
            update = np.divide(m, denom, out=tmp)  # torch: param.addcdiv_(exp_avg, denom, -step_size)
            update *= step_size
            p -= update

    def _check_params_are_views(self) -> None:
        for n, view in self.flat.views.items():
            if self.params.get(n) is not view:
                raise TinygenError(
                    f"params[{n!r}] was replaced after AdamW was built, so the optimizer no longer "
                    f"updates it; write parameters in place (params[name][...] = value) or build "
                    f"the optimizer after loading them"
                )

    # -- checkpoints --------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state as named arrays (copies), ready for safetensors.

        Keys: `m.{name}` and `v.{name}` per trainable parameter, with its
        shape and dtype, and `t`, the step count, as an int64 array of shape
        (1,). Per-parameter keys are easy to inspect and survive a change of
        buffer order; frozen parameters have no entries.
        """
        state = {"t": np.array([self.t], dtype=np.int64)}
        for prefix, buffer in (("m", self.m), ("v", self.v)):
            for n, view in self.flat.views_of(buffer).items():
                state[f"{prefix}.{n}"] = view.copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `state_dict()` output; the set of trainable names must match."""
        expected = {"t"} | {f"{k}.{n}" for k in "mv" for n in self.flat.slices}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise TinygenError(
                f"optimizer state does not match the trainable parameters: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        t = np.asarray(state["t"])
        if t.size != 1 or not np.issubdtype(t.dtype, np.integer) or int(t.reshape(-1)[0]) < 0:
            raise TinygenError(f"optimizer state 't' must be one non-negative integer, got {t!r}")
        m, v = self.flat.zeros(), self.flat.zeros()  # all checked before anything changes
        for prefix, buffer in (("m", m), ("v", v)):
            arrays = {n: np.asarray(state[f"{prefix}.{n}"]) for n in self.flat.slices}
            arrays = {n: a.astype(buffer.dtype, copy=False) for n, a in arrays.items()}
            self.flat.flatten(arrays, out=buffer, what=f"optimizer state '{prefix}'")
        self.m[...], self.v[...], self.t = m, v, int(t.reshape(-1)[0])


# ---------------------------------------------------------------------------
# gradient clipping
# ---------------------------------------------------------------------------


def _pieces(grads, workers) -> list[list[np.ndarray]]:
    """The gradient arrays (or views of them), one list per thread: a contiguous
    buffer is cut into one range per worker, anything else stays one list."""
    if isinstance(grads, np.ndarray) and grads.flags.c_contiguous:
        flat = grads.reshape(-1)  # (N,), a view
        n = 1 if workers is None else workers.n
        return [[flat[lo:hi]] for lo, hi in ranges(flat.size, n)]
    return [[grads] if isinstance(grads, np.ndarray) else list(grads.values())]


def _map(workers, fn, items) -> list:
    """[fn(item) for item in items], on the worker threads when there are any."""
    return [fn(item) for item in items] if workers is None else workers.map(fn, items)


def global_norm(grads: Mapping[str, np.ndarray] | np.ndarray, workers=None) -> float:
    """sqrt(sum over every gradient element of g**2), accumulated in float64.

    `workers` (tinygen.plumbing.parallel.Workers) splits a flat buffer between threads.

    >>> global_norm({"a": np.array([3.0], np.float32), "b": np.array([[4.0]], np.float32)})
    5.0
    """

    def sum_of_squares(arrays):
        # einsum casts in small chunks: float64 products and sums, no full-size copy
        # (reshape copies only an array that is not contiguous)
        return sum(float(np.einsum("i,i->", g.reshape(-1), g.reshape(-1), dtype=np.float64)) for g in arrays)

    return math.sqrt(sum(_map(workers, sum_of_squares, _pieces(grads, workers))))


def clip_coef(norm: float, max_norm: float) -> float:
    """What clipping multiplies the gradients by: max_norm / (norm + 1e-6) when that is < 1, else 1.

    1 for a non-finite norm too (there is nothing sensible to scale by; the
    caller decides whether to skip the step). 0 < max_norm is required.

    >>> clip_coef(5.0, 1.0), clip_coef(0.5, 1.0), clip_coef(float("nan"), 1.0)
    (0.199999960000008, 1.0, 1.0)
    """
    if not max_norm > 0:
        raise TinygenError(f"the clipping norm max_norm must be > 0, got {max_norm!r}")
    coef = max_norm / (norm + CLIP_EPS)
    return coef if math.isfinite(norm) and coef < 1 else 1.0


def clip_grad_norm(grads: Mapping[str, np.ndarray] | np.ndarray, max_norm: float, workers=None) -> float:
    """Scale all gradients in place so their global norm is at most `max_norm`.

    As torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6) and,
    when coef < 1, every gradient is multiplied by coef (in its own dtype).
    Gradients already within the limit are left untouched. Returns the norm
    *before* clipping. A non-finite norm (inf or NaN) leaves the gradients as
    they are: the caller decides whether to skip the step. `workers` as in
    global_norm.

    >>> g = {"w": np.array([3.0, 4.0], np.float32)}
    >>> clip_grad_norm(g, 1.0), g["w"].round(5)       # scaled by 1 / (5 + 1e-6)
    (5.0, array([0.6, 0.8], dtype=float32))
    """
    total_norm = global_norm(grads, workers)
    coef = clip_coef(total_norm, max_norm)
    if coef < 1:

        def scale(arrays):
            for g in arrays:
                g *= coef  # in place, also through a transposed or sliced view

        _map(workers, scale, _pieces(grads, workers))
    return total_norm


# ---------------------------------------------------------------------------
# learning rate schedule
# ---------------------------------------------------------------------------


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for `step` (0-based): nanoGPT's `get_lr`, warm-up then cosine.

        step < warmup_steps:          lr * (step + 1) / (warmup_steps + 1)
        warmup_steps <= step <= max:  min_lr + coeff * (lr - min_lr),
                                      coeff = 0.5 * (1 + cos(pi * decay_ratio)),
                                      decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
        step > max_steps:             min_lr

    So step 0 already moves (lr / (warmup + 1)), the peak lr is reached at
    step == warmup_steps, and min_lr at step == max_steps. If warmup_steps ==
    max_steps there is no decay phase and every step from there on is min_lr.

    >>> [round(lr_at(s, lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=8), 4) for s in (0, 4, 6, 8, 9)]
    [0.2, 1.0, 0.55, 0.1, 0.1]
    """
    for label, value in (("step", step), ("warmup_steps", warmup_steps), ("max_steps", max_steps)):
        require(f"lr_at {label}", value, NON_NEGATIVE)
    if warmup_steps > max_steps:
        raise TinygenError(f"lr_at warmup_steps ({warmup_steps}) must be <= max_steps ({max_steps})")
    if not 0 <= min_lr <= lr:
        raise TinygenError(f"lr_at needs 0 <= min_lr <= lr, got min_lr={min_lr!r}, lr={lr!r}")
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)  # in [0, 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)
