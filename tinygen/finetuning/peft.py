"""Hugging Face PEFT's adapter directories, both ways: GPT-2 LoRA and prompt tuning.

    DIR/adapter_config.json         a PeftConfig as JSON: peft_type, task_type, r, lora_alpha, ...
    DIR/adapter_model.safetensors   the adapter's tensors under peft's names, metadata {"format": "pt"}

The layout is the one peft 0.21.2 writes for a transformers GPT2LMHeadModel
(PEFT_VERSION; read from its source: peft/utils/save_and_load.py
get_peft_model_state_dict, which drops the adapter name ".default";
peft/tuners/lora/layer.py; peft/config.py save_pretrained; peft/peft_model.py
PeftModelForCausalLM.forward), and tests/test_finetuning_peft.py checks it
against peft itself when peft is installed:

    tinygen                                 PEFT                                                             shape
    h.{i}.attn.c_attn.lora_A  (C, r)        base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight     (r, C)   = A^T
    h.{i}.attn.c_attn.lora_B  (r, 3C)       base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight     (3C, r)  = B^T
    (likewise attn.c_proj, mlp.c_fc, mlp.c_proj)
    prompt.weight             (n, C)        prompt_embeddings                                                (n, C)

Why the transposes: peft's lora_A and lora_B are torch Linear layers, whose
weights are (out, in), whatever layer they adapt. GPT-2's projections are
Conv1D layers with (in, out) weights, which is what `fan_in_fan_out: true`
tells peft; it transposes only when it merges the update into the Conv1D
weight. The forward is the same in both: x W + b + (alpha / r) drop(x) A B.

Where the virtual tokens sit: PeftModelForCausalLM.forward puts their
embeddings in front of the input embeddings and calls GPT-2 with
`inputs_embeds` and no position ids (it drops any given), so GPT-2 numbers the
positions 0 .. n+T-1 and the virtual tokens take 0 .. n-1, as tinygen's
prompt_tuning does. peft returns logits for all n + T positions; tinygen
drops the virtual ones, so tinygen's logits are peft's logits[:, n:].

Reading accepts what peft writes for these two methods and nothing it
cannot compute exactly: any other peft_type, a task other than CAUSAL_LM,
an option that changes the forward (use_rslora, use_dora, bias, lora_bias,
modules_to_save, layers_to_transform, rank_pattern, ...), a target that is
not every block's c_attn / c_proj / c_fc, or an init that rewrites the
base (PiSSA, OLoRA, LoftQ, CorDA) is one TinygenError naming all of it.
The bottleneck adapters have no PEFT type and keep tinygen's own file.
"""
import json
import os
import re

import numpy as np

from ..config import GPTConfig
from ..errors import TinygenError
from ..model import param_shapes
from ..plumbing.fileio import atomic_write_text, read_json
from ..plumbing.rundir import PEFT_CONFIG, PEFT_WEIGHTS
from ..plumbing.safetensors import load_file, save_file
from .config import FinetuneConfig
from .lora import TARGETS, target_weights
from .methods import METHODS
from .prompt_tuning import NAME as PROMPT

PEFT_VERSION = "0.21.2"  # the peft release whose layout this module writes and reads
PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (GPT2LMHeadModel)
HF = "transformer."  # GPT2LMHeadModel.transformer (GPT2Model)
PROMPT_KEY = "prompt_embeddings"
LORA_KEY = re.compile(r"base_model\.model\.(?:transformer\.)?(h\.\d+\.(?:attn|mlp)\.\w+)\.lora_([AB])\.weight")
METHOD_OF = {m.peft_type: m.name for m in METHODS.values() if m.peft_type}  # {"LORA": "lora", ...}

# What else peft 0.21.2 writes in adapter_config.json, at the values that keep its forward the one above.
LORA_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": True, "inference_mode": True, "init_lora_weights": True,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
    "qalora_group_size": 16, "rank_pattern": {}, "revision": None, "target_parameters": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "use_rslora": False, "velora_config": None,
}
PROMPT_DEFAULTS = {
    "auto_mapping": None, "inference_mode": True, "modules_to_save": None, "num_transformer_submodules": 1,
    "prompt_tuning_init_text": None, "revision": None, "tokenizer_kwargs": None, "tokenizer_name_or_path": None,
}
# Fields that describe the run, not the forward: any value is fine when reading.
INFORMATIONAL = {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
                 "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying",
                 "num_attention_heads", "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
                 "tokenizer_name_or_path", "tokenizer_kwargs"}
INITS = (True, False, "gaussian", "orthogonal")  # init_lora_weights that leave the base weights as they are


# ------------------------------------------------------------------ tinygen -> PEFT
def peft_config(fc: FinetuneConfig, config: GPTConfig, base_name: str) -> dict:
    """adapter_config.json's contents for a LoRA or prompt-tuning run, every field peft 0.21.2 writes.

    >>> small = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
    >>> c = peft_config(FinetuneConfig(method="lora", lora_rank=4, lora_alpha=8.0), small, "runs/base")
    >>> c["peft_type"], c["r"], c["lora_alpha"], c["target_modules"], c["fan_in_fan_out"]
    ('LORA', 4, 8, ['c_attn', 'c_proj', 'c_fc'], True)
    """
    peft_type = METHODS[fc.method].peft_type
    common = {"base_model_name_or_path": base_name, "peft_type": peft_type, "peft_version": PEFT_VERSION,
              "task_type": "CAUSAL_LM"}
    if peft_type == "LORA":
        alpha = int(fc.lora_alpha) if float(fc.lora_alpha).is_integer() else fc.lora_alpha  # peft's field is an int
        targets = [t.strip() for t in fc.lora_targets.split(",") if t.strip()]
        return {**LORA_DEFAULTS, **common, "r": fc.lora_rank, "lora_alpha": alpha, "lora_dropout": fc.lora_dropout,
                "target_modules": targets}
    if peft_type == "PROMPT_TUNING":
        return {**PROMPT_DEFAULTS, **common, "num_virtual_tokens": fc.n_virtual, "token_dim": config.n_embd,
                "num_attention_heads": config.n_head, "num_layers": config.n_layer,
                "prompt_tuning_init": "SAMPLE_VOCAB"}  # tinygen starts from n random vocabulary rows
    raise TinygenError(f"method {fc.method!r} has no PEFT format (only "
                       f"{', '.join(METHOD_OF.values())}); its run keeps tinygen's adapter.safetensors only")


def peft_tensors(params: dict, fc: FinetuneConfig) -> dict:
    """The method's tensors under peft's names and in its orientation (LoRA's transposed).

    >>> A, B = np.zeros((8, 2)), np.zeros((2, 24))
    >>> t = peft_tensors({"h.0.attn.c_attn.lora_A": A, "h.0.attn.c_attn.lora_B": B}, FinetuneConfig(method="lora"))
    >>> {k: v.shape for k, v in t.items()}
    {'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight': (2, 8), 'base_model.model.transformer.h.0.attn.c_attn.lora_B.weight': (24, 2)}
    """
    if METHODS[fc.method].peft_type == "PROMPT_TUNING":
        return {PROMPT_KEY: np.ascontiguousarray(params[PROMPT])}
    return {f"{PREFIX}{HF}{name[:-len('.lora_A')]}.lora_{name[-1]}.weight": np.ascontiguousarray(params[name].T)
            for name in params if name.endswith((".lora_A", ".lora_B"))}


def write_peft(directory, params: dict, fc: FinetuneConfig, config: GPTConfig, base_name: str) -> None:
    """Write DIR/adapter_model.safetensors then DIR/adapter_config.json, each atomically, as peft does.

    The JSON is peft's own formatting (indent 2, sorted keys, no final newline)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    text = json.dumps(peft_config(fc, config, base_name), indent=2, sort_keys=True)
    save_file(peft_tensors(params, fc), os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
    atomic_write_text(os.path.join(directory, PEFT_CONFIG), text)


# ------------------------------------------------------------------ PEFT -> tinygen
def read_peft_config(directory) -> dict:
    """adapter_config.json of DIR, checked to be a JSON object naming a peft_type."""
    path = os.path.join(os.fspath(directory), PEFT_CONFIG)
    if not os.path.isfile(path):
        raise TinygenError(f"{directory}: no {PEFT_CONFIG}; expected a PEFT adapter directory "
                           f"({PEFT_CONFIG} + {PEFT_WEIGHTS})")
    cfg = read_json(path, what="PEFT adapter config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("peft_type"), str):
        raise TinygenError(f"{path}: not a PEFT adapter config (expected a JSON object with \"peft_type\")")
    return cfg


def base_name(directory) -> str:
    """The base model the adapter was made on, as peft recorded it ("" when it did not)."""
    name = read_peft_config(directory).get("base_model_name_or_path")
    return name if isinstance(name, str) else ""


def _empty(value) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def unsupported(cfg: dict) -> list:
    """The fields of a LORA or PROMPT_TUNING config that change what the adapter computes
    beyond what tinygen computes, as "field = value" strings (empty when it can be loaded).

    >>> unsupported({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "use_rslora": True, "bias": "all"})
    ['bias = "all"', 'use_rslora = true']
    """
    known = {"peft_type", "task_type"} | INFORMATIONAL
    if cfg["peft_type"] == "LORA":
        known |= {"r", "lora_alpha", "lora_dropout", "target_modules"}
        wrong = {"bias": cfg.get("bias", "none") != "none",
                 "init_lora_weights": cfg.get("init_lora_weights", True) not in INITS,
                 "task_type": cfg.get("task_type") not in ("CAUSAL_LM", None)}
    else:
        known |= {"num_virtual_tokens", "token_dim"}
        wrong = {"num_transformer_submodules": cfg.get("num_transformer_submodules", 1) not in (1, None),
                 "task_type": cfg.get("task_type") != "CAUSAL_LM"}
    bad = [k for k, v in cfg.items() if k not in known | set(wrong) and not _empty(v)]
    bad += [k for k, is_wrong in wrong.items() if is_wrong]
    return [f"{k} = {json.dumps(cfg.get(k))}" for k in sorted(bad)]


def read_peft(directory, config: GPTConfig):
    """(FinetuneConfig, {tinygen name: array}) of a PEFT adapter directory made for a GPT-2 of `config`.

    Raises one TinygenError naming whatever tinygen cannot compute exactly
    (the peft type, options, target modules, unexpected tensors or shapes).
    """
    directory = os.fspath(directory)
    cfg = read_peft_config(directory)
    where = os.path.join(directory, PEFT_CONFIG)
    if cfg["peft_type"] not in METHOD_OF:
        raise TinygenError(f"{where}: peft_type {cfg['peft_type']!r} is not supported; tinygen reads "
                           f"{' and '.join(METHOD_OF)} adapters (its bottleneck adapters have no PEFT format)")
    bad = unsupported(cfg)
    if bad:
        raise TinygenError(f"{where}: not supported by tinygen, which computes plain {cfg['peft_type']} on GPT-2 "
                           f"(docs/peft.md): {', '.join(bad)}")
    tensors = _read_weights(directory)
    if cfg["peft_type"] == "LORA":
        return _lora(cfg, tensors, config, where)
    return _prompt(cfg, tensors, config, where)


def _read_weights(directory) -> dict:
    path = os.path.join(directory, PEFT_WEIGHTS)
    if not os.path.isfile(path):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        raise TinygenError(f"{directory}: no {PEFT_WEIGHTS}" + (
            "; found adapter_model.bin, a pickle, which tinygen never reads: save the adapter with "
            "safe_serialization=True (peft's default)" if pickled else ""))
    return load_file(path)


def _number(cfg, key, where, kind=(int, float), default=None):
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TinygenError(f"{where}: {key} = {json.dumps(value)}: expected a number")
    return value


def _lora(cfg, tensors, config: GPTConfig, where):
    """LoRA tensors -> tinygen's names, transposed; the targets are the projections the file adapts."""
    r = _number(cfg, "r", where, int)
    if r < 1:
        raise TinygenError(f"{where}: r = {r}: expected a positive integer (the rank)")
    found = {}
    for key, value in tensors.items():
        m = LORA_KEY.fullmatch(key)
        if m is None or m.group(1) + ".weight" not in param_shapes(config):
            raise TinygenError(f"{where}: tensor {key!r} is not a LoRA weight of a GPT-2 projection "
                               f"(c_attn, c_proj, c_fc) of this {config.n_layer}-layer base")
        found[f"{m.group(1)}.lora_{m.group(2)}"] = value.T.astype(config.np_dtype)
    targets = tuple(t for t in TARGETS if any(k.endswith(f".{t}.lora_A") for k in found))
    listed = cfg.get("target_modules")
    if isinstance(listed, list) and not all(isinstance(t, str) for t in listed):
        raise TinygenError(f"{where}: target_modules {json.dumps(listed)[:100]}: expected module names")
    if isinstance(listed, list) and sorted(listed) != sorted(targets):
        raise TinygenError(f"{where}: target_modules {listed} but the weights adapt {list(targets)}; "
                           f"tinygen adapts whole names among {', '.join(TARGETS)} in every block")
    shapes = param_shapes(config)
    for w in target_weights(shapes, targets) if targets else []:
        stem = w[:-len(".weight")]
        C_in, N = shapes[w]
        for name, shape in ((stem + ".lora_A", (C_in, r)), (stem + ".lora_B", (r, N))):
            if name not in found:
                raise TinygenError(f"{where}: adapts {', '.join(targets)} but has no {stem}.lora_{name[-1]}.weight: "
                                   "tinygen's LoRA adapts a projection name in every block (no layers_to_transform)")
            if found[name].shape != shape:
                raise TinygenError(f"{where}: {stem}.lora_{name[-1]}.weight has shape {found[name].shape[::-1]}, "
                                   f"expected {shape[::-1]} for r={r} on this base")
    if not found:
        raise TinygenError(f"{where}: no LoRA weights in {PEFT_WEIGHTS}")
    fc = _config(where, method="lora", lora_rank=r, lora_alpha=float(_number(cfg, "lora_alpha", where)),
                 lora_dropout=float(_number(cfg, "lora_dropout", where, default=0.0)), lora_targets=",".join(targets))
    return fc, found


def _prompt(cfg, tensors, config: GPTConfig, where):
    """prompt_embeddings (n, C) -> tinygen's prompt.weight."""
    n, dim = _number(cfg, "num_virtual_tokens", where, int), _number(cfg, "token_dim", where, int)
    if dim != config.n_embd:
        raise TinygenError(f"{where}: token_dim {dim} but the base's n_embd is {config.n_embd}: "
                           "load the adapter on the base it was made for")
    if set(tensors) != {PROMPT_KEY} or tensors[PROMPT_KEY].shape != (n, dim):
        got = {k: v.shape for k, v in tensors.items()}
        raise TinygenError(f"{where}: expected one tensor {PROMPT_KEY!r} of shape {(n, dim)}, found {got}")
    return _config(where, method="prompt", n_virtual=n), {PROMPT: tensors[PROMPT_KEY].astype(config.np_dtype)}


def _config(where, **fields) -> FinetuneConfig:
    """The FinetuneConfig of the adapter; a value out of range is an error naming the file."""
    try:
        return FinetuneConfig(**fields)
    except TinygenError as e:
        raise TinygenError(f"{where}: {e}") from None
