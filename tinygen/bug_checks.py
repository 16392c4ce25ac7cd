"""Which check catches which bug: gradient checks, oracle comparisons and properties, run for real.

Three kinds of check look at tinygen from different sides:

    gradcheck  each layer pair, a block and a whole small model against finite
               differences (tinygen.gradient_check): is the backward the
               derivative of the forward?
    oracle     tinygen against a second, independent float64 implementation
               written here from the textbook formulas (picoGPT-style forward,
               Adam's update): does the forward compute GPT-2?
    property   invariants that need no second implementation: causality,
               float32 stability, dropout keeping the mean, the size of Adam's
               first step, a duplicated batch giving the same gradient.

`run_checks()` runs all of them against tinygen as it is, which is how
`tinygen gradcheck --break NAME` runs them with a bug injected
(tinygen.bugs.inject). The gradient checks are `tinygen gradcheck`'s own
table (tinygen.gradient_check.layer_cases and block_check), whose layer
functions are module globals of tinygen.gradient_check read at each call,
and everything else calls tinygen through module attributes, so an injected
bug is the one that runs. Shapes: B batch, T time, C width, H heads, D head width,
V vocabulary.
"""
import math
from typing import NamedTuple

import numpy as np

from . import attention, layers, optim
from .bugs import BUGS, get, inject
from .config import GPTConfig
from .gpt import GPT
from .gradient_check import THRESHOLD, block_check, check_layer, check_model, layer_cases

ORACLE_TOLERANCE = 1e-9  # float64 implementations of the same formulas agree to ~1e-14
CONFIG = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")


class Outcome(NamedTuple):
    kind: str  # "gradcheck", "oracle" or "property"
    name: str  # the row: "embedding: w", "logits vs reference forward", ...
    caught: bool  # True when the check fails, i.e. it catches a bug
    detail: str  # "max rel err 3e-01", "holds", "fails at position 2", ...


def small_model(seed=0):
    """A small float64 GPT whose matrices are 10x GPT-2's init scale, so every term matters
    (at std 0.02 the attention is uniform and GELU nearly linear, and bugs hide)."""
    m = GPT(CONFIG, seed=seed)
    for name, p in m.params.items():
        if p.ndim == 2:
            p *= 10.0
        elif name.endswith(".bias"):
            p += np.random.default_rng([seed, len(name)]).normal(0.0, 0.1, p.shape)
    return m


def small_batch(seed=0, B=2):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, CONFIG.vocab_size, (B, CONFIG.block_size))
    idx[0, :3] = idx[-1, 0]  # repeated ids: the embedding's scatter must add them up
    return idx, rng.integers(0, CONFIG.vocab_size, (B, CONFIG.block_size))


# ---------------------------------------------------------------- gradient checks
def gradcheck_rows(seed=0, max_coords=16):
    """[(row name, max rel error)]: the rows of `tinygen gradcheck` (every layer pair of
    tinygen.gradient_check.layer_cases, the transformer block), then the whole model."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in layer_cases(rng):
        errors = check_layer(case.forward, case.backward, case.args, case.kwargs, case.names, max_coords, seed)
        rows += [(f"{case.name}: {n}", e) for n, e in errors.items()]
    rows += [(f"transformer block: {n}", e) for n, e in block_check(rng, max_coords=max_coords, seed=seed).items()]
    m = small_model(seed)
    idx, targets = small_batch(seed)
    errors = check_model(m, idx, targets, max_coords, seed)
    return rows + [(f"GPT (whole model): {n}", e) for n, e in errors.items()]


def gradcheck_outcomes(seed=0, max_coords=16, shown=3):
    """Failing rows one by one (at most `shown` per layer, the rest summed up), the passing ones as one row."""
    rows = gradcheck_rows(seed, max_coords)
    out, failing = [], {}
    for name, err in rows:
        if not err < THRESHOLD:
            failing.setdefault(name.split(":")[0], []).append((name, err))
    for layer, bad in failing.items():
        out += [Outcome("gradcheck", name, True, f"max rel err {err:.0e}") for name, err in bad[:shown]]
        if len(bad) > shown:
            worst = max(err for _, err in bad[shown:])
            out.append(Outcome("gradcheck", f"{layer}: {len(bad) - shown} more tensors", True, f"max rel err {worst:.0e}"))
    passed = [err for _, err in rows if err < THRESHOLD]
    if passed:
        label = f"{len(passed)} {'other ' if failing else ''}rows (layers, block, whole model)"
        out.append(Outcome("gradcheck", label, False, f"pass (every error < {THRESHOLD:g})"))
    return out


# ---------------------------------------------------------------- oracles
def reference_logits(params, idx, config):
    """GPT-2's forward from the textbook, in float64, sharing no code with tinygen's layers."""
    def ln(x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * params[name + ".weight"] + params[name + ".bias"]

    def fc(x, name):
        return x @ params[name + ".weight"] + params[name + ".bias"]

    B, T = idx.shape
    H, D = config.n_head, config.n_embd // config.n_head
    x = params["wte.weight"][idx] + params["wpe.weight"][:T]  # (B, T, C)
    future = np.triu(np.ones((T, T), dtype=bool), 1)
    for i in range(config.n_layer):
        h = f"h.{i}."
        q, k, v = np.split(fc(ln(x, h + "ln_1"), h + "attn.c_attn"), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, D).transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, D)
        s = np.where(future, -np.inf, q @ k.transpose(0, 1, 3, 2) / math.sqrt(D))
        p = np.exp(s - s.max(-1, keepdims=True))
        y = (p / p.sum(-1, keepdims=True)) @ v
        x = x + fc(y.transpose(0, 2, 1, 3).reshape(B, T, H * D), h + "attn.c_proj")
        u = fc(ln(x, h + "ln_2"), h + "mlp.c_fc")
        x = x + fc(0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3))), h + "mlp.c_proj")
    return ln(x, "ln_f") @ params["wte.weight"].T  # (B, T, V)


def reference_adamw(p, grads, lr, betas, eps, weight_decay):
    """Adam's textbook update with decoupled weight decay, one step per gradient in `grads`."""
    (b1, b2), m, v = betas, np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p = p * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def max_rel(got, want):
    """max |got - want| / max |want|: one number for a whole tensor."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return math.inf
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def oracle_outcomes(seed=0):
    m = small_model(seed)
    idx, targets = small_batch(seed)
    want = reference_logits(m.params, idx, m.config)
    got = m.forward(idx, workers=1)
    out = [("logits vs the reference forward", max_rel(got, want))]
    logp = want - want.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ref_loss = -np.take_along_axis(logp, targets[..., None], -1).mean()
    out.append(("loss vs the reference cross-entropy", max_rel(m.loss(idx, targets, workers=1), ref_loss)))
    rng = np.random.default_rng(seed)
    p0, grads = rng.standard_normal((4, 3)), [rng.standard_normal((4, 3)) for _ in range(3)]
    params = {"w": p0.copy()}
    opt = optim.AdamW(params, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g in grads:
        opt.step({"w": g})
    out.append(("3 AdamW steps vs Adam's textbook update", max_rel(params["w"], reference_adamw(p0, grads, 0.1, (0.9, 0.95), 1e-8, 0.1))))
    return [Outcome("oracle", name, True, f"max rel err {err:.0e}") if not err < ORACLE_TOLERANCE
            else Outcome("oracle", name, False, f"agrees (< {ORACLE_TOLERANCE:g})") for name, err in out]


# ---------------------------------------------------------------- properties
def causality(seed=0):
    """Changing the tokens after position t leaves every logit at positions <= t unchanged."""
    m = small_model(seed)
    idx, _ = small_batch(seed)
    logits = m.forward(idx, workers=1)
    for t in range(CONFIG.block_size - 1):
        other = idx.copy()
        other[:, t + 1:] = (other[:, t + 1:] + 1) % CONFIG.vocab_size
        if max_rel(m.forward(other, workers=1)[:, :t + 1], logits[:, :t + 1]) > ORACLE_TOLERANCE:
            return f"fails: position {t} sees a later token"
    return None


def float32_attention_is_finite(seed=0):
    """float32 attention with scores of a few hundred gives finite outputs (exp overflows past 88)."""
    qkv = (10.0 * np.random.default_rng(seed).standard_normal((2, 6, 3 * 8))).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        y, _ = attention.causal_attention_forward(qkv, 2)
    bad = int(np.sum(~np.isfinite(y)))
    return f"fails: {bad} of {y.size} outputs are inf or NaN" if bad else None


def dropout_keeps_the_mean(seed=0):
    """E[dropout(x)] = x: the mean of dropout(ones) with p = 0.5 over 100k entries is 1 to within 1%."""
    out, _ = layers.dropout_forward(np.ones((200, 500)), 0.5, np.random.default_rng(seed))
    mean = float(out.mean())
    return f"fails: the mean is {mean:.3f}" if abs(mean - 1.0) > 0.01 else None


def adam_first_step_is_lr(seed=0):
    """Adam's first step (no weight decay) moves every weight by lr: mhat / sqrt(vhat) = sign(g)."""
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 3))}
    before = params["w"].copy()
    opt = optim.AdamW(params, lr=0.01, weight_decay=0.0)
    opt.step({"w": rng.standard_normal((4, 3))})
    moved = np.abs(params["w"] - before)
    return f"fails: the first step moves weights by {moved.mean() / 0.01:.2f} lr" if max_rel(moved, np.full_like(moved, 0.01)) > 1e-6 else None


def duplicated_batch_same_gradient(seed=0):
    """The loss is a mean over positions, so the batch [row, row] has the same gradients as [row].
    In one stream (workers=1): two shards of one row each would be [row] twice, hiding a bug
    that mixes up the batch's size."""
    m = small_model(seed)
    idx, targets = small_batch(seed, B=1)
    _, one = m.loss_and_grads(idx, targets, workers=1)
    _, two = m.loss_and_grads(np.repeat(idx, 2, 0), np.repeat(targets, 2, 0), workers=1)
    for name in one:
        if max_rel(two[name], one[name]) > ORACLE_TOLERANCE:
            return f"fails: {name} differs"
    return None


PROPERTIES = [
    ("causality of the logits", causality),
    ("float32 attention stays finite", float32_attention_is_finite),
    ("dropout keeps the mean", dropout_keeps_the_mean),
    ("Adam's first step moves each weight by lr", adam_first_step_is_lr),
    ("a duplicated batch has the same gradient", duplicated_batch_same_gradient),
]


def property_outcomes(seed=0):
    out = []
    for name, prop in PROPERTIES:
        failure = prop(seed)
        out.append(Outcome("property", name, failure is not None, failure or "holds"))
    return out


# ---------------------------------------------------------------- running and reporting
def run_checks(seed=0, max_coords=16):
    """Every check against tinygen as it is now (with whatever bug is injected): [Outcome]."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return gradcheck_outcomes(seed, max_coords) + oracle_outcomes(seed) + property_outcomes(seed)


def format_outcomes(outcomes):
    lines = [f"  {'check':<10} {'row':<46} {'verdict':<8} result", "  " + "-" * 92]
    for o in outcomes:
        lines.append(f"  {o.kind:<10} {o.name:<46} {'CATCHES' if o.caught else 'misses':<8} {o.detail}")
    return "\n".join(lines)


def caught_by(outcomes):
    """'caught by: gradcheck, property; missed by: oracle' (a kind misses when none of its rows catches)."""
    kinds = list(dict.fromkeys(o.kind for o in outcomes))
    caught = [k for k in kinds if any(o.caught for o in outcomes if o.kind == k)]
    missed = [k for k in kinds if k not in caught]
    return f"caught by: {', '.join(caught) or 'nothing'}; missed by: {', '.join(missed) or 'nothing'}"


def bug_report(name, seed=0, max_coords=16):
    """The text `tinygen gradcheck --break NAME` prints: the bug, then every check run with it injected."""
    bug = get(name)
    with inject(name):
        outcomes = run_checks(seed, max_coords)
    return "\n".join([
        f"bug: {bug.name}: {bug.title}",
        f"  buggy:   {bug.code}",
        f"  correct: {bug.fix}",
        f"  why:     {bug.why}",
        f"  exercise: {bug.exercise} (tinygen exercises check DIR {bug.exercise} reports {bug.tensor})",
        "every check, run with the bug injected:",
        format_outcomes(outcomes),
        caught_by(outcomes),
    ]), outcomes


def catalogue_text():
    """The `--break list` table: name and what is wrong."""
    width = max(len(b.name) for b in BUGS)
    lines = [f"{b.name:<{width}}  {b.title}" for b in BUGS]
    return "\n".join(lines + ["", "tinygen gradcheck --break NAME injects one and runs every check against it."])


def run_break(name, seed=0) -> int:
    """`tinygen gradcheck --break NAME|list`: prints the catalogue or one bug's report; 0 when it is caught."""
    if name == "list":
        print(catalogue_text())
        return 0
    text, outcomes = bug_report(name, seed)
    print(text)
    return 0 if any(o.caught for o in outcomes) else 1
