"""Golden fixtures: tinygen's numbers, in files any language can read, to test another implementation.

    tinygen fixtures --out DIR [--seed N] [--dtype float64|float32]

    DIR/manifest.json                   every case: its file, inputs, expected values, tolerance, doc
    DIR/layers/<case>.safetensors       each layer pair of gradient_check.layer_cases: inputs (parameters
                                        and fixed dropout masks included), out, dout, grad.<input>
    DIR/block.safetensors               one transformer block, the same
    DIR/model.safetensors               the whole model: ids, targets, every parameter; logits, loss,
                                        grad.<parameter> of the loss
    DIR/sampling.safetensors            logits (and the ids so far) -> each logit processor's output
    DIR/tokenizer/vocab.json, merges.txt   a byte-level BPE trained here on fixed text, in GPT-2's files
    DIR/tokenizer/cases.json            tricky strings -> GPT-2-pattern chunks and ids

Arrays are safetensors (F64 or F32 per --dtype, I64 for ids and integer
options; the sampler and tokenizer cases are float64 / exact either way);
strings are JSON. Backward cases hold `dout`, the upstream gradient, and
grad.<name>, the gradient of sum(out * dout) with respect to <name>: what a
backward pass called with dout returns. A value passes when its largest
error is at most `tolerance` times its largest magnitude (docs/fixtures.md
gives the rule, the manifest's fields, and a checker in plain NumPy).
Same seed, same dtype: the same bytes.
"""
import inspect
import json
import os
import re
from typing import NamedTuple

import numpy as np

from .config import GPTConfig
from .errors import TinygenError
from .gpt import GPT
from .gradient_check import layer_cases
from .loss import IGNORE
from .model import block_backward, block_forward, init_params
from .parts import make_context
from .plumbing.fileio import atomic_write_json, atomic_write_text
from .plumbing.safetensors import save_file
from .sampling import min_p_filter, penalize_repeats, process_logits, temperature_scale, top_k_filter, top_p_filter
from .tokenizer import ENDOFTEXT, Tokenizer
from .tokenizer.files import gpt2_byte_chars

FORMAT, VERSION = "tinygen-fixtures", 1
# Relative to a value's largest magnitude. tinygen's own float32 results differ from float64 arithmetic on
# the same inputs by at most ~1e-6 of it (layers, block and model alike, seeds 0-3; docs/fixtures.md), and
# independent float64 arithmetic by ~1e-15: room for another order of sums, none for the exact-erf GELU
# (8e-5 of its output's scale away from GPT-2's tanh form).
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}  # each layer pair, the block
MODEL_TOLERANCE = {"float64": 1e-9, "float32": 1e-5}  # the whole model
EXACT = 1e-12  # the sampler's float64 processors

# The doc that derives each layer pair and what its forward computes; a case without a row gets the table's doc.
LAYERS = {
    "linear": ("docs/layers.md#linear", "out = x @ w + b"),
    "embedding": ("docs/layers.md#embedding-and-position-embedding-a-scatter-add", "out = w[ids]"),
    "layernorm": ("docs/layers.md#layer-norm", "out = (x - mean) / sqrt(var + 1e-5) * w + b, over the last axis"),
    "gelu": ("docs/layers.md#gelu-tanh-approximation", "out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"),
    "dropout (fixed mask)": ("docs/layers.md#dropout", "out = x * mask (mask: 0 or 1/(1-p))"),
    "causal attention": ("docs/attention.md#forward", "qkv (B,T,3C) -> softmax(q k^T / sqrt(D) + causal) v, "
                         "heads merged (B,T,C)"),
    "causal attention (dropout)": ("docs/attention.md#backward", "as causal attention, the probabilities "
                                   "multiplied by mask (B,H,T,T) before @ v"),
    "cross-entropy": ("docs/layers.md#softmax-and-cross-entropy", "out = mean over targets != -1 of "
                      "logsumexp(logits) - logits[target] (a scalar)"),
    "lora linear": ("docs/finetuning.md#lora", "out = x @ w + b + scale * (x @ lora_A) @ lora_B"),
    "lora linear (dropout)": ("docs/finetuning.md#lora", "out = x @ w + b + scale * ((x * mask) @ lora_A) @ lora_B"),
    "adapter": ("docs/finetuning.md#bottleneck-adapters", "out = x + gelu(x @ down.weight + down.bias) @ up.weight "
                "+ up.bias"),
    "prompt tuning": ("docs/finetuning.md#prompt-tuning", "out = [prompt ; tok] along time (B, n + T, C), the "
                      "prompt broadcast over the batch"),
}
HOLDS = {  # what a layer's input holds, by the name gradient_check.layer_cases gives it
    "x": "the input (..., C)", "w": "weight", "b": "bias", "ids": "token ids (integers)",
    "logits": "logits (B, T, V)", "targets": "target ids (B, T), -1 = not counted", "qkv": "q, k, v side by side (B, T, 3C)",
    "n_head": "option: number of heads H (head width D = C / H)", "scale": "option: alpha / r",
    "tok": "token embeddings (B, T, C)", "prompt": "the virtual tokens (n, C)", "lora_A": "LoRA's A (C_in, r)",
    "lora_B": "LoRA's B (r, N)", "mask": "the dropout mask: 0, or 1/(1-p) where kept",
    "down.weight": "bottleneck down (C, m)", "down.bias": "(m,)", "up.weight": "bottleneck up (m, C)", "up.bias": "(C,)",
}
TEXTS = [  # what trips tokenizers: contractions, spaces, digits, newlines, non-ASCII, emoji, special tokens
    "Hello world", "don't stop: it's we'll they'd I'M", "  two leading spaces", "trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n", "numbers 1234567 and 3.14159, -42", "naïve café, Straße, 日本語のテキスト",
    "emoji 🙂👍🏽 and ZWJ 👩‍💻", "<|endoftext|>after the end", "mixed\u00a0no-break\u2003em space",
    "x" * 40, "",
]
TRAIN_TEXT = ("The cat sat on the mat. The dog sat on the log. It's what they'd said, and we'll see. "
              "Numbers: 12345, 67890, 3.14. naïve café 日本語 🙂\n\n") * 20


class Case(NamedTuple):
    """One entry of the manifest."""

    name: str  # what the implementation dictionary is keyed by: "linear", "block", "top-p", ...
    file: str  # relative to DIR
    doc: str  # the doc (and section) that derives it
    computes: str  # the formula, in one line
    tolerance: float
    inputs: dict  # name -> {"shape", "dtype", "holds"}: what the implementation is given
    expected: dict  # name -> {"shape", "dtype", "holds"}: what it must return


def slug(name: str) -> str:
    """A file name for a case: "causal attention (dropout)" -> "causal_attention_dropout"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def describe(values: dict, holds: dict) -> dict:
    """{name: {"shape", "dtype", "holds"}} of arrays, as the manifest lists them."""
    names = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    return {k: {"shape": list(np.shape(v)), "dtype": names[np.asarray(v).dtype], "holds": holds[k]}
            for k, v in values.items()}


def as_array(value, dtype):
    """A forward's input as a stored array: floats in the fixture's dtype, integers int64, scalars 0-d."""
    a = np.asarray(value)
    return a.astype(np.int64) if a.dtype.kind in "iub" else a.astype(dtype)


# ------------------------------------------------------------------ the layer pairs
def layer_fixture(case, dtype, rng):
    """(Case, arrays) of one gradient_check.LayerCase: its inputs, out, a random dout, every gradient."""
    params = list(inspect.signature(case.forward).parameters)
    float_names = iter(case.names)
    positional = [next(float_names) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else params[i]
                  for i, a in enumerate(case.args)]
    out, cache = case.forward(*case.args, **case.kwargs)
    out = as_array(out, dtype)
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = case.backward(dout if out.ndim else dout.item(), cache)
    inputs = {**dict(zip(positional, case.args)), **case.kwargs}
    arrays = {k: as_array(v, dtype) for k, v in inputs.items()}
    holds = {k: HOLDS.get(k, "input " + k) for k in inputs}
    holds["dout"] = "the upstream gradient of out"
    expected = {"out": out, **{f"grad.{n}": as_array(g, dtype) for n, g in zip(case.names, grads)}}
    exp_holds = {"out": "forward output", **{f"grad.{n}": f"gradient of sum(out * dout) with respect to {n}"
                                             for n in case.names}}
    doc, computes = LAYERS.get(case.name, ("docs/gradcheck.md", case.name))
    call = f"{case.forward.__name__}({', '.join(positional + [f'{k}={k}' for k in case.kwargs])})"
    grad_names = ", ".join(k for k in exp_holds if k != "out")
    entry = Case(case.name, f"layers/{slug(case.name)}.safetensors", doc,
                 f"{computes}; {call}, then {case.backward.__name__}(dout) -> {grad_names}",
                 TOLERANCE[np.dtype(dtype).name], describe({**arrays, "dout": dout}, holds), describe(expected, exp_holds))
    return entry, {**arrays, "dout": dout, **expected}


def block_fixture(dtype, rng, B=2, T=5, C=8, n_head=2):
    """(Case, arrays) of transformer block 0 of a 1-layer GPT-2: x and its 12 parameters -> out; dout -> grads."""
    config = GPTConfig(vocab_size=7, block_size=T, n_layer=1, n_head=n_head, n_embd=C, dtype=np.dtype(dtype).name)
    params = {k: (v + rng.normal(0, 0.1, v.shape)).astype(dtype)
              for k, v in init_params(config, rng).items() if k.startswith("h.0.")}
    x = rng.standard_normal((B, T, C)).astype(dtype)
    out, cache = block_forward(x, params, 0, make_context(config))
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, grads = block_backward(dout, cache)
    inputs = {"x": x, **params, "n_head": np.array(n_head, np.int64), "dout": dout}
    expected = {"out": out, "grad.x": dx, **{f"grad.{k}": grads[k] for k in params}}
    holds = {"x": "the residual stream (B, T, C)", "n_head": "option: heads", "dout": "the upstream gradient of out",
             **{k: "parameter " + k for k in params}}
    exp_holds = {"out": "block output", **{k: f"gradient of sum(out * dout) with respect to {k[5:]}" for k in expected
                                           if k != "out"}}
    return Case("block", "block.safetensors", "docs/layers.md#the-model-blocks-made-of-parts",
                "x + attn(ln_1(x)), then + mlp(ln_2(.)): GPT-2's pre-LN block (no dropout); "
                "block_forward(x, params, 0), then block_backward(dout) -> grad.x and grad.<parameter>",
                TOLERANCE[np.dtype(dtype).name], describe(inputs, holds), describe(expected, exp_holds)), \
        {**inputs, **expected}


def model_fixture(dtype, rng):
    """(Case, arrays) of a whole 2-layer GPT-2: ids, targets and every parameter -> logits, loss, grads."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype=np.dtype(dtype).name)
    params = {k: v + rng.normal(0, 0.1, v.shape) for k, v in init_params(config, rng).items()}
    model = GPT(config, params=params)
    idx = rng.integers(0, config.vocab_size, (2, config.block_size))
    targets = np.roll(idx, -1, axis=1)
    targets[:, -1] = IGNORE
    loss, grads = model.loss_and_grads(idx, targets, workers=1)  # one stream: the same bits on any machine
    inputs = {"idx": idx.astype(np.int64), "targets": targets.astype(np.int64), **model.params,
              "n_head": np.array(config.n_head, np.int64)}
    expected = {"logits": model.forward(idx, workers=1), "loss": np.array(loss, dtype), **{f"grad.{k}": g for k, g in grads.items()}}
    holds = {"idx": "token ids (B, T)", "targets": "next-token targets (B, T), -1 = not counted",
             "n_head": "option: heads", **{k: "parameter " + k for k in model.params}}
    exp_holds = {"logits": "(B, T, V), tied LM head", "loss": "mean cross-entropy over counted targets",
                 **{f"grad.{k}": f"gradient of loss with respect to {k}" for k in grads}}
    return Case("model", "model.safetensors", "docs/layers.md#the-model-blocks-made-of-parts",
                "GPT-2: wte[idx] + wpe, n_layer blocks, ln_f, logits = x @ wte^T (tied); loss = cross-entropy; "
                "grad.<parameter> = d loss / d parameter (wte: embedding + head)",
                MODEL_TOLERANCE[np.dtype(dtype).name], describe(inputs, holds), describe(expected, exp_holds)), \
        {**inputs, **expected}


# ------------------------------------------------------------------ the sampler
def sampling_fixtures(rng):
    """[(Case, arrays)] of each logit processor on the same logits, and all of them in transformers' order."""
    logits = np.round(rng.normal(0, 2, (3, 12)), 1)  # rounded: exact ties, which top-k must keep
    logits[1, [2, 5, 7]] = logits[1].max() + 1.0  # a three-way tie at the top
    ids = np.array([[0, 3, 3, 9, 1], [2, 2, 2, 2, 2], [11, 4, 0, 5, 6]], np.int64)
    options = {"repetition_penalty": 1.3, "temperature": 0.7, "top_k": 4, "top_p": 0.8, "min_p": 0.1}
    arrays = {"logits": logits, "ids": ids,
              **{k: np.array(v, np.int64 if isinstance(v, int) else np.float64) for k, v in options.items()}}
    runs = [("repetition penalty", ["ids", "repetition_penalty"], penalize_repeats(logits, ids, 1.3),
             "seen tokens' logits divided by the penalty if > 0, multiplied if < 0 (once each)"),
            ("temperature", ["temperature"], temperature_scale(logits, 0.7), "logits / temperature"),
            ("top-k", ["top_k"], top_k_filter(logits, 4), "-inf below the k-th largest logit (ties kept)"),
            ("top-p", ["top_p"], top_p_filter(logits, 0.8),
             "keep the most likely tokens until their probability reaches p, -inf for the rest"),
            ("min-p", ["min_p"], min_p_filter(logits, 0.1), "-inf where probability < min_p * the top probability"),
            ("all processors (transformers' order)", ["ids", *options], process_logits(logits, ids, **options),
             "repetition penalty, temperature, top-k, top-p, min-p, each on the previous one's output")]
    holds = {"logits": "next-token logits (B, V)", "ids": "the sequence so far (B, T), prompt included",
             **{k: "option: " + k for k in options}}
    out = []
    for name, uses, result, computes in runs:
        key = "out." + slug(name)
        arrays[key] = result
        inputs = {k: arrays[k] for k in ["logits", *uses]}
        out.append(Case(name, "sampling.safetensors", "docs/sampling.md#the-options-and-the-order-they-act-in",
                        computes, EXACT, describe(inputs, holds),
                        describe({key: result}, {key: "processed logits (B, V), -inf = removed"})))
    return out, arrays


# ------------------------------------------------------------------ the tokenizer
def tokenizer_fixture(directory):
    """Train a byte-level BPE with GPT-2's split pattern on TRAIN_TEXT, write it as GPT-2's vocab.json +
    merges.txt, and the chunks and ids of TEXTS as cases.json. Returns the Case."""
    tok = Tokenizer.train(TRAIN_TEXT, 320, pattern="gpt2", special_tokens=[ENDOFTEXT])
    chars = gpt2_byte_chars()
    text_of = lambda b: "".join(chars[x] for x in b)  # noqa: E731  token bytes -> GPT-2's printable form
    vocab = {text_of(b): i for b, i in tok.mergeable_ranks.items()}
    vocab.update(tok.special_tokens)
    merges = [f"{text_of(a)} {text_of(b)}" for a, b in tok.merges]
    special = re.compile("(" + "|".join(map(re.escape, tok.special_tokens)) + ")")
    chunks = [[c for k, piece in enumerate(special.split(t)) for c in ([piece] if k % 2 else tok.split(piece))]
              for t in TEXTS]
    ids = [tok.encode(t, allowed_special="all") for t in TEXTS]
    os.makedirs(os.path.join(directory, "tokenizer"), exist_ok=True)
    atomic_write_json(os.path.join(directory, "tokenizer", "vocab.json"), vocab)
    atomic_write_text(os.path.join(directory, "tokenizer", "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    cases = {"pattern": tok.pattern, "vocab": vocab, "merges": merges, "special_tokens": tok.special_tokens,
             "texts": TEXTS, "chunks": chunks, "ids": ids}
    atomic_write_json(os.path.join(directory, "tokenizer", "cases.json"), cases)
    inputs = {"pattern": "GPT-2's split regex (needs \\p{L}, \\p{N} and lookahead)",
              "vocab": "vocab.json's contents: token (GPT-2's byte-to-character map) -> id",
              "merges": "merges.txt's lines: 'left right', in rank order",
              "special_tokens": "{text: id}; a special token's text in a string is that id", "texts": "the strings"}
    expected = {"chunks": "per text: the split pattern's chunks (a special token is one chunk)",
                "ids": "per text: the token ids (special tokens allowed)"}
    return Case("tokenizer", "tokenizer/cases.json", "docs/tokenizer.md#how-byte-level-bpe-works",
                "split the text with the pattern (special tokens first), then merge each chunk's bytes by rank",
                0.0, {k: {"holds": v} for k, v in inputs.items()}, {k: {"holds": v} for k, v in expected.items()})


# ------------------------------------------------------------------ all of it
def write_fixtures(directory, seed: int = 0, dtype: str = "float64") -> dict:
    """Write every fixture and manifest.json into `directory`; returns the manifest."""
    if dtype not in TOLERANCE:
        raise TinygenError(f"dtype must be one of {', '.join(TOLERANCE)}, got {dtype!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TinygenError(f"seed must be an integer >= 0, got {seed!r}")
    directory = os.fspath(directory)
    os.makedirs(os.path.join(directory, "layers"), exist_ok=True)
    rng, np_dtype = np.random.default_rng(seed), np.dtype(dtype).type
    cases = []
    for layer in layer_cases(rng, dtype=np_dtype):
        case, arrays = layer_fixture(layer, np_dtype, rng)
        save_file(arrays, os.path.join(directory, case.file), metadata={"format": FORMAT, "case": case.name})
        cases.append(case)
    for make in (block_fixture, model_fixture):
        case, arrays = make(np_dtype, rng)
        save_file(arrays, os.path.join(directory, case.file), metadata={"format": FORMAT, "case": case.name})
        cases.append(case)
    sampling, arrays = sampling_fixtures(rng)
    save_file(arrays, os.path.join(directory, "sampling.safetensors"), metadata={"format": FORMAT})
    cases += sampling
    cases.append(tokenizer_fixture(directory))
    manifest = {
        "format": FORMAT, "version": VERSION, "seed": seed, "dtype": dtype,
        "comparison": "a value passes when it has the expected shape, the same non-finite entries (-inf) where the "
                      "expected has them, and max |got - expected| <= tolerance * max |expected| over the finite "
                      "entries; JSON values must be equal",
        "gradients": "grad.<name> of a layer or block is the gradient of sum(out * dout) with respect to <name>; "
                     "of the model, the gradient of its loss",
        "doc": "docs/fixtures.md",
        "cases": [case._asdict() for case in cases]}
    atomic_write_json(os.path.join(directory, "manifest.json"), manifest)
    return manifest
