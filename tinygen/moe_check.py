"""Gradient checks of the mixture of experts: the layer, a block with experts, a whole model.

Routing is piecewise constant: the chosen experts switch where two router
logits tie, and there the loss jumps. A five-point stencil moves one input by
up to 2 EPS, which moves a logit by about 2 EPS |w|; so every check first
makes sure no router logit is within TIE_MARGIN = 200 EPS of a tie that
matters (`moe.routing_margin`, ordered when a capacity is on), redrawing its
inputs until that holds. docs/moe.md explains why this is needed and enough.
`tinygen gradcheck` prints these rows; tests/test_moe*.py assert them.
"""
import numpy as np

from .config import GPTConfig
from .gpt import GPT
from .gradient_check import EPS, check_layer, check_part, gradcheck
from .loss import cross_entropy_forward
from .model import block_backward, block_forward, gpt_forward
from .moe import NAMES, ExpertMlpCache, moe_backward, moe_forward, routing_margin
from .parts import EXPERT_MLP, Part, make_context

TIE_MARGIN = 200 * EPS
TRIES = 100  # redraws; at the checks' sizes a draw fails the margin with p <= 0.6


def draw_moe_layer(rng, B=2, T=5, C=4, E=4, top_k=2, scale=1.0):
    """A MoE layer's float64 inputs [x, router_w, router_b, fc_w, fc_b, proj_w, proj_b],
    redrawn until the ordered routing margin (valid with a capacity too) is at least TIE_MARGIN."""
    for _ in range(TRIES):
        x, router_w, router_b = rng.standard_normal((B, T, C)), rng.standard_normal((C, E)), rng.standard_normal(E)
        if routing_margin(x.reshape(-1, C) @ router_w + router_b, top_k, ordered=True) >= TIE_MARGIN:
            break
    else:
        raise AssertionError(f"no draw away from routing ties in {TRIES} tries")
    experts = [scale * rng.standard_normal(s) for s in ((E, C, 4 * C), (E, 4 * C), (E, 4 * C, C), (E, C))]
    return [x, router_w, router_b, *experts]


def moe_with_aux_forward(x, *weights, **options):
    """moe_forward with its load-balancing loss appended to the flattened output: (N*C + 1,).

    The surrogate sum(out * dout) then weighs aux by dout[-1], which is the daux
    moe_backward takes, so one check covers both paths of the gradient."""
    y, cache = moe_forward(x, *weights, **options)
    return np.concatenate([y.reshape(-1), [cache.aux]]), cache


def moe_with_aux_backward(dout, cache):
    """moe_with_aux_forward's backward: dout (N*C + 1,) -> moe_backward's gradients, daux = dout[-1]."""
    return moe_backward(dout[:-1].reshape(cache.shape), cache, daux=dout[-1])


def model_margin(params, idx, config, parts, rng_seed=0) -> float:
    """The smallest ordered routing margin over every block with experts, in a training forward of idx."""
    _, cache = gpt_forward(params, idx, config, parts, rng=np.random.default_rng(rng_seed))
    margins = [routing_margin(np.log(b.mlp.layer.probs), config.expert_top_k, ordered=True)
               for b in cache.blocks if isinstance(b.mlp, ExpertMlpCache)]
    return min(margins)


def layer_checks(rng, max_coords=64, seed=0):
    """[(row, {tensor: (shape, error)})]: the layer, top-2 of 4 experts with and without a capacity
    that drops assignments, and top-1 of 1 (the dense MLP); the aux loss's gradient included."""
    results = []
    for label, E, k, factor in (("moe layer (top-2 of 4)", 4, 2, None),
                                ("moe layer (capacity 0.5)", 4, 2, 0.5),
                                ("moe layer (1 expert)", 1, 1, None)):
        args = draw_moe_layer(rng, E=E, top_k=k)
        options = {"top_k": k, "capacity_factor": factor}
        names = ["x", *NAMES]
        errors = check_layer(moe_with_aux_forward, moe_with_aux_backward, args, options, names, max_coords, seed)
        results.append((label, {n: (a.shape, errors[n]) for n, a in zip(names, args)}))
    return results


BLOCK = Part(lambda x, params, name, ctx: block_forward(x, params, 0, ctx),
             lambda dout, cache: block_backward(dout, cache))  # block 0 as a part, for check_part


def block_check(rng, B=2, T=5, C=8, n_head=2, E=4, k=2, capacity_factor=0.6, max_coords=64, seed=0):
    """('transformer block (experts)', {tensor: (shape, error)}): block 0 of a model whose every
    block has experts, in a training forward (capacity on, aux loss weighted by ctx.aux_scale)."""
    config = GPTConfig(vocab_size=7, block_size=T, n_layer=1, n_head=n_head, n_embd=C, dtype="float64",
                       n_expert=E, expert_top_k=k, moe_every=1, capacity_factor=capacity_factor, aux_loss_coef=0.3)
    params = {}
    for _ in range(TRIES):
        model = GPT(config, seed=int(rng.integers(2**31)))
        params = {n: p + rng.normal(0, 0.3, p.shape) for n, p in model.params.items() if n.startswith("h.0.")}
        x = rng.standard_normal((B, T, C))
        ctx = make_context(config, rng=np.random.default_rng(0), aux_scale=0.7)
        _, cache = block_forward(x, params, 0, ctx)
        if routing_margin(np.log(cache.mlp.layer.probs), k, ordered=True) >= TIE_MARGIN:
            break
    else:
        raise AssertionError(f"no draw away from routing ties in {TRIES} tries")
    errors = check_part(BLOCK, x, params, "h.0", ctx, max_coords, seed)
    shapes = {"x": x.shape, **{n: p.shape for n, p in params.items()}}
    return "transformer block (experts)", {n: (shapes[n], e) for n, e in errors.items()}


def model_check(seed=0, max_coords=16, capacity_factor=0.8):
    """('GPT + experts (whole model)', {param: (shape, error)}): every parameter of a float64
    model with experts in block 1 of 2, trained-mode loss = cross-entropy + the aux losses."""
    rng = np.random.default_rng(seed)
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                       n_expert=4, expert_top_k=2, capacity_factor=capacity_factor, aux_loss_coef=0.3)
    for _ in range(TRIES):
        model = GPT(config, seed=int(rng.integers(2**31)))
        for name, p in model.params.items():  # away from the init's 0.02 scale, whose layer norms
            p += rng.normal(0, 0.3, p.shape)    # would amplify a step 50-fold into the router
        idx = rng.integers(0, config.vocab_size, (2, config.block_size))
        if model_margin(model.params, idx, config, model.parts) >= TIE_MARGIN:
            break
    else:
        raise AssertionError(f"no draw away from routing ties in {TRIES} tries")
    targets = rng.integers(0, config.vocab_size, (2, config.block_size))

    def loss():  # a training forward: the rng turns on the capacity and the aux loss (dropout is 0)
        logits, cache = gpt_forward(model.params, idx, config, model.parts, rng=np.random.default_rng(0))
        return cross_entropy_forward(logits, targets)[0] + sum(value for _, value in cache.aux)

    _, grads = model.loss_and_grads(idx, targets, rng=np.random.default_rng(0))
    errors = gradcheck(loss, model.params, grads, max_coords, seed)
    return "GPT + experts (whole model)", {n: (model.params[n].shape, e) for n, e in errors.items()}


def part_check(rng, max_coords=64, seed=0):
    """('moe mlp part (training)', ...): tinygen.parts.EXPERT_MLP as a part, capacity and aux on."""
    config = GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=4, dtype="float64", n_expert=3,
                       expert_top_k=2, moe_every=1, capacity_factor=0.7, aux_loss_coef=0.5)
    x, *weights = draw_moe_layer(rng, C=4, E=3, top_k=2)
    params = {f"h.0.mlp.{n}": w for n, w in zip(NAMES, weights)}
    ctx = make_context(config, rng=np.random.default_rng(0), aux_scale=1.3)
    errors = check_part(EXPERT_MLP, x, params, "h.0.mlp", ctx, max_coords, seed)
    shapes = {"x": x.shape, **{n: p.shape for n, p in params.items()}}
    return "moe mlp part (training)", {n: (shapes[n], e) for n, e in errors.items()}
