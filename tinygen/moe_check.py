"""The mixture of experts' gradient-check cases, drawn away from routing ties.

Routing is piecewise constant: the chosen experts switch where two router
logits tie, and there the loss jumps. A five-point stencil moves one input by
up to 2 EPS (tinygen.gradient_check.EPS = 1e-4), which moves a logit by about
2 EPS |w|; so every case here makes sure no router logit is within
TIE_MARGIN = 200 EPS of a tie that matters (`moe.routing_margin`, ordered
because the capacity serves first choices first), redrawing its inputs until
that holds. docs/moe.md explains why this is needed and enough.

tinygen.gradient_check runs these cases in its table (`tinygen gradcheck`):
the layer with and without a capacity and with one expert (`layer_cases`),
the expert part and a block with experts in a training forward
(`part_setup`, `block_setup`), and a whole model (`model_setup`,
`training_loss`).
"""
import numpy as np

from .config import GPTConfig
from .gpt import GPT
from .loss import cross_entropy_forward
from .model import block_backward, block_forward, gpt_forward
from .moe import NAMES, ExpertMlpCache, moe_backward, moe_forward, routing_margin
from .parts import EXPERT_MLP, Part, make_context

TIE_MARGIN = 0.02  # 200 * gradient_check.EPS (that module imports this one)
TRIES = 100  # redraws; at the checks' sizes one draw misses the margin with p <= 0.6


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
    return np.concatenate([y.reshape(-1), np.array([cache.aux], dtype=y.dtype)]), cache


def moe_with_aux_backward(dout, cache):
    """moe_with_aux_forward's backward: dout (N*C + 1,) -> moe_backward's gradients, daux = dout[-1]."""
    return moe_backward(dout[:-1].reshape(cache.shape), cache, daux=dout[-1])


def layer_cases(rng, B=2, T=5, C=4) -> list:
    """[(name, forward, backward, args, kwargs, names)]: the layer with its aux loss, top-2 of 4
    experts, the same with a capacity that drops assignments, and top-1 of 1 (the dense MLP)."""
    cases = []
    for name, E, k, factor in (("moe layer (top-2 of 4)", 4, 2, None), ("moe layer (capacity 0.5)", 4, 2, 0.5),
                               ("moe layer (1 expert)", 1, 1, None)):
        args = draw_moe_layer(rng, B, T, C, E, k)
        cases.append((name, moe_with_aux_forward, moe_with_aux_backward, args,
                      {"top_k": k, "capacity_factor": factor}, ["x", *NAMES]))
    return cases


def part_setup(rng, E=3, k=2):
    """(part, x, params, name, ctx) of tinygen.parts.EXPERT_MLP in a training forward:
    capacity 0.7 (it drops), aux loss weighted 0.5 * aux_scale 1.3, for check_part."""
    config = GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=4, dtype="float64", n_expert=E,
                       expert_top_k=k, moe_every=1, capacity_factor=0.7, aux_loss_coef=0.5)
    x, *weights = draw_moe_layer(rng, C=4, E=E, top_k=k)
    params = {f"h.0.mlp.{n}": w for n, w in zip(NAMES, weights)}
    return EXPERT_MLP, x, params, "h.0.mlp", make_context(config, rng=np.random.default_rng(0), aux_scale=1.3)


BLOCK = Part(lambda x, params, name, ctx: block_forward(x, params, 0, ctx),
             lambda dout, cache: block_backward(dout, cache))  # block 0 as a part, for check_part


def block_setup(rng, B=2, T=5, C=8, n_head=2, E=4, k=2):
    """(part, x, params, name, ctx): block 0 of a model whose every block has experts, as a part,
    in a training forward (capacity 0.6, aux loss weighted 0.3 * aux_scale 0.7), weights off the init."""
    config = GPTConfig(vocab_size=7, block_size=T, n_layer=1, n_head=n_head, n_embd=C, dtype="float64",
                       n_expert=E, expert_top_k=k, moe_every=1, capacity_factor=0.6, aux_loss_coef=0.3)
    for _ in range(TRIES):
        model = GPT(config, seed=int(rng.integers(2**31)))
        params = {n: p + rng.normal(0, 0.3, p.shape) for n, p in model.params.items() if n.startswith("h.0.")}
        x = rng.standard_normal((B, T, C))
        ctx = make_context(config, rng=np.random.default_rng(0), aux_scale=0.7)
        _, cache = block_forward(x, params, 0, ctx)
        if routing_margin(np.log(cache.mlp.layer.probs), k, ordered=True) >= TIE_MARGIN:
            return BLOCK, x, params, "h.0", ctx
    raise AssertionError(f"no draw away from routing ties in {TRIES} tries")


def model_margin(model, idx) -> float:
    """The smallest ordered routing margin over every block with experts, in a training forward of idx.

    log p differs from the logits z by a per-token constant, so its gaps are z's."""
    _, cache = gpt_forward(model.params, idx, model.config, model.parts, rng=np.random.default_rng(0))
    return min(routing_margin(np.log(b.mlp.layer.probs), model.config.expert_top_k, ordered=True)
               for b in cache.blocks if isinstance(b.mlp, ExpertMlpCache))


def model_setup(seed=0, capacity_factor=0.8):
    """(model, idx, targets): a float64 model with experts in block 1 of 2 (capacity 0.8: it drops),
    every weight moved off the init (whose 0.02 scale the layer norms would amplify 50-fold into the
    router), drawn away from routing ties."""
    rng = np.random.default_rng(seed)
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                       n_expert=4, expert_top_k=2, capacity_factor=capacity_factor, aux_loss_coef=0.3)
    for _ in range(TRIES):
        model = GPT(config, seed=int(rng.integers(2**31)))
        for p in model.params.values():
            p += rng.normal(0, 0.3, p.shape)
        idx = rng.integers(0, config.vocab_size, (2, config.block_size))
        if model_margin(model, idx) >= TIE_MARGIN:
            return model, idx, rng.integers(0, config.vocab_size, (2, config.block_size))
    raise AssertionError(f"no draw away from routing ties in {TRIES} tries")


def training_loss(model, idx, targets) -> float:
    """What model.loss_and_grads(idx, targets, rng) differentiates: cross-entropy plus the aux losses
    of a training forward (an rng turns on the capacity and the aux loss; dropout stays 0)."""
    logits, cache = gpt_forward(model.params, idx, model.config, model.parts, rng=np.random.default_rng(0))
    return cross_entropy_forward(logits, targets)[0] + sum(value for _, value in cache.aux)
