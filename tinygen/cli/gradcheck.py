"""`tinygen gradcheck`: every backward pass against finite differences, as a table.

One row per input of each layer pair, then one row per parameter of a whole
small float64 model. Exit status 1 if any row fails. Learners run this first.
"""
import sys
import time

import numpy as np

from ..finetuning.adapters import adapter_backward, adapter_forward, init_adapters
from ..attention import causal_attention_backward, causal_attention_forward
from ..config import GPTConfig
from ..layers import (
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
from ..finetuning.lora import LoraSpec, init_lora, lora_linear_backward, lora_linear_forward
from ..loss import cross_entropy_backward, cross_entropy_forward
from ..model import GPT, block_backward, block_forward, init_params
from ..gradient_check import THRESHOLD, check_layer, check_model
from ..finetuning.prompt_tuning import init_prompt, prompt_backward, prompt_forward


def block_check(rng, B=2, T=5, C=8, n_head=2, max_coords=64, seed=0):
    """Check block 0's backward for its input x and all 12 parameters."""
    config = GPTConfig(vocab_size=7, block_size=T, n_layer=1, n_head=n_head, n_embd=C, dtype="float64")
    params = {k: v for k, v in init_params(config, rng).items() if k.startswith("h.0.")}
    for k in params:  # move away from the init's zeros and ones so every term matters
        params[k] = params[k] + rng.normal(0, 0.1, params[k].shape)
    names = ["x"] + list(params)

    def forward(x, *weights):
        return block_forward(x, dict(zip(names[1:], weights)), 0, n_head)

    def backward(dout, cache):
        dx, g = block_backward(dout, cache, 0)
        return (dx, *(g[k] for k in names[1:]))

    x = rng.standard_normal((B, T, C))
    return check_layer(forward, backward, [x, *params.values()], names=names, max_coords=max_coords, seed=seed)


def layer_checks(seed=0, max_coords=64):
    """[(layer, {tensor: (shape, max relative error)})] for every layer pair."""
    rng = np.random.default_rng(seed)
    B, T, C, V, H = 2, 5, 8, 7, 2
    x = rng.standard_normal((B, T, C))
    ids = rng.integers(0, V, (B, T))
    ids[0, :2] = ids[1, 0]  # repeated ids must add up in the scatter
    targets = rng.integers(0, V, (B, T))
    targets[1, 2] = -1  # one ignored position
    cases = [
        ("linear", linear_forward, linear_backward, [x, rng.standard_normal((C, 3 * C)), rng.standard_normal(3 * C)], {}, ["x", "w", "b"]),
        ("embedding", embedding_forward, embedding_backward, [ids, rng.standard_normal((V, C))], {}, ["w"]),
        ("layernorm", layernorm_forward, layernorm_backward, [x, 1 + rng.standard_normal(C), rng.standard_normal(C)], {}, ["x", "w", "b"]),
        ("gelu", gelu_forward, gelu_backward, [3 * x], {}, ["x"]),
        ("dropout (fixed mask)", dropout_forward, dropout_backward, [x], {"mask": dropout_mask(x.shape, 0.3, rng, x.dtype)}, ["x"]),
        ("causal attention", causal_attention_forward, causal_attention_backward, [rng.standard_normal((B, T, 3 * C))], {"n_head": H}, ["qkv"]),
        ("causal attention (dropout)", causal_attention_forward, causal_attention_backward, [rng.standard_normal((B, T, 3 * C))],
         {"n_head": H, "mask": dropout_mask((B, H, T, T), 0.3, rng, x.dtype)}, ["qkv"]),
        ("cross-entropy", cross_entropy_forward, cross_entropy_backward, [3 * rng.standard_normal((B, T, V)), targets], {}, ["logits"]),
        *finetune_cases(rng, x, B, T, C),
    ]
    results = []
    for layer, fwd, bwd, args, kwargs, names in cases:
        errors = check_layer(fwd, bwd, args, kwargs, names, max_coords, seed)
        shapes = {n: a.shape for n, a in zip(names, [a for a in args if a.dtype.kind == "f"])}
        results.append((layer, {n: (shapes[n], e) for n, e in errors.items()}))
    errors = block_check(rng, max_coords=max_coords, seed=seed)
    results.append(("transformer block", {n: (None, e) for n, e in errors.items()}))
    return results


def finetune_cases(rng, x, B, T, C, r=3, m=4, n=2):
    """Layer cases of the fine-tuning methods: LoRA (with and without dropout), adapter, prompt."""
    w, b = rng.standard_normal((C, 3 * C)), rng.standard_normal(3 * C)
    A, Bm = rng.standard_normal((C, r)), rng.standard_normal((r, 3 * C))  # B nonzero, so dA is too
    lora_names = ["x", "w", "b", "lora_A", "lora_B"]
    mask = dropout_mask(x.shape, 0.3, rng, x.dtype)
    adapter = [rng.standard_normal((C, m)), rng.standard_normal(m), rng.standard_normal((m, C)), rng.standard_normal(C)]
    return [
        ("lora linear", lora_linear_forward, lora_linear_backward, [x, w, b, A, Bm], {"scale": 2.0}, lora_names),
        ("lora linear (dropout)", lora_linear_forward, lora_linear_backward, [x, w, b, A, Bm],
         {"scale": 2.0, "mask": mask}, lora_names),
        ("adapter", adapter_forward, adapter_backward, [x, *adapter], {},
         ["x", "down.weight", "down.bias", "up.weight", "up.bias"]),
        ("prompt tuning", prompt_forward, prompt_backward, [x, rng.standard_normal((n, C))], {}, ["tok", "prompt"]),
    ]


def finetune_model_check(seed=0, max_coords=16):
    """('GPT + LoRA/adapters/prompt', {param: (shape, error)}): every fine-tuning tensor of a
    float64 model carrying all three methods at once, plus the base tensors the hooks touch."""
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
    model = GPT(config, params=params, lora=spec)
    idx = rng.integers(0, config.vocab_size, (2, 6))  # 2 virtual + 6 real positions = block_size
    targets = rng.integers(0, config.vocab_size, (2, 6))
    targets[0, :3] = -1  # prompt positions of a fine-tuning batch
    names = [k for k in params if ".lora_" in k or ".adapter_" in k or k.startswith("prompt.")]
    names += ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight"]
    errors = check_model(model, idx, targets, max_coords, seed, names=names)
    return "GPT + LoRA/adapters/prompt", {n: (params[n].shape, e) for n, e in errors.items()}


def model_check(seed=0, max_coords=16):
    """('GPT (whole model)', {param: (shape, error)}) for a small float64 model."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    model = GPT(config, seed=seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, (2, config.block_size))
    targets = rng.integers(0, config.vocab_size, (2, config.block_size))
    errors = check_model(model, idx, targets, max_coords, seed)
    return "GPT (whole model)", {n: (model.params[n].shape, e) for n, e in errors.items()}


def format_table(results, threshold=THRESHOLD):
    """Rows of `layer  tensor  shape  max rel error  PASS/FAIL`; returns (text, n_failed)."""
    lines = [f"{'layer':<28} {'tensor':<28} {'shape':<12} {'max rel err':>11}  result", "-" * 90]
    failed = 0
    for layer, tensors in results:
        for name, (shape, err) in tensors.items():
            ok = err < threshold
            failed += not ok
            shape_text = "x".join(map(str, shape)) if shape is not None else ""
            lines.append(f"{layer:<28} {name:<28} {shape_text:<12} {err:>11.2e}  {'pass' if ok else 'FAIL'}")
    return "\n".join(lines), failed


def add_parser(sub):
    p = sub.add_parser(
        "gradcheck",
        help="check every backward pass against finite differences",
        description="Compare every layer's hand-written backward pass, and the whole model's "
        "gradient, with five-point central finite differences in float64. Prints one row per "
        "tensor; exits 1 if any relative error reaches the threshold.",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs and checked coordinates (default: 0)")
    p.add_argument("--max-coords", type=int, default=64, help="entries checked per tensor; larger tensors get a random subset (default: 64)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help=f"largest relative error that passes (default: {THRESHOLD:g})")
    p.add_argument("--break", dest="bug", metavar="NAME", default=None,
                   help="inject a classic backprop bug and show which checks catch it; 'list' lists them (docs/bugs.md)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.bug is not None:  # the bug catalogue: tinygen/bug_checks.py
        from ..bug_checks import run_break

        return run_break(args.bug, args.seed)
    t0 = time.perf_counter()
    results = layer_checks(args.seed, args.max_coords)
    results.append(model_check(args.seed, max(4, args.max_coords // 4)))
    results.append(finetune_model_check(args.seed, max(4, args.max_coords // 4)))
    text, failed = format_table(results, args.threshold)
    print(text)
    rows = sum(len(t) for _, t in results)
    print(f"\n{rows - failed}/{rows} passed (threshold {args.threshold:g}) in {time.perf_counter() - t0:.1f}s")
    if failed:
        print(f"{failed} gradient(s) disagree with finite differences", file=sys.stderr)
    return 1 if failed else 0
