"""Gradient checking: every backward pass against central finite differences.

For a function L(x) with a scalar value, the central difference

    dL/dx_i ~ (L(x - 2h) - 8 L(x - h) + 8 L(x + h) - L(x + 2h)) / (12 h)

(each shift along coordinate i only) has truncation error O(h^4) and a
rounding error of about ulp(L) / h. The plain two-point formula
(L(x + h) - L(x - h)) / (2h) errs by O(h^2) times the third derivative,
which is large here: at GPT-2's init the layer norms see inputs of scale
0.02, so their derivatives grow like 50^k. On a whole small model with h = 1e-4
the five-point stencil agrees to ~1e-9; the two-point one reaches only ~2e-7
at its best h (an isolated layer does better). The step has a limit: a
layer norm varies on the scale of its input row's spread, 1 / rstd, and
when a narrow row's entries nearly coincide (n_embd 2 or 3) rstd nears
1/sqrt(1e-5) = 316 and the truncation error at this h reaches ~1e-5; such
points need a smaller `eps` (tests/test_model.py draws around them). An
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

The second half of the module is the table of what is checked: every layer
pair with inputs (`layer_cases`), one transformer block, a whole model (causal,
and bidirectional with a masked language model's targets), a model carrying
every fine-tuning method at once, and the mixture of experts' layer, part,
block and model (inputs from tinygen.moe_check, away from routing ties).
`tinygen gradcheck`
prints it; the test suite runs the same table over hypothesis-drawn shapes.
See docs/gradcheck.md.
"""
from typing import Callable, NamedTuple

import numpy as np

from .attention import (bidirectional_attention_backward, bidirectional_attention_forward, causal_attention_backward,
                        causal_attention_forward)
from .config import GPTConfig
from .finetuning.adapters import ADAPTER, adapter_backward, adapter_forward, init_adapters
from .finetuning.lora import LoraSpec, init_lora, lora_linear, lora_linear_backward, lora_linear_forward
from .finetuning.prompt_tuning import init_prompt, prompt_backward, prompt_embed, prompt_forward
from .layers import (
    dropout_backward,
    dropout_forward,
    dropout_mask,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from .loss import IGNORE, cross_entropy_backward, cross_entropy_forward
from .gpt import GPT
from .model import block_backward, block_forward, init_params
from . import moe_check
from .parts import GPT2, make_context

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

    >>> x = np.array([1.0, 2.0])
    >>> errors = gradcheck(lambda: float(np.sum(x ** 3)), {"x": x}, {"x": 3 * x ** 2})
    >>> errors["x"] < 1e-9
    True
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

    >>> x = np.random.default_rng(0).standard_normal((3, 4))
    >>> errors = check_layer(gelu_forward, gelu_backward, [x], names=["x"])
    >>> list(errors), errors["x"] < THRESHOLD
    (['x'], True)
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

    The model must be float64 (GPTConfig(dtype="float64")) and dropout-free. Checked in
    one stream (workers=1): the math of gpt_backward, not how a batch is split over cores.
    Returns {parameter name: max relative error}.
    """
    if model.config.dtype != "float64":
        raise ValueError("check_model needs a float64 model: GPTConfig(..., dtype='float64')")
    _, grads = model.loss_and_grads(idx, targets, workers=1)
    names = list(model.params) if names is None else names
    inputs = {k: model.params[k] for k in names}
    return gradcheck(lambda: model.loss(idx, targets, workers=1), inputs, grads, max_coords, seed)


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


# ------------------------------------------------------------ the table of cases
class LayerCase(NamedTuple):
    """One layer pair and its inputs: what `check_layer` checks, a row group of `tinygen gradcheck`."""

    name: str  # the row label: "linear", "causal attention (dropout)", ...
    forward: Callable
    backward: Callable
    args: list  # forward's positional arguments; the float ones are checked
    kwargs: dict  # forward's keyword arguments (fixed dropout masks, n_head, ...)
    names: list  # the float arguments' names, in the order backward returns their gradients


def layer_cases(rng, B=2, T=5, C=8, dtype=np.float64) -> list:
    """Every layer pair of tinygen with random inputs of batch B, time T, width C.

    Inputs are chosen so every term of each backward matters: repeated ids
    (the embedding's scatter must add them), an ignored target, layer-norm
    rows spread wide enough to be well conditioned in float32, GELU inputs
    of scale 3 (both tails), dropout with fixed masks, LoRA's B nonzero.
    Floating inputs are cast to `dtype`.
    >>> [case.name for case in layer_cases(np.random.default_rng(0))][:3]
    ['linear', 'embedding', 'layernorm']
    """
    V, H = 7, 2 if C % 2 == 0 else 1  # vocabulary; heads (head width C // H)
    x = rng.standard_normal((B, T, C))
    ids = rng.integers(0, V, (B, T))
    ids.flat[1::2] = ids.flat[0]  # repeated ids must add up in the scatter
    targets = rng.integers(0, V, (B, T))
    targets.flat[-1] = IGNORE  # one ignored position
    spread = x + 3 * np.linspace(-1, 1, C)  # no nearly constant rows
    cases = [
        LayerCase("linear", linear_forward, linear_backward,
                  [x, rng.standard_normal((C, 3 * C)), rng.standard_normal(3 * C)], {}, ["x", "w", "b"]),
        LayerCase("embedding", embedding_forward, embedding_backward, [ids, rng.standard_normal((V, C))], {}, ["w"]),
        LayerCase("layernorm", layernorm_forward, layernorm_backward,
                  [spread, 1 + rng.standard_normal(C), rng.standard_normal(C)], {}, ["x", "w", "b"]),
        LayerCase("gelu", gelu_forward, gelu_backward, [3 * x], {}, ["x"]),
        LayerCase("dropout (fixed mask)", dropout_forward, dropout_backward, [x],
                  {"mask": dropout_mask(x.shape, 0.3, rng, dtype)}, ["x"]),
        LayerCase("causal attention", causal_attention_forward, causal_attention_backward,
                  [rng.standard_normal((B, T, 3 * C))], {"n_head": H}, ["qkv"]),
        LayerCase("causal attention (dropout)", causal_attention_forward, causal_attention_backward,
                  [rng.standard_normal((B, T, 3 * C))],
                  {"n_head": H, "mask": dropout_mask((B, H, T, T), 0.3, rng, dtype)}, ["qkv"]),
        LayerCase("bidirectional attention", bidirectional_attention_forward, bidirectional_attention_backward,
                  [rng.standard_normal((B, T, 3 * C))], {"n_head": H}, ["qkv"]),
        LayerCase("bidirectional attn (dropout)", bidirectional_attention_forward, bidirectional_attention_backward,
                  [rng.standard_normal((B, T, 3 * C))],
                  {"n_head": H, "mask": dropout_mask((B, H, T, T), 0.3, rng, dtype)}, ["qkv"]),
        LayerCase("cross-entropy", cross_entropy_forward, cross_entropy_backward,
                  [3 * rng.standard_normal((B, T, V)), targets], {}, ["logits"]),
        *finetuning_cases(rng, x, dtype),
    ]
    cast = lambda a: a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a  # noqa: E731
    return [case._replace(args=[cast(a) for a in case.args]) for case in cases]


def _side_stream(rng):
    """A generator of its own, derived from rng's state without advancing rng (PCG64's jump):
    cases that redraw until a condition holds (the experts') leave every other case's inputs as they were."""
    return np.random.Generator(rng.bit_generator.jumped())


def finetuning_cases(rng, x, dtype, r=3, m=4, n=2) -> list:
    """The layer pairs of the fine-tuning methods: LoRA (with and without dropout),
    adapter, prompt. x (B, T, C); rank r, bottleneck m, n virtual tokens."""
    C = x.shape[-1]
    w, b = rng.standard_normal((C, 3 * C)), rng.standard_normal(3 * C)
    A, Bm = rng.standard_normal((C, r)), rng.standard_normal((r, 3 * C))  # B nonzero, so dA is too
    lora_names = ["x", "w", "b", "lora_A", "lora_B"]
    mask = dropout_mask(x.shape, 0.3, rng, dtype)
    adapter = [rng.standard_normal((C, m)), rng.standard_normal(m), rng.standard_normal((m, C)), rng.standard_normal(C)]
    return [
        LayerCase("lora linear", lora_linear_forward, lora_linear_backward, [x, w, b, A, Bm], {"scale": 2.0}, lora_names),
        LayerCase("lora linear (dropout)", lora_linear_forward, lora_linear_backward, [x, w, b, A, Bm],
                  {"scale": 2.0, "mask": mask}, lora_names),
        LayerCase("adapter", adapter_forward, adapter_backward, [x, *adapter], {},
                  ["x", "down.weight", "down.bias", "up.weight", "up.bias"]),
        LayerCase("prompt tuning", prompt_forward, prompt_backward, [x, rng.standard_normal((n, C))], {}, ["tok", "prompt"]),
    ]


def block_check(rng, B=2, T=5, C=8, n_head=2, max_coords=64, seed=0) -> dict:
    """Check block 0's backward for its input x and all 12 parameters."""
    config = GPTConfig(vocab_size=7, block_size=T, n_layer=1, n_head=n_head, n_embd=C, dtype="float64")
    params = {k: v for k, v in init_params(config, rng).items() if k.startswith("h.0.")}
    for k in params:  # move away from the init's zeros and ones so every term matters
        params[k] = params[k] + rng.normal(0, 0.1, params[k].shape)
    names = ["x"] + list(params)

    def forward(x, *weights):
        return block_forward(x, dict(zip(names[1:], weights)), 0, make_context(config))

    def backward(dout, cache):
        dx, g = block_backward(dout, cache)
        return (dx, *(g[k] for k in names[1:]))

    x = rng.standard_normal((B, T, C))
    return check_layer(forward, backward, [x, *params.values()], names=names, max_coords=max_coords, seed=seed)


def model_check(seed=0, max_coords=16, causal=True) -> dict:
    """{param: (shape, error)} of `check_model` on a small 2-layer float64 model: every parameter.

    causal=False checks the bidirectional model (GPTConfig.causal False) with a
    masked language model's targets: the original token at a few positions, -1 elsewhere."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64", causal=causal)
    model = GPT(config, seed=seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, (2, config.block_size))
    targets = rng.integers(0, config.vocab_size, (2, config.block_size))
    if not causal:
        targets = np.where(rng.random(targets.shape) < 0.5, idx, IGNORE)  # predict the token at its own position
        targets[:, 0] = idx[:, 0]  # at least one counted position per row
    errors = check_model(model, idx, targets, max_coords, seed)
    return {n: (model.params[n].shape, e) for n, e in errors.items()}


def finetuning_model_check(seed=0, max_coords=16) -> dict:
    """{param: (shape, error)} for every fine-tuning tensor of a float64 model carrying all three
    methods at once, plus the base tensors the methods touch."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dtype="float64")
    rng = np.random.default_rng(seed)
    spec = LoraSpec(rank=2, alpha=4.0, targets=("c_attn", "c_proj", "c_fc"))
    params = init_params(config, rng)
    params.update(init_lora(params, spec, rng))
    params.update(init_adapters(config.n_layer, config.n_embd, 3, rng, np.float64))
    params.update(init_prompt(params["wte.weight"], 2, rng))
    for k in params:  # the zero-initialised halves (lora_B, adapter up) must be nonzero to test the others
        if k.endswith(("lora_B", "up.weight", "up.bias")):
            params[k] = params[k] + rng.normal(0, 0.3, params[k].shape)
    parts = GPT2._replace(linear=lora_linear(spec, GPT2.linear), branch=ADAPTER, embed=prompt_embed(GPT2.embed))
    model = GPT(config, params=params, parts=parts)
    idx = rng.integers(0, config.vocab_size, (2, 6))  # 2 virtual + 6 real positions = block_size
    targets = rng.integers(0, config.vocab_size, (2, 6))
    targets[0, :3] = IGNORE  # prompt positions of a fine-tuning batch
    names = [k for k in params if ".lora_" in k or ".adapter_" in k or k.startswith("prompt.")]
    names += ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight"]
    errors = check_model(model, idx, targets, max_coords, seed, names=names)
    return {n: (params[n].shape, e) for n, e in errors.items()}


def moe_model_check(seed=0, max_coords=16) -> dict:
    """{param: (shape, error)} for every parameter of a float64 model with experts, trained-mode
    loss (cross-entropy + aux losses, capacity on), drawn away from routing ties (tinygen.moe_check)."""
    model, idx, targets = moe_check.model_setup(seed)
    _, grads = model.loss_and_grads(idx, targets, rng=np.random.default_rng(0), workers=1)
    errors = gradcheck(lambda: moe_check.training_loss(model, idx, targets), model.params, grads, max_coords, seed)
    return {n: (model.params[n].shape, e) for n, e in errors.items()}


def all_checks(seed=0, max_coords=64) -> list:
    """[(label, {tensor: (shape or None, max relative error)})]: the whole table, as
    `tinygen gradcheck` prints it. Whole-model checks use max_coords // 4 (at least 4)."""
    rng = np.random.default_rng(seed)
    results = []
    moe_cases = [LayerCase(*case) for case in moe_check.layer_cases(_side_stream(rng), 2, 5, 8)]  # away from ties
    for case in layer_cases(rng) + moe_cases:
        errors = check_layer(case.forward, case.backward, case.args, case.kwargs, case.names, max_coords, seed)
        shapes = dict(zip(case.names, (a.shape for a in case.args if _is_float(a))))
        results.append((case.name, {n: (shapes[n], e) for n, e in errors.items()}))
    errors = block_check(rng, max_coords=max_coords, seed=seed)
    results.append(("transformer block", {n: (None, e) for n, e in errors.items()}))
    for label, setup in (("moe mlp part (training)", moe_check.part_setup),
                         ("transformer block (experts)", moe_check.block_setup)):
        part, x, params, name, ctx = setup(_side_stream(rng))
        errors = check_part(part, x, params, name, ctx, max_coords, seed)
        results.append((label, {n: ((params[n] if n in params else x).shape, e) for n, e in errors.items()}))
    model_coords = max(4, max_coords // 4)
    results.append(("GPT (whole model)", model_check(seed, model_coords)))
    results.append(("GPT, bidirectional (whole)", model_check(seed, model_coords, causal=False)))
    results.append(("GPT + LoRA/adapters/prompt", finetuning_model_check(seed, model_coords)))
    results.append(("GPT + experts (whole model)", moe_model_check(seed, model_coords)))
    return results
