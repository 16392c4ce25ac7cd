"""Fine-tuning: pretraining's loop with a different start, a trainable set and masked batches.

    base RUN_DIR (config.json, model.safetensors, tokenizer.json)
      + method parameters        LoRA A, B / adapters / prompt embeddings (none for full)
      + trainable(name)          which parameters AdamW updates (and keeps state for)
      + batches with targets -1  on prompt and padding positions (tinygen.tasks)
      -> tinygen.train.train     the same loop, metrics, checkpoints and resume as pretraining
      -> per-task evaluation     loss and exact-match accuracy on the test split

Methods (docs/finetuning.md has the math and the parameter counts):
    full     every parameter, optionally freezing the embeddings or the lower n blocks
    lora     low-rank updates of chosen projections (tinygen.lora)
    adapter  bottleneck adapters after attention and after the MLP (tinygen.adapters)
    prompt   n virtual token embeddings prepended to every input (tinygen.prompt_tuning)

The base checkpoint is never written. `full` saves a whole model in the new
run directory; the other methods save only their own tensors in
`adapter.safetensors`, with the base's identity (every base tensor's shape
and one sha256 over them) in its metadata, and `load_run` refuses to put
them on any other base. `finetune.json` records the method, the
hyperparameters and where the base is.
"""
import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .adapters import init_adapters
from ..checkpoint import TOKENIZER, load_model
from ..errors import TinygenError
from ..plumbing.fileio import atomic_copy, atomic_write_json, read_json
from .lora import LoraSpec, init_lora
from ..model import GPT, param_shapes
from .prompt_tuning import NAME as PROMPT, init_prompt
from ..plumbing.safetensors import load_file, load_metadata, save_file

METHODS = ("full", "lora", "adapter", "prompt")
ADAPTER_FILE = "adapter.safetensors"
FINETUNE_FILE = "finetune.json"
FORMAT, VERSION = "tinygen-finetune", "1"
DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "adapter": 3e-3, "prompt": 3e-2}


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run: the method, its hyperparameters, the optimization and the data."""

    method: str = "lora"
    freeze_embeddings: bool = False
    freeze_layers: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "c_attn,c_proj,c_fc"
    adapter_size: int = 16
    n_virtual: int = 8
    tasks: str = ""
    batch_size: int = 16
    max_steps: int = 300
    lr: Optional[float] = None
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_interval: int = 50
    eval_batches: int = 4
    checkpoint_interval: int = 100
    eval_examples: int = 64
    seed: int = 0
    workers: int = 0  # threads running shards of each batch; 0: one per core (see tinygen.parallel)

    def __post_init__(self):
        if self.method not in METHODS:
            raise TinygenError(f"FinetuneConfig.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("freeze_layers", "max_steps", "warmup_steps", "eval_examples", "seed", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise TinygenError(f"FinetuneConfig.{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("adapter_size", "n_virtual", "batch_size", "eval_interval", "eval_batches",
                     "checkpoint_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise TinygenError(f"FinetuneConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lr is not None and not self.lr > 0:
            raise TinygenError(f"FinetuneConfig.lr must be positive, got {self.lr!r}")
        if self.method == "lora":
            self.lora_spec()  # LoraSpec's own checks, with its messages

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    def lora_spec(self) -> LoraSpec:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, targets)

    def task_list(self) -> tuple:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())

    def train_config(self, base):
        """The TrainConfig of the shared loop: the model's shape from the base GPTConfig."""
        from ..train import TrainConfig

        lr = self.learning_rate
        return TrainConfig(vocab_size=base.vocab_size, block_size=base.block_size, n_layer=base.n_layer,
                           n_head=base.n_head, n_embd=base.n_embd, dropout=self.dropout, dtype=base.dtype,
                           batch_size=self.batch_size, max_steps=self.max_steps, lr=lr, min_lr=lr / 10,
                           warmup_steps=min(self.warmup_steps, self.max_steps), weight_decay=self.weight_decay,
                           grad_clip=self.grad_clip, eval_interval=self.eval_interval,
                           eval_batches=self.eval_batches, checkpoint_interval=self.checkpoint_interval,
                           seed=self.seed, workers=self.workers)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "FinetuneConfig":
        return FinetuneConfig(**{**asdict(self), **changes})


# ------------------------------------------------------------------ what trains
def trainable(fc: FinetuneConfig):
    """The name predicate of the method: which parameters the optimizer updates.

    >>> trainable(FinetuneConfig(method="lora"))("h.0.attn.c_attn.lora_A")
    True
    """
    if fc.method == "lora":
        return lambda name: name.endswith((".lora_A", ".lora_B"))
    if fc.method == "adapter":
        return lambda name: ".adapter_" in name
    if fc.method == "prompt":
        return lambda name: name == PROMPT

    def full(name):  # wte is also the tied LM head: freezing embeddings freezes the head
        if fc.freeze_embeddings and name in ("wte.weight", "wpe.weight"):
            return False
        return not (name.startswith("h.") and int(name.split(".")[1]) < fc.freeze_layers)

    return full


def method_params(base_params: dict, config, fc: FinetuneConfig, rng: np.random.Generator) -> dict:
    """The new parameters the method adds (empty for full fine-tuning)."""
    if fc.method == "lora":
        return init_lora(base_params, fc.lora_spec(), rng)
    if fc.method == "adapter":
        return init_adapters(config.n_layer, config.n_embd, fc.adapter_size, rng, config.np_dtype)
    if fc.method == "prompt":
        return init_prompt(base_params["wte.weight"], fc.n_virtual, rng)
    return {}


def build_model(base: GPT, fc: FinetuneConfig) -> GPT:
    """A new GPT: a copy of the base's parameters plus the method's, seeded by fc.seed.
    The base model is not modified."""
    rng = np.random.default_rng([fc.seed, 7])
    params = {k: v.copy() for k, v in base.params.items()}
    params.update(method_params(params, base.config, fc, rng))
    return GPT(dataclasses.replace(base.config, dropout=fc.dropout), params=params,
               lora=fc.lora_spec() if fc.method == "lora" else None)


# ------------------------------------------------------------------ files
def base_identity(params: dict, config) -> dict:
    """{"shapes": {name: shape}, "sha256": hex} of the base's own tensors (float32 bytes, sorted names)."""
    h = hashlib.sha256()
    shapes = {}
    for name in sorted(param_shapes(config)):
        a = np.ascontiguousarray(params[name], dtype=np.float32)
        shapes[name] = list(a.shape)
        h.update(name.encode() + b"\0" + str(a.shape).encode() + b"\0" + a.tobytes())
    return {"shapes": shapes, "sha256": h.hexdigest()}


def save_adapter(path, model: GPT, names, identity: dict, fc: FinetuneConfig) -> None:
    """Write the method's tensors (only) with the method, LoRA spec and base identity as metadata."""
    meta = {"format": FORMAT, "version": VERSION, "method": fc.method,
            "lora": json.dumps(fc.lora_spec().to_dict() if fc.method == "lora" else None),
            "base_sha256": identity["sha256"], "base_shapes": json.dumps(identity["shapes"])}
    save_file({n: np.ascontiguousarray(model.params[n]) for n in names}, path, metadata=meta)


def apply_adapter(base: GPT, path) -> GPT:
    """A new GPT: `base` plus the tensors of an adapter.safetensors trained on exactly this base."""
    path = os.fspath(path)
    meta = load_metadata(path)
    if meta.get("format") != FORMAT:
        raise TinygenError(f"{path}: not a tinygen fine-tuning file (format {meta.get('format')!r})")
    identity = base_identity(base.params, base.config)
    try:  # issue 17: damaged metadata is an error naming the file
        shapes, lora = json.loads(meta.get("base_shapes", "{}")), json.loads(meta.get("lora", "null"))
        spec = LoraSpec(**{**lora, "targets": tuple(lora["targets"])}) if lora else None
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise TinygenError(f"{path}: malformed metadata: {type(e).__name__}: {str(e)[:200]}") from None
    if shapes != identity["shapes"]:
        raise TinygenError(f"{path} was trained on a base with other tensor shapes than this one "
                           f"(n_layer={base.config.n_layer}, n_embd={base.config.n_embd}, "
                           f"vocab_size={base.config.vocab_size}); load it on the base it was trained on")
    if meta.get("base_sha256") != identity["sha256"]:
        raise TinygenError(f"{path} was trained on a different base model (sha256 {meta.get('base_sha256', '?')[:12]}..., "
                           f"this base is {identity['sha256'][:12]}...); load it on the base it was trained on")
    params = dict(base.params)
    params.update(load_file(path))
    return GPT(base.config, params=params, lora=spec)


def read_run_file(run_dir) -> dict:
    """RUN_DIR/finetune.json, checked: a malformed one is a TinygenError naming it (issue 17)."""
    path = os.path.join(os.fspath(run_dir), FINETUNE_FILE)
    info = read_json(path, what="fine-tuning description")
    ok = isinstance(info, dict) and info.get("method") in METHODS and isinstance(info.get("config"), dict)
    if not (ok and isinstance(info.get("base"), str) and isinstance(info.get("data"), str)):
        raise TinygenError(f"{path}: malformed: expected an object with \"method\" (one of {', '.join(METHODS)}), "
                           "\"config\" (an object), \"base\" and \"data\" (strings)")
    return info


def is_finetuned_run(run_dir) -> bool:
    return os.path.isfile(os.path.join(os.fspath(run_dir), FINETUNE_FILE))


def load_run(run_dir, base_dir=None, merged=False) -> GPT:
    """The fine-tuned model of RUN_DIR: a whole model (full), or its base + adapter.safetensors.

    base_dir overrides the base path recorded in finetune.json (a moved base).
    merged=True folds LoRA into the weights: a plain GPT-2, which every decoding
    path (decode.decode_step included) handles.
    """
    run_dir = os.fspath(run_dir)
    info = read_run_file(run_dir)
    if info.get("method") == "full":
        return load_model(run_dir)
    base_dir = base_dir or info.get("base")
    if not base_dir or not os.path.isdir(base_dir):
        raise TinygenError(f"{run_dir}: its base {base_dir!r} is not a directory; pass the base's run directory")
    model = apply_adapter(load_model(base_dir), os.path.join(run_dir, ADAPTER_FILE))
    if merged and model.lora is not None:
        from .lora import merge

        model = GPT(model.config, params=merge(model.params, model.lora))
    return model


def write_run_files(out_dir, base_dir, fc: FinetuneConfig, data: str, identity: dict) -> None:
    """finetune.json (method, config, base path and identity) and the base's tokenizer.json."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, FINETUNE_FILE), {
        "format": FORMAT, "version": VERSION, "method": fc.method, "base": os.path.abspath(base_dir),
        "base_sha256": identity["sha256"], "data": data, "config": fc.to_dict()})
    src = os.path.join(base_dir, TOKENIZER)
    if os.path.isfile(src):
        atomic_copy(src, os.path.join(out_dir, TOKENIZER))


# ------------------------------------------------------------------ the run
def load_examples(data: str, tasks=()) -> dict:
    """{"train", "val", "test": [Example]} of "builtin" or a JSONL file, restricted to `tasks`."""
    from .tasks import TASKS, builtin_examples, read_jsonl, split_examples

    splits = builtin_examples(tasks or TASKS) if data == "builtin" else split_examples(read_jsonl(data))
    if tasks:
        present = sorted({e.task for e in splits["train"]})
        missing = [t for t in tasks if t not in present]
        if missing:
            raise TinygenError(f"{data}: no training examples of task {missing[0]!r}; its tasks are {', '.join(present)}")
        splits = {s: [e for e in ex if e.task in tasks] for s, ex in splits.items()}
    return splits


def run(base_dir, data, out_dir, fc: FinetuneConfig, resume=False, splits=None, encoded=None,
        progress=None, log=print) -> dict:
    """Fine-tune the model of base_dir on `data` ("builtin" or a JSONL file) into out_dir.

    Returns {"train": TrainResult as a dict, "eval": {task: {"val_loss",
    "accuracy", "examples"}}}; the evaluation (on the test split) is also
    written to out_dir/eval.json. `splits` skips reading the data again, and
    `encoded` ({"train", "val": [Encoded]}, made for this model's capacity)
    skips tokenizing them.
    """
    from .evaluate import capacity, evaluate_tasks
    from .lora import merge
    from .tasks import batches, encode_examples, make_batch
    from ..tokenizer.tokenizer import Tokenizer
    from ..train import train

    if os.path.abspath(base_dir) == os.path.abspath(out_dir):
        raise TinygenError(f"--out {out_dir} is the base run directory; fine-tuning never writes its base")
    base, tokenizer = load_model(base_dir), Tokenizer.load_dir(base_dir)
    splits = splits or load_examples(data, fc.task_list())
    model = build_model(base, fc)
    pad = tokenizer.eot_id
    if encoded is None:
        encoded = {s: encode_examples(splits[s], tokenizer, capacity(model)) for s in ("train", "val")}
    train_enc, val_enc = encoded["train"], encoded["val"] or encoded["train"]
    B = fc.batch_size
    val_batches = [make_batch(val_enc[i:i + B], pad) for i in range(0, min(len(val_enc), B * fc.eval_batches), B)]
    identity = base_identity(base.params, base.config)
    write_run_files(out_dir, base_dir, fc, data, identity)
    is_trainable = trainable(fc)
    added = [n for n in model.params if n not in base.params]
    if fc.method == "full":
        save_weights = model.save_pretrained
    else:
        def save_weights(directory):
            save_adapter(os.path.join(directory, ADAPTER_FILE), model, added, identity, fc)
    result = train(model, batches(train_enc, B, pad, fc.seed), fc.train_config(base.config), out_dir,
                   val_batches=val_batches, trainable=is_trainable, resume=resume, save_weights=save_weights,
                   progress=progress, log=log)
    if result.interrupted:
        return {"train": result._asdict(), "eval": {}}
    if fc.method == "lora":  # evaluate the merged model: the same function, no LoRA cost per token
        model = GPT(model.config, params=merge(model.params, model.lora))
    scores = evaluate_tasks(model, tokenizer, splits["test"], fc.eval_examples)
    atomic_write_json(os.path.join(out_dir, "eval.json"), {"split": "test", "tasks": scores})
    return {"train": result._asdict(), "eval": scores}
