"""Checkpoints: a run directory that is also a Hugging Face GPT-2 checkpoint.

    RUN_DIR/
      config.json              GPT-2 config (GPTConfig.to_hf)        } a transformers
      model.safetensors        the flat params, HF GPT-2 names        } checkpoint
      tokenizer.json           tinygen tokenizer
      train_config.json        the resolved TrainConfig + data options
      train_state.safetensors  params, AdamW m/v/t, step: what --resume reads
      metrics.jsonl            one row per step
      loss.svg                 the loss curve
      expert_load.svg          with experts: each expert's share of the tokens, per block
      data/                    token cache: train.npy, val.npy, tokens.json

`save_model` / `load_model` write and read the first two as a GPTConfig and
a params dict (`GPT.save_pretrained` / `GPT.from_pretrained` call them; this
module sits below tinygen.gpt and never builds a GPT). The loader also takes what
`transformers` writes: keys with or without the `transformer.` prefix, the
`attn.bias` / `attn.masked_bias` buffers (ignored), an `lm_head.weight`
(must equal `wte.weight`: tinygen ties them), F16/BF16/F64 tensors
(converted to the config's dtype).

`save_train_state` / `load_train_state` hold everything a resumed run needs
that the seed cannot recompute: the trainable parameters (bit-exact), the
optimizer state and the step. The training loop writes model.safetensors
first and train_state.safetensors last, each atomically, so the train state
is the commit point: whatever instant a run dies, train_state.safetensors is
one whole consistent checkpoint, and model.safetensors is that one or newer.
"""
import contextlib
import dataclasses
import json
import math
import os
from typing import NamedTuple

import numpy as np

from .config import LAYER_NORM_EPS, GPTConfig
from .errors import TinygenError, WriteError
from .model import param_shapes
from .plumbing.fileio import atomic_write_json, make_dirs, parse_json, read_json
from .plumbing.rundir import CONFIG, DATA_DIR, LOSS_SVG, METRICS, MODEL, TOKENIZER, TRAIN_CONFIG, TRAIN_STATE  # noqa: F401
from .plumbing.safetensors import load_file, load_metadata, save_file

TRAIN_STATE_FORMAT, TRAIN_STATE_VERSION = "tinygen-train-state", "1"
HF_PREFIX = "transformer."
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old HF checkpoints


# ------------------------------------------------------------------ the model
class Checkpoint(NamedTuple):
    """What `load_model` returns."""

    config: GPTConfig
    params: dict  # name -> array, tinygen's names, the config's dtype


def save_model(directory, config: GPTConfig, params: dict) -> None:
    """Write `directory`/config.json and model.safetensors (created if needed).

    The safetensors metadata {"format": "pt"} is what transformers expects;
    the keys are the model's own (`wte.weight`, `h.0.attn.c_attn.weight`,
    ...), which GPT2LMHeadModel loads under its `transformer.` prefix.
    """
    directory = os.fspath(directory)
    make_dirs(directory)
    atomic_write_json(os.path.join(directory, CONFIG), config.to_hf())
    save_file(dict(params), os.path.join(directory, MODEL), metadata={"format": "pt"})


def load_model(directory, dtype=None) -> Checkpoint:
    """(config, params) of `directory` (config.json + model.safetensors), ours or transformers'.

    dtype: "float32" / "float64" to override the dtype recorded in the config.
    """
    directory = os.fspath(directory)
    config = read_config(directory)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    path = os.path.join(directory, MODEL)
    if not os.path.isfile(path):
        others = [f for f in ("pytorch_model.bin", "model.safetensors.index.json") if os.path.isfile(os.path.join(directory, f))]
        hint = (f"; found {others[0]}, which tinygen does not read (pickle or sharded); "
                "download the single model.safetensors instead") if others else ""
        raise TinygenError(f"{directory}: no {MODEL}{hint}")
    return Checkpoint(config, hf_params(load_file(path), config, path))


def read_config(directory) -> GPTConfig:
    """The GPTConfig of a checkpoint directory's config.json."""
    path = os.path.join(os.fspath(directory), CONFIG)
    if not os.path.isfile(path):
        raise TinygenError(f"{directory}: no {CONFIG}; expected a checkpoint directory "
                           "(config.json + model.safetensors)")
    hf = read_json(path, what="model config")
    if not isinstance(hf, dict):
        raise TinygenError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not abs(eps - LAYER_NORM_EPS) <= 1e-12:
        raise TinygenError(f"{path}: layer_norm_epsilon {eps!r:.40}: tinygen's layer norm uses GPT-2's "
                           f"{LAYER_NORM_EPS}")
    if hf.get("tie_word_embeddings", True) is not True:
        raise TinygenError(f"{path}: tie_word_embeddings is false; tinygen ties the LM head to wte")
    return GPTConfig.from_hf(hf, where=path)


def hf_params(tensors: dict, config: GPTConfig, where="checkpoint") -> dict:
    """Tensors as saved by tinygen or transformers -> tinygen's flat params.

    {"transformer.h.0.attn.bias": ..., "transformer.wte.weight": (V, C) f16,
     "lm_head.weight": (V, C)} -> {"wte.weight": (V, C) float32, ...}
    """
    dtype = config.np_dtype
    params, head = {}, None
    for key, value in tensors.items():
        name = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        if name.endswith(HF_BUFFERS):
            continue
        if name == "lm_head.weight":
            head = value
            continue
        if name in params:
            raise TinygenError(f"{where}: {name!r} appears twice (with and without {HF_PREFIX!r})")
        if value.dtype.kind != "f":
            raise TinygenError(f"{where}: {key!r} has dtype {value.dtype}; expected floating point weights")
        params[name] = value.astype(dtype, copy=False)
    expected = param_shapes(config)
    _check_experts(params, expected, config, where)
    extra = sorted(set(params) - set(expected))
    if extra:
        raise TinygenError(f"{where}: {len(extra)} unexpected tensors, e.g. {extra[0]!r}; "
                           f"is config.json (n_layer={config.n_layer}) the one of these weights?")
    missing = sorted(set(expected) - set(params))
    if missing:
        raise TinygenError(f"{where}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    for name, shape in expected.items():
        if params[name].shape != shape:
            raise TinygenError(f"{where}: {name!r} has shape {params[name].shape}, config.json implies {shape}")
    if head is not None:
        wte = params["wte.weight"]
        if head.shape != wte.shape or not np.array_equal(head.astype(dtype, copy=False), wte):
            raise TinygenError(f"{where}: lm_head.weight differs from wte.weight; tinygen ties the LM head "
                               "to the token embedding, so it cannot load an untied head")
    return params


def _check_experts(params, expected, config, where):
    """Raise a clear error when the weights and config.json disagree about which blocks have experts."""
    def blocks(names):  # "h.1.mlp.router.weight" -> "h.1"
        return sorted({n.split(".mlp.")[0] for n in names if ".mlp.router." in n or ".mlp.experts." in n})

    have, want = blocks(params), blocks(expected)
    if have != want:
        holds = f"experts in {', '.join(have)}" if have else "no experts"
        says = f"experts in {', '.join(want)}" if want else "a dense GPT-2"
        raise TinygenError(f"{where}: the weights have {holds}, but config.json describes {says} "
                           f"(n_expert={config.n_expert}, moe_every={config.moe_every}); "
                           "is config.json the one of these weights?")


# ------------------------------------------------------------------ training state
class TrainState(NamedTuple):
    """What `load_train_state` returns."""

    step: int  # optimizer steps completed
    params: dict  # name -> array, the trainable parameters at `step`
    optimizer: dict  # AdamW.state_dict(): "t", "m.{name}", "v.{name}"
    info: dict  # JSON-ready extras the loop stored (seed, elapsed_s, ...)


def save_train_state(path, step: int, params: dict, optimizer: dict, info: dict | None = None) -> None:
    """Write one train_state.safetensors, atomically.

    Tensors: "param.{name}" and "optimizer.{key}"; metadata: format, version,
    step and `info` as JSON (the values are strings, as safetensors requires).
    """
    tensors = {f"param.{k}": np.ascontiguousarray(v) for k, v in params.items()}
    tensors.update({f"optimizer.{k}": np.ascontiguousarray(v) for k, v in optimizer.items()})
    metadata = {"format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION, "step": str(int(step)),
                "info": json.dumps(info or {}, sort_keys=True)}
    save_file(tensors, path, metadata=metadata)


def load_train_state(path) -> TrainState:
    """Read a train_state.safetensors written by `save_train_state`."""
    path = os.fspath(path)
    meta = load_metadata(path)
    if meta.get("format") != TRAIN_STATE_FORMAT:
        raise TinygenError(f"{path}: not a tinygen training state (format {meta.get('format')!r})")
    if meta.get("version") != TRAIN_STATE_VERSION:
        raise TinygenError(f"{path}: training state version {meta.get('version')!r}; "
                           f"this tinygen reads version {TRAIN_STATE_VERSION}")
    try:
        step, info = int(meta["step"]), parse_json(meta.get("info", "{}"), f"{path}: metadata \"info\"")
    except (KeyError, ValueError) as e:  # TinygenError is a ValueError
        raise TinygenError(f"{path}: malformed metadata: {str(e)[:200]}") from None
    if step < 0 or not isinstance(info, dict):
        raise TinygenError(f"{path}: malformed metadata: step {step}, info of type {type(info).__name__}")
    elapsed, workers = info.get("elapsed_s", 0.0), info.get("workers")
    if (isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed)
            or workers is not None and (isinstance(workers, bool) or not isinstance(workers, int))):
        raise TinygenError(f"{path}: malformed metadata: elapsed_s {elapsed!r:.40}, workers {workers!r:.40}")
    tensors = load_file(path)
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    optimizer = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return TrainState(step, params, optimizer, info)


def checkpoint_step(run_dir):
    """The step of RUN_DIR's train_state.safetensors, or None when there is none."""
    path = os.path.join(os.fspath(run_dir), TRAIN_STATE)
    if not os.path.isfile(path):
        return None
    try:
        return int(load_metadata(path)["step"])
    except (KeyError, ValueError):
        raise TinygenError(f"{path}: no step in its metadata; not a tinygen training state") from None


# ------------------------------------------------------------------ what a failed write leaves behind
def kept_in(run_dir) -> str:
    """What RUN_DIR holds for a user told that a write failed: its last good checkpoint.

    "the last good checkpoint, at step 40, in runs/x" (train_state.safetensors
    is the commit point, so this is a whole checkpoint whatever failed).
    """
    run_dir = os.fspath(run_dir)
    try:
        step = checkpoint_step(run_dir)
    except (TinygenError, OSError):
        step = None
    if step is None:
        return f"no checkpoint in {run_dir} yet (and no half-written file)"
    return f"the last good checkpoint, at step {step}, in {run_dir}"


@contextlib.contextmanager
def report_kept(run_dir):
    """Let a WriteError raised inside say what RUN_DIR still holds (`kept_in`).

    >>> with report_kept("runs/x"):       # a save into runs/x that finds the disk full
    ...     raise WriteError("runs/x/model.safetensors", OSError(28, "No space left on device"))
    Traceback (most recent call last):
    tinygen.errors.WriteError: cannot write runs/x/model.safetensors: No space left on device (ENOSPC); kept: no checkpoint in runs/x yet (and no half-written file)
    """
    try:
        yield
    except WriteError as e:
        if e.kept is None:
            e.kept = kept_in(run_dir)
        raise
