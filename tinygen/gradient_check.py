"""Gradient checking: every backward pass against central finite differences.

For a function L(x) with a scalar value, the central difference

    dL/dx_i ~ (L(x - 2h) - 8 L(x - h) + 8 L(x + h) - L(x + 2h)) / (12 h)

(each shift along coordinate i only) has truncation error O(h^4) and a
rounding error of about ulp(L) / h. The plain two-point formula
(L(x + h) - L(x - h)) / (2h) errs by O(h^2) times the third derivative,
which is large here: at GPT-2's init the layer norms see inputs of scale
0.02, so their derivatives grow like 50^k. On a whole small model with h = 1e-4
the five-point stencil agrees to ~1e-9; the two-point one reaches only ~2e-7
at its best h (an isolated layer does better). An
array-valued layer out = f(x) is reduced to a scalar with the surrogate
loss L = sum(out * dout) for a random dout: its gradient is exactly what
`backward(dout, cache)` returns (llm.c's trick).

The error of one entry is

    |analytic - numeric| / max(|analytic|, |numeric|, FLOOR * G)

where G is the largest numeric gradient of the whole check. Entries far
smaller than G are judged against 1% of it, because finite differences
cannot resolve them more finely than the noise above (a relative error on a
gradient of exactly 0, like the key bias's, would measure rounding alone).
For the same reason the floor is never below ABS_FLOOR = 1e-5: when every
gradient of a check is ~0 (a degenerate model), entries are compared in
absolute terms, and passing means |analytic - numeric| < 1e-11.
A tensor passes when its largest error is below THRESHOLD.
See docs/gradcheck.md.
"""
import numpy as np

EPS = 1e-4
FLOOR = 1e-2
ABS_FLOOR = 1e-5  # below this a gradient is compared in absolute terms (|a - n| < 1e-11 passes)
THRESHOLD = 1e-6


def pick_coords(shape, max_coords, rng):
    """Flat indices to check: all of them for small tensors, else a random subset."""
    n = int(np.prod(shape))
    if n <= max_coords:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_coords, replace=False))


def numerical_gradient(f, x, coords, eps=EPS):
    """Five-point central differences of scalar f() w.r.t. x.flat[coords].

    x is perturbed in place, one entry at a time, and restored exactly.
    """
    flat = x.reshape(-1)  # a view: x must be contiguous
    assert np.shares_memory(flat, x), "numerical_gradient needs a contiguous array"
    grad = np.empty(len(coords))
    for j, i in enumerate(coords):
        old = flat[i]
        f_at = []
        for step in (-2, -1, 1, 2):
            flat[i] = old + step * eps
            f_at.append(f())
        flat[i] = old
        grad[j] = (f_at[0] - 8 * f_at[1] + 8 * f_at[2] - f_at[3]) / (12 * eps)
    return grad


def relative_errors(analytic: dict, numeric: dict) -> dict:
    """Max relative error per tensor, each entry floored at FLOOR * the largest numeric gradient."""
    scale = max((np.abs(n).max() for n in numeric.values() if n.size), default=0.0)
    floor = max(FLOOR * scale, ABS_FLOOR)
    errors = {}
    for name, n in numeric.items():
        a = analytic[name]
        denom = np.maximum(np.maximum(np.abs(a), np.abs(n)), floor)
        errors[name] = float(np.max(np.abs(a - n) / denom)) if n.size else 0.0
    return errors


def gradcheck(f, inputs: dict, grads: dict, max_coords=64, seed=0, eps=EPS) -> dict:
    """Compare `grads` (analytic, by name) with finite differences of scalar `f()`.

    f reads the float64 arrays in `inputs`, which are perturbed in place one
    entry at a time (and restored). Tensors larger than `max_coords` entries
    are checked at a random subset of coordinates. Returns {name: max
    relative error}.

        x = np.array([1.0, 2.0]);  f = lambda: float(np.sum(x ** 3))
        gradcheck(f, {"x": x}, {"x": 3 * x ** 2})   # {'x': ~1e-10}
    """
    rng = np.random.default_rng(seed)
    analytic, numeric = {}, {}
    for name, x in inputs.items():
        if x.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 inputs; {name!r} is {x.dtype}")
        g = np.asarray(grads[name])
        if g.shape != x.shape:
            raise ValueError(f"gradient of {name!r} has shape {g.shape}, expected {x.shape}")
        coords = pick_coords(x.shape, max_coords, rng)
        numeric[name] = numerical_gradient(f, x, coords, eps)
        analytic[name] = g.reshape(-1)[coords]
    return relative_errors(analytic, numeric)


def check_layer(forward, backward, args, kwargs=None, names=None, max_coords=64, seed=0) -> dict:
    """Gradient-check a forward/backward pair with the surrogate loss sum(out * dout).

    `args` are forward's positional arguments; the floating-point ones are
    converted to float64 and checked, in order, against what
    `backward(dout, cache)` returns (integer arguments such as token ids are
    passed through). Returns {name: max relative error}.

        check_layer(gelu_forward, gelu_backward, [np.random.randn(3, 4)])  # {'x': ~1e-10}
    """
    kwargs = kwargs or {}
    rng = np.random.default_rng(seed)
    args = [np.array(a, dtype=np.float64) if _is_float(a) else a for a in args]
    float_idx = [i for i, a in enumerate(args) if _is_float(a)]
    names = names or [f"arg{i}" for i in float_idx]
    out, cache = forward(*args, **kwargs)
    dout = rng.standard_normal(np.shape(out))
    grads = backward(dout, cache)
    if len(grads) != len(float_idx):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(float_idx)} float inputs")

    def f():
        return float(np.sum(forward(*args, **kwargs)[0] * dout))

    inputs = {name: args[i] for name, i in zip(names, float_idx)}
    return gradcheck(f, inputs, dict(zip(names, grads)), max_coords, seed + 1)


def _is_float(a):
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"


def check_model(model, idx, targets, max_coords=16, seed=0, names=None) -> dict:
    """Gradient-check `model.loss_and_grads` for every parameter (or those in `names`).

    The model must be float64 (GPTConfig(dtype="float64")) and dropout-free.
    Returns {parameter name: max relative error}.
    """
    if model.config.dtype != "float64":
        raise ValueError("check_model needs a float64 model: GPTConfig(..., dtype='float64')")
    _, grads = model.loss_and_grads(idx, targets)
    names = list(model.params) if names is None else names
    inputs = {k: model.params[k] for k in names}
    return gradcheck(lambda: model.loss(idx, targets), inputs, grads, max_coords, seed)


def check_part(part, x, params, name, ctx, max_coords=64, seed=0) -> dict:
    """Gradient-check a model part (tinygen.parts.Part) with the surrogate loss

        sum(out * dout) + ctx.aux_scale * (the auxiliary losses the forward appends to ctx.aux)

    x: the part's input, float64 (or integer ids for an embed part: no dx is checked);
    params: float64 arrays by name, the part's among them; ctx: a tinygen.parts.Context.
    A ctx.rng is rewound to its current state before every forward, so dropout
    masks stay the same. Returns {"x": error, parameter name: error, ...} for the
    input and every parameter the part returned a gradient for.

        check_part(MLP, x, params, "h.0.mlp", make_context(config))   # {'x': ~1e-10, 'h.0.mlp.c_fc.weight': ...}
    """
    ctx = ctx._replace(aux=[])
    state = None if ctx.rng is None else ctx.rng.bit_generator.state

    def forward():
        if state is not None:
            ctx.rng.bit_generator.state = state
        ctx.aux.clear()
        return part.forward(x, params, name, ctx)

    out, cache = forward()
    dout = np.random.default_rng(seed).standard_normal(np.shape(out))
    dx, grads = part.backward(dout, cache)

    def f():
        out, _ = forward()
        return float(np.sum(out * dout)) + ctx.aux_scale * sum(value for _, value in ctx.aux)

    inputs = {k: params[k] for k in grads}
    if _is_float(x):
        inputs, grads = {"x": x, **inputs}, {"x": dx, **grads}
    return gradcheck(f, inputs, grads, max_coords, seed + 1)
