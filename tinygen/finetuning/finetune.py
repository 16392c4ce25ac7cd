"""Fine-tuning: pretraining's loop with a different start, a trainable set and masked batches.

    base RUN_DIR (config.json, model.safetensors, tokenizer.json)
      + method parameters        LoRA A, B / adapters / prompt embeddings (none for full)
      + trainable(name)          which parameters AdamW updates (and keeps state for)
      + batches with targets -1  on prompt and padding positions (tinygen.finetuning.tasks)
      -> tinygen.train.train     the same loop, metrics, checkpoints and resume as pretraining
      -> per-task evaluation     loss and exact-match accuracy on the test split

Methods (one row each in tinygen.finetuning.methods.METHODS; docs/finetuning.md
has the math and the parameter counts):
    full     every parameter, optionally freezing the embeddings or the lower n blocks
    lora     low-rank updates of chosen projections (finetuning.lora)
    adapter  bottleneck adapters after attention and after the MLP (finetuning.adapters)
    prompt   n virtual token embeddings prepended to every input (finetuning.prompt_tuning)

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
import shutil
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..checkpoint import TOKENIZER
from ..config import NON_NEGATIVE, POSITIVE, PROBABILITY, boolean, number, one_of, option, optional, validate
from ..errors import TinygenError
from ..gpt import GPT
from ..model import param_shapes
from ..plumbing.fileio import atomic_write_json, read_json
from ..plumbing.safetensors import load_file, load_metadata, save_file
from ..tokenizer.tokenizer import Tokenizer
from ..train import TrainConfig, train
from .evaluate import capacity, evaluate_tasks
from .lora import TARGETS
from .methods import METHODS
from .tasks import TASKS, batches, builtin_examples, encode_examples, make_batch, read_jsonl, split_examples

ADAPTER_FILE = "adapter.safetensors"
FINETUNE_FILE = "finetune.json"
FORMAT, VERSION = "tinygen-finetune", "2"  # 2: adapter files hold the whole FinetuneConfig


def names_among(choices):
    """A check: a comma-separated string of one or more of `choices`.

    >>> names_among(TARGETS)("c_attn, c_fc"), names_among(TARGETS)("q_proj")
    (None, "comma-separated names among 'c_attn', 'c_proj', 'c_fc'")
    """
    def check(value):
        names = [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else []
        ok = names and all(t in choices for t in names)
        return None if ok else "comma-separated names among " + ", ".join(map(repr, choices))
    return check


def text(value) -> Optional[str]:
    """A check: a string."""
    return None if isinstance(value, str) else "a string"


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run: the method, its hyperparameters, the optimization and the data."""

    method: str = option("lora", "what to train: " + ", ".join(METHODS), one_of(*METHODS))
    freeze_embeddings: bool = option(False, "full: keep wte/wpe (and so the tied LM head) frozen", boolean)
    freeze_layers: int = option(0, "full: keep the lowest N blocks frozen", NON_NEGATIVE)
    lora_rank: int = option(8, "lora: rank r of each update A B", POSITIVE)
    lora_alpha: float = option(16.0, "lora: the update is scaled by alpha / r", number(0.0, low_open=True))
    lora_dropout: float = option(0.0, "lora: dropout on the update's input", PROBABILITY)
    lora_targets: str = option("c_attn,c_proj,c_fc", "lora: comma-separated projections among c_attn, c_proj, c_fc",
                               names_among(TARGETS))
    adapter_size: int = option(16, "adapter: bottleneck width m", POSITIVE)
    n_virtual: int = option(8, "prompt: number of virtual tokens", POSITIVE)
    tasks: str = option("", "comma-separated tasks to train and evaluate; empty means all", text)
    batch_size: int = option(16, "examples per step", POSITIVE)
    max_steps: int = option(300, "optimizer steps (with --resume: continue up to this step)", NON_NEGATIVE)
    lr: Optional[float] = option(None, "peak learning rate; None picks the method's: "
                                 + ", ".join(f"{m.name} {m.lr:g}" for m in METHODS.values()),
                                 optional(number(0.0, low_open=True)))
    warmup_steps: int = option(20, "steps of linear warm-up", NON_NEGATIVE)
    weight_decay: float = option(0.0, "AdamW weight decay of the trained 2-D weights", number(0.0))
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)", number(0.0))
    dropout: float = option(0.0, "dropout probability while training", PROBABILITY)
    eval_interval: int = option(50, "steps between validation-loss measurements", POSITIVE)
    eval_batches: int = option(4, "validation batches per measurement", POSITIVE)
    checkpoint_interval: int = option(100, "steps between checkpoints", POSITIVE)
    eval_examples: int = option(64, "test examples per task decoded for the accuracy", NON_NEGATIVE)
    seed: int = option(0, "seed of the new weights and the batch order", NON_NEGATIVE)
    workers: int = option(0, "threads that each run a shard of every batch (0 = one per core; 1 = one stream)",
                          NON_NEGATIVE)

    def __post_init__(self):
        validate(self)

    @property
    def learning_rate(self) -> float:
        return METHODS[self.method].lr if self.lr is None else self.lr

    def task_list(self) -> tuple:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())

    def train_config(self, base) -> TrainConfig:
        """The TrainConfig of the shared loop: the model's shape from the base GPTConfig."""
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


# ------------------------------------------------------------------ what trains
def trainable(fc: FinetuneConfig):
    """The name predicate of the method: which parameters the optimizer updates.

    >>> trainable(FinetuneConfig(method="lora"))("h.0.attn.c_attn.lora_A")
    True
    """
    return METHODS[fc.method].trainable(fc)


def build_model(base: GPT, fc: FinetuneConfig) -> GPT:
    """A new GPT: a copy of the base's parameters plus the method's (seeded by fc.seed), with the
    method's parts attached. The base model is not modified."""
    method = METHODS[fc.method]
    rng = np.random.default_rng([fc.seed, 7])
    params = {k: v.copy() for k, v in base.params.items()}
    params.update(method.init(params, base.config, fc, rng))
    return GPT(dataclasses.replace(base.config, dropout=fc.dropout), params=params,
               parts=method.attach(base.parts, fc))


def merged_model(model: GPT, fc: FinetuneConfig) -> GPT:
    """The plain GPT-2 computing what `model` does, when its method can be folded into the
    weights (LoRA), else `model` itself. No LoRA cost per token, and decoding's fast path."""
    merge = METHODS[fc.method].merge
    return model if merge is None else GPT(model.config, params=merge(model.params, fc))


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
    """Write the method's tensors (only), with the run's FinetuneConfig and the base's identity as metadata."""
    meta = {"format": FORMAT, "version": VERSION, "method": fc.method, "config": json.dumps(fc.to_dict()),
            "base_sha256": identity["sha256"], "base_shapes": json.dumps(identity["shapes"])}
    save_file({n: np.ascontiguousarray(model.params[n]) for n in names}, path, metadata=meta)


def adapter_config(meta: dict, path) -> FinetuneConfig:
    """The FinetuneConfig an adapter file was trained with, from its metadata.

    Version 1 files recorded only the method and LoRA's spec, which is all the parts need."""
    if meta.get("version") == "1":
        lora = json.loads(meta.get("lora", "null"))
        fields = {} if lora is None else {"lora_rank": lora["rank"], "lora_alpha": lora["alpha"],
                                          "lora_dropout": lora["dropout"], "lora_targets": ",".join(lora["targets"])}
        return FinetuneConfig(method=meta.get("method"), **fields)
    if meta.get("version") != VERSION:
        raise TinygenError(f"{path}: fine-tuning file version {meta.get('version')!r}; this tinygen reads 1 and {VERSION}")
    return FinetuneConfig(**json.loads(meta["config"]))


def apply_adapter(base: GPT, path) -> GPT:
    """A new GPT: `base` plus the tensors of an adapter.safetensors trained on exactly this base,
    with the parts of the file's method attached."""
    path = os.fspath(path)
    meta = load_metadata(path)
    if meta.get("format") != FORMAT:
        raise TinygenError(f"{path}: not a tinygen fine-tuning file (format {meta.get('format')!r})")
    fc = adapter_config(meta, path)
    identity = base_identity(base.params, base.config)
    if json.loads(meta.get("base_shapes", "{}")) != identity["shapes"]:
        raise TinygenError(f"{path} was trained on a base with other tensor shapes than this one "
                           f"(n_layer={base.config.n_layer}, n_embd={base.config.n_embd}, "
                           f"vocab_size={base.config.vocab_size}); load it on the base it was trained on")
    if meta.get("base_sha256") != identity["sha256"]:
        raise TinygenError(f"{path} was trained on a different base model (sha256 {meta.get('base_sha256', '?')[:12]}..., "
                           f"this base is {identity['sha256'][:12]}...); load it on the base it was trained on")
    params = {**base.params, **load_file(path)}
    return GPT(base.config, params=params, parts=METHODS[fc.method].attach(base.parts, fc))


def is_finetuned_run(run_dir) -> bool:
    return os.path.isfile(os.path.join(os.fspath(run_dir), FINETUNE_FILE))


def load_run(run_dir, base_dir=None, merged=False) -> GPT:
    """The fine-tuned model of RUN_DIR: a whole model (full), or its base + adapter.safetensors.

    base_dir overrides the base path recorded in finetune.json (a moved base).
    merged=True folds a method that can be folded (LoRA) into the weights: a
    plain GPT-2, which every decoding path (kv_decoding.decode_step included) handles.
    """
    run_dir = os.fspath(run_dir)
    info = read_json(os.path.join(run_dir, FINETUNE_FILE), what="fine-tuning description")
    fc = FinetuneConfig(**info["config"])
    if METHODS[fc.method].whole_model:
        return GPT.from_pretrained(run_dir)
    base_dir = base_dir or info.get("base")
    if not base_dir or not os.path.isdir(base_dir):
        raise TinygenError(f"{run_dir}: its base {base_dir!r} is not a directory; pass the base's run directory")
    model = apply_adapter(GPT.from_pretrained(base_dir), os.path.join(run_dir, ADAPTER_FILE))
    return merged_model(model, fc) if merged else model


def write_run_files(out_dir, base_dir, fc: FinetuneConfig, data: str, identity: dict) -> None:
    """finetune.json (method, config, base path and identity) and the base's tokenizer.json."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, FINETUNE_FILE), {
        "format": FORMAT, "version": VERSION, "method": fc.method, "base": os.path.abspath(base_dir),
        "base_sha256": identity["sha256"], "data": data, "config": fc.to_dict()})
    src = os.path.join(base_dir, TOKENIZER)
    if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(out_dir, TOKENIZER))


# ------------------------------------------------------------------ the run
def load_examples(data: str, tasks=()) -> dict:
    """{"train", "val", "test": [Example]} of "builtin" or a JSONL file, restricted to `tasks`."""
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
    if os.path.abspath(base_dir) == os.path.abspath(out_dir):
        raise TinygenError(f"--out {out_dir} is the base run directory; fine-tuning never writes its base")
    base, tokenizer = GPT.from_pretrained(base_dir), Tokenizer.load_dir(base_dir)
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
    added = [n for n in model.params if n not in base.params]
    if METHODS[fc.method].whole_model:
        save_weights = model.save_pretrained
    else:
        def save_weights(directory):
            save_adapter(os.path.join(directory, ADAPTER_FILE), model, added, identity, fc)
    result = train(model, batches(train_enc, B, pad, fc.seed), fc.train_config(base.config), out_dir,
                   val_batches=val_batches, trainable=trainable(fc), resume=resume, save_weights=save_weights,
                   progress=progress, log=log)
    if result.interrupted:
        return {"train": result._asdict(), "eval": {}}
    scores = evaluate_tasks(merged_model(model, fc), tokenizer, splits["test"], fc.eval_examples)
    atomic_write_json(os.path.join(out_dir, "eval.json"), {"split": "test", "tasks": scores})
    return {"train": result._asdict(), "eval": scores}
