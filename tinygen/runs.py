"""One loader for every kind of run directory: what `GPT.from_pretrained` reads.

    DIR holds                                          it is                              it loads as
    config.json + model.safetensors                    a GPT-2 checkpoint: a pretraining  the model (checkpoint.load_model)
                                                       run, a full fine-tune, the Hub's
    finetune.json + adapter.safetensors                a LoRA, adapter or prompt-tuning   its base + the method's tensors,
                                                       run of `tinygen finetune`          with the method's parts attached
    adapter_config.json + adapter_model.safetensors    a PEFT adapter (LoRA or prompt     its base + the adapter
                                                       tuning, finetuning.peft)

`load(DIR, adapter=ADAPTER)` puts an adapter (a tinygen fine-tuning run, its
adapter.safetensors, or a PEFT adapter directory) on the model of DIR.

Finding a run's base. finetune.json records the base's path relative to the
run, the absolute path it had, and the sha256 of its weights (base_identity).
The loader tries `base=` when given, else the relative path, else the
absolute one, and takes the first whose weights have that checksum. So a tree
of runs copied or moved together keeps working, a run never loads on another
base, and when no candidate fits the error says what to pass (`--base DIR` on
the command line, `base=DIR` in Python). A base is loaded as a plain GPT-2:
a LoRA run can be a base (merged into its weights); an adapter or
prompt-tuning run cannot (nothing of GPT-2's holds what it adds).
A PEFT adapter records no checksum: its base is `base=` or the
base_model_name_or_path peft wrote (a directory, relative to the adapter
or to the working directory), checked by shape only, as peft does.
"""
import hashlib
import os
from typing import NamedTuple, Optional

import numpy as np

from .checkpoint import load_model
from .config import GPTConfig
from .errors import TinygenError
from .finetuning.config import FinetuneConfig
from .finetuning.methods import METHODS
from .finetuning.peft import base_name, read_peft
from .model import param_shapes
from .parts import Parts, parts_for
from .plumbing.fileio import parse_json, read_json
from .plumbing.rundir import ADAPTER, CONFIG, FINETUNE, MODEL, PEFT_CONFIG, PEFT_WEIGHTS, TOKENIZER
from .plumbing.safetensors import load_file, load_metadata
from .tokenizer.tokenizer import Tokenizer

FORMAT, VERSION = "tinygen-finetune", "2"  # finetune.json and adapter.safetensors; 2: the whole FinetuneConfig


class Loaded(NamedTuple):
    """What `load` returns: a GPT's three arguments, and the fine-tuning config that made it."""

    config: GPTConfig
    params: dict  # the base's tensors, and the method's when it has any
    parts: Optional[Parts]  # None: config's own parts (a plain GPT-2)
    finetune: Optional[FinetuneConfig]  # the fine-tuning config whose parts are attached, else None


# ------------------------------------------------------------------ what a directory is
def kind(directory) -> str:
    """"finetune" (a tinygen fine-tuning run), "model" (a checkpoint) or "peft" (a PEFT adapter)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise TinygenError(f"{directory}: no such directory")
    for name, what in ((FINETUNE, "finetune"), (CONFIG, "model"), (PEFT_CONFIG, "peft")):
        if os.path.isfile(os.path.join(directory, name)):
            return what
    raise TinygenError(f"{directory}: not a run directory: expected {CONFIG} + {MODEL} (a model), {FINETUNE} "
                       f"(a tinygen fine-tuning run) or {PEFT_CONFIG} + {PEFT_WEIGHTS} (a PEFT adapter)")


def read_finetune_json(run_dir) -> dict:
    """RUN_DIR/finetune.json, checked: an object with a known "method" and a "config" object."""
    path = os.path.join(os.fspath(run_dir), FINETUNE)
    info = read_json(path, what="fine-tuning description")
    method = info.get("method") if isinstance(info, dict) else None
    if not (isinstance(method, str) and method in METHODS and isinstance(info.get("config"), dict)):
        raise TinygenError(f"{path}: malformed: expected an object with \"method\" (one of {', '.join(METHODS)}) "
                           "and \"config\" (an object)")
    return info


def finetune_config(fields, where) -> FinetuneConfig:
    """A FinetuneConfig from a file's fields; a bad one is a TinygenError naming the file."""
    try:
        return FinetuneConfig(**fields)
    except (TypeError, ValueError) as e:  # ValueError: FinetuneConfig's own checks (TinygenError)
        raise TinygenError(f"{where}: malformed fine-tuning config: {str(e)[:200]}") from None


# ------------------------------------------------------------------ the base's identity
def base_identity(params: dict, config) -> dict:
    """{"shapes": {name: shape}, "sha256": hex} of the base's own tensors (float32 bytes, sorted names)."""
    h = hashlib.sha256()
    shapes = {}
    for name in sorted(param_shapes(config)):
        a = np.ascontiguousarray(params[name], dtype=np.float32)
        shapes[name] = list(a.shape)
        h.update(name.encode() + b"\0" + str(a.shape).encode() + b"\0" + a.tobytes())
    return {"shapes": shapes, "sha256": h.hexdigest()}


# ------------------------------------------------------------------ tinygen's adapter.safetensors
def saved_config(meta: dict, path) -> FinetuneConfig:
    """The FinetuneConfig an adapter file was trained with, from its metadata.

    Version 1 files recorded only the method and LoRA's spec, which is all the parts need."""
    version = meta.get("version")
    if version not in ("1", VERSION):
        raise TinygenError(f"{path}: fine-tuning file version {version!r:.40}; this tinygen reads 1 and {VERSION}")
    try:
        if version == "1":
            lora = parse_json(meta.get("lora", "null"), f"{path}: metadata \"lora\"")
            fields = {} if lora is None else {"lora_rank": lora["rank"], "lora_alpha": lora["alpha"],
                                              "lora_dropout": lora["dropout"], "lora_targets": ",".join(lora["targets"])}
            return FinetuneConfig(method=meta.get("method"), **fields)
        return FinetuneConfig(**parse_json(meta["config"], f"{path}: metadata \"config\""))
    except (KeyError, TypeError, ValueError) as e:  # TinygenError is a ValueError
        raise TinygenError(f"{path}: malformed metadata: {str(e)[:200]}") from None


def attach_adapter_file(model: Loaded, path, identity: Optional[dict] = None) -> Loaded:
    """`model` (a plain GPT-2) plus the tensors of an adapter.safetensors trained on exactly these
    weights, with the parts of the file's method attached. identity: base_identity(model), if known."""
    path = os.fspath(path)
    meta = load_metadata(path)
    if meta.get("format") != FORMAT:
        raise TinygenError(f"{path}: not a tinygen fine-tuning file (format {meta.get('format')!r})")
    fc = saved_config(meta, path)
    identity = identity or base_identity(model.params, model.config)
    shapes = parse_json(meta.get("base_shapes", "{}"), f"{path}: metadata \"base_shapes\"")
    config = model.config
    if shapes != identity["shapes"]:
        raise TinygenError(f"{path} was trained on a base with other tensor shapes than this one "
                           f"(n_layer={config.n_layer}, n_embd={config.n_embd}, "
                           f"vocab_size={config.vocab_size}); load it on the base it was trained on")
    if meta.get("base_sha256") != identity["sha256"]:
        raise TinygenError(f"{path} was trained on a different base model (sha256 {str(meta.get('base_sha256'))[:12]}..., "
                           f"this base is {identity['sha256'][:12]}...); load it on the base it was trained on")
    tensors = {k: v.astype(config.np_dtype, copy=False) for k, v in load_file(path).items()}
    return Loaded(config, {**model.params, **tensors}, METHODS[fc.method].attach(parts_for(config), fc), fc)


def attach_peft(model: Loaded, directory) -> Loaded:
    """`model` (a plain GPT-2) plus a PEFT adapter directory's tensors and the method's parts."""
    fc, tensors = read_peft(directory, model.config)
    return Loaded(model.config, {**model.params, **tensors}, METHODS[fc.method].attach(parts_for(model.config), fc), fc)


# ------------------------------------------------------------------ the loader
def load(directory, dtype=None, adapter=None, base=None, merged=False) -> Loaded:
    """The model of any run directory (see the module docstring).

    dtype: "float32" / "float64" instead of the config's; adapter: an adapter to put on
    DIR's model; base: where the base of a fine-tuning run or PEFT adapter DIR is now;
    merged: fold a method that can be folded (LoRA) into the weights (a plain GPT-2).
    """
    directory = os.fspath(directory)
    if adapter is not None:
        if base is not None:
            raise TinygenError("give adapter= (an adapter over DIR) or base= (the base of DIR), not both")
        loaded = attach(load_plain(directory, dtype), adapter)
    else:
        what = kind(directory)
        if what == "model":
            if base is not None:
                raise TinygenError(f"{directory} is a whole model (config.json + model.safetensors); base= is for "
                                   "fine-tuning runs and PEFT adapters")
            loaded = Loaded(*load_model(directory, dtype), None, None)
        elif what == "finetune":
            loaded = load_finetuned(directory, dtype, base)
        else:
            loaded = attach_peft(load_plain(peft_base(directory, base), dtype), directory)
    return merge(loaded) if merged else loaded


def load_plain(directory, dtype=None) -> Loaded:
    """The model of DIR as a plain GPT-2 (LoRA merged): what can be a base."""
    loaded = load(directory, dtype, merged=True)
    if loaded.parts is not None:
        raise TinygenError(f"{directory} is a {loaded.finetune.method} fine-tuning run, whose added positions or "
                           "layers are not weights of GPT-2, so it cannot serve as a base: use its base, or a "
                           "full or LoRA run")
    return loaded


def merge(loaded: Loaded) -> Loaded:
    """A method that can be folded into the weights (LoRA), folded: a plain GPT-2. Others as they are."""
    fold = loaded.finetune and METHODS[loaded.finetune.method].merge
    if not fold:
        return loaded
    return Loaded(loaded.config, fold(loaded.params, loaded.finetune), None, None)


def attach(model: Loaded, adapter) -> Loaded:
    """Put ADAPTER (a tinygen fine-tuning run, its adapter.safetensors, or a PEFT adapter directory) on `model`."""
    adapter = os.fspath(adapter)
    if os.path.isfile(adapter):
        return attach_adapter_file(model, adapter)
    what = kind(adapter)
    if what == "finetune":
        info = read_finetune_json(adapter)
        if METHODS[info["method"]].whole_model:
            raise TinygenError(f"adapter {adapter} is a {info['method']} fine-tune, a whole model: load it alone")
        return attach_adapter_file(model, os.path.join(adapter, ADAPTER))
    if what == "peft":
        return attach_peft(model, adapter)
    raise TinygenError(f"adapter {adapter}: a model, not an adapter: expected a tinygen fine-tuning run "
                       f"({FINETUNE}) or a PEFT adapter ({PEFT_CONFIG})")


def load_finetuned(run_dir, dtype=None, base=None) -> Loaded:
    """A tinygen fine-tuning run: a whole model (full), or its base + adapter.safetensors."""
    info = read_finetune_json(run_dir)
    fc = finetune_config(info["config"], os.path.join(run_dir, FINETUNE))
    if METHODS[fc.method].whole_model:
        return Loaded(*load_model(run_dir, dtype), None, None)
    path = os.path.join(run_dir, ADAPTER)
    meta = load_metadata(path)
    _, model, identity = find_base(run_dir, info, meta.get("base_sha256"), base, dtype)
    return attach_adapter_file(model, path, identity)


def base_candidates(run_dir, info: dict, base=None) -> list:
    """Where a run's base may be: `base`, else its recorded path relative to the run, then the absolute one.

    (Runs written before paths were relative recorded only the absolute path, as "base".)"""
    if base is not None:
        return [os.fspath(base)]
    paths = [os.path.join(run_dir, p) for p in (info.get("base"), info.get("base_absolute"))
             if isinstance(p, str) and p and "\0" not in p]
    return list(dict.fromkeys(os.path.normpath(p) for p in paths))


def find_base(run_dir, info: dict, sha256, base=None, dtype=None):
    """(directory, Loaded, identity) of the first candidate base whose weights have `sha256`."""
    tried = []
    for candidate in base_candidates(run_dir, info, base):
        if not os.path.isdir(candidate):
            tried.append(f"{candidate} (not there)")
            continue
        try:
            model = load_plain(candidate, dtype)
        except TinygenError as e:
            tried.append(f"{candidate} (not a base: {str(e)[:100]})")
            continue
        identity = base_identity(model.params, model.config)
        if identity["sha256"] == sha256:
            return candidate, model, identity
        tried.append(f"{candidate} (a different model, sha256 {identity['sha256'][:12]}...)")
    if base is not None:
        raise TinygenError(f"{run_dir} was trained on a different base model (sha256 {str(sha256)[:12]}...) than "
                           f"{tried[0]}; pass the base it was trained on")
    raise TinygenError(f"{run_dir}: its base model is not found: tried {'; '.join(tried) or 'no recorded path'}. "
                       f"Pass the base's directory (its weights have sha256 {str(sha256)[:12]}...): "
                       f"--base DIR on the command line, GPT.from_pretrained({run_dir!r}, base=DIR) in Python")


def run_base(run_dir, base=None) -> str:
    """The directory of a fine-tuning run's base (what resuming needs), found as `load` finds it and
    verified against the sha256 in finetune.json."""
    info = read_finetune_json(run_dir)
    return find_base(run_dir, info, info.get("base_sha256"), base)[0]


def peft_base(adapter_dir, base=None) -> str:
    """The base directory of a PEFT adapter: `base`, else base_model_name_or_path relative to the
    adapter, else relative to the working directory."""
    if base is not None:
        return os.fspath(base)
    name = base_name(adapter_dir)
    for candidate in (os.path.join(adapter_dir, name), name) if name else ():
        if os.path.isdir(candidate):
            return candidate
    raise TinygenError(f"{adapter_dir}: its base model {name!r} (base_model_name_or_path) is not a directory "
                       f"here; pass the base: tinygen sample --model BASE --adapter {adapter_dir}, or "
                       f"GPT.from_pretrained(BASE, adapter={adapter_dir!r}) in Python")


# ------------------------------------------------------------------ the tokenizer
TOKENIZER_FILES = ((TOKENIZER,), ("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def load_tokenizer(directory, adapter=None, base=None) -> Tokenizer:
    """The tokenizer of the model `load(directory, adapter=, base=)` gives: DIR's own (tinygen's
    tokenizer.json or GPT-2's vocab.json + merges.txt), else, for a fine-tuning run or PEFT
    adapter directory without one, its base's."""
    directory = os.fspath(directory)
    has_own = any(all(os.path.isfile(os.path.join(directory, f)) for f in files) for files in TOKENIZER_FILES)
    if has_own or adapter is not None or kind(directory) == "model":
        return Tokenizer.load_dir(directory)
    if kind(directory) == "peft":
        return Tokenizer.load_dir(peft_base(directory, base))
    return Tokenizer.load_dir(run_base(directory, base))
