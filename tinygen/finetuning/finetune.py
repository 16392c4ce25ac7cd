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
and one sha256 over them) in its metadata, and the loader (tinygen.runs)
refuses to put them on any other base. LoRA and prompt-tuning runs also
write the same tensors in Hugging Face PEFT's layout (adapter_config.json +
adapter_model.safetensors, tinygen.finetuning.peft). `finetune.json` records
the method, the hyperparameters and where the base is: its path relative to
the run (so a tree of runs can move), the absolute path, and its sha256.
"""
import dataclasses
import json
import os

import numpy as np

from ..checkpoint import report_kept
from ..errors import TinygenError
from ..gpt import GPT
from ..plumbing.fileio import atomic_copy, atomic_write_json, make_dirs, read_json
from ..plumbing.lock import run_lock
from ..plumbing.rundir import ADAPTER as ADAPTER_FILE, FINETUNE as FINETUNE_FILE, TOKENIZER
from ..plumbing.safetensors import save_file
from ..runs import FORMAT, VERSION, Loaded, attach_adapter_file, base_identity, load_plain
from ..tokenizer.tokenizer import Tokenizer
from ..train import TrainConfig, train
from .config import FinetuneConfig
from .evaluate import capacity, evaluate_tasks
from .methods import METHODS
from .peft import write_peft
from .tasks import (TASKS, batches, builtin_examples, encode_examples, fim_encode_examples, make_batch, read_jsonl,
                    split_examples)


def train_config(fc: FinetuneConfig, base) -> TrainConfig:
    """The TrainConfig of the shared loop: the model's shape from the base GPTConfig."""
    lr = fc.learning_rate
    return TrainConfig(vocab_size=base.vocab_size, block_size=base.block_size, n_layer=base.n_layer,
                       n_head=base.n_head, n_embd=base.n_embd, dropout=fc.dropout, dtype=base.dtype,
                       batch_size=fc.batch_size, max_steps=fc.max_steps, lr=lr, min_lr=lr / 10,
                       warmup_steps=min(fc.warmup_steps, fc.max_steps), weight_decay=fc.weight_decay,
                       grad_clip=fc.grad_clip, eval_interval=fc.eval_interval,
                       eval_batches=fc.eval_batches, checkpoint_interval=fc.checkpoint_interval,
                       seed=fc.seed, workers=fc.workers)


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
def save_adapter(path, model: GPT, names, identity: dict, fc: FinetuneConfig) -> None:
    """Write the method's tensors (only), with the run's FinetuneConfig and the base's identity as metadata."""
    meta = {"format": FORMAT, "version": VERSION, "method": fc.method, "config": json.dumps(fc.to_dict()),
            "base_sha256": identity["sha256"], "base_shapes": json.dumps(identity["shapes"])}
    save_file({n: np.ascontiguousarray(model.params[n]) for n in names}, path, metadata=meta)


def apply_adapter(base: GPT, path) -> GPT:
    """A new GPT: `base` plus the tensors of an adapter.safetensors trained on exactly this base,
    with the parts of the file's method attached (tinygen.runs.attach_adapter_file)."""
    config, params, parts, _ = attach_adapter_file(Loaded(base.config, base.params, None, None), path)
    return GPT(config, params=params, parts=parts)


def read_run_file(run_dir) -> tuple:
    """(finetune.json's contents, its FinetuneConfig) of RUN_DIR, checked: a malformed file is
    a TinygenError naming it, never a KeyError or TypeError further on."""
    path = os.path.join(os.fspath(run_dir), FINETUNE_FILE)
    info = read_json(path, what="fine-tuning description")
    ok = isinstance(info, dict) and isinstance(info.get("config"), dict)
    if not (ok and isinstance(info.get("base"), str) and isinstance(info.get("data"), str)):
        raise TinygenError(f"{path}: malformed: expected an object with \"config\" (an object), "
                           "\"base\" and \"data\" (strings)")
    try:
        fc = FinetuneConfig(**info["config"])
    except (TypeError, TinygenError) as e:  # an unknown field; a value its check refuses
        raise TinygenError(f"{path}: malformed \"config\": {str(e)[:200]}") from None
    return info, fc


def is_finetuned_run(run_dir) -> bool:
    return os.path.isfile(os.path.join(os.fspath(run_dir), FINETUNE_FILE))


def load_run(run_dir, base_dir=None, merged=False) -> GPT:
    """The fine-tuned model of RUN_DIR: GPT.from_pretrained(RUN_DIR, base=base_dir, merged=merged).

    base_dir overrides where the base is looked for (a moved base; checked by its checksum).
    merged=True folds a method that can be folded (LoRA) into the weights: a
    plain GPT-2, which every decoding path (kv_decoding.decode_step included) handles.
    """
    return GPT.from_pretrained(run_dir, base=base_dir, merged=merged)


def write_run_files(out_dir, base_dir, fc: FinetuneConfig, data: str, identity: dict) -> None:
    """finetune.json (method, config, the base's path relative to the run and absolute, its
    sha256, the data file's paths likewise) and the base's tokenizer.json."""
    make_dirs(out_dir)
    here = os.path.abspath(out_dir)
    base = os.path.abspath(base_dir)
    files = {} if data == "builtin" else {"data": os.path.relpath(os.path.abspath(data), here),
                                          "data_absolute": os.path.abspath(data)}
    atomic_write_json(os.path.join(out_dir, FINETUNE_FILE), {
        "format": FORMAT, "version": VERSION, "method": fc.method,
        "base": os.path.relpath(base, here), "base_absolute": base,
        "base_sha256": identity["sha256"], "data": data, **files, "config": fc.to_dict()})
    src = os.path.join(base_dir, TOKENIZER)
    if os.path.isfile(src):
        atomic_copy(src, os.path.join(out_dir, TOKENIZER))


def recorded_data(run_dir, info: dict) -> str:
    """The data a run was trained on: "builtin", or its file relative to the run, else where it was.

    (Runs written before paths were relative recorded the data as given, with no "data_absolute".)"""
    data, elsewhere = info["data"], info.get("data_absolute")
    if data == "builtin" or not isinstance(elsewhere, str):
        return data
    here = os.path.join(run_dir, data)
    return here if os.path.isfile(here) or not os.path.isfile(elsewhere) else elsewhere


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
    skips tokenizing them. out_dir's lock (tinygen.plumbing.lock) is held from
    before finetune.json is written to the end: a second writer gets RunDirBusy.
    """
    if os.path.abspath(base_dir) == os.path.abspath(out_dir):
        raise TinygenError(f"--out {out_dir} is the base run directory; fine-tuning never writes its base")
    plain = load_plain(base_dir)  # any run that is a GPT-2's weights: a checkpoint, a full or LoRA run
    base, tokenizer = GPT(plain.config, params=plain.params), Tokenizer.load_dir(base_dir)
    splits = splits or load_examples(data, fc.task_list())
    model = build_model(base, fc)
    pad = tokenizer.eot_id
    if encoded is None:
        encoded = {s: encode_examples(splits[s], tokenizer, capacity(model)) for s in ("train", "val")}
        if fc.fim_rate:
            encoded["train"] = fim_encode_examples(splits["train"], tokenizer, capacity(model), fc.fim_rate, fc.seed)
    elif fc.fim_rate:
        raise TinygenError("fim_rate > 0 rearranges the training examples as they are encoded: pass encoded=None")
    train_enc, val_enc = encoded["train"], encoded["val"] or encoded["train"]
    B = fc.batch_size
    val_batches = [make_batch(val_enc[i:i + B], pad) for i in range(0, min(len(val_enc), B * fc.eval_batches), B)]
    identity = base_identity(base.params, base.config)
    added = [n for n in model.params if n not in base.params]
    method = METHODS[fc.method]
    if method.whole_model:
        save_weights = model.save_pretrained
    else:
        def save_weights(directory):
            save_adapter(os.path.join(directory, ADAPTER_FILE), model, added, identity, fc)
            if method.peft_type:  # the same tensors for Hugging Face PEFT
                write_peft(directory, model.params, fc, model.config, os.fspath(base_dir))
    # one writer of out_dir from before finetune.json is written (RunDirBusy names the other's pid);
    # a failed write says what out_dir still holds
    with run_lock(out_dir), report_kept(out_dir):
        write_run_files(out_dir, base_dir, fc, data, identity)
        result = train(model, batches(train_enc, B, pad, fc.seed), train_config(fc, base.config), out_dir,
                       val_batches=val_batches, trainable=trainable(fc), resume=resume, save_weights=save_weights,
                       progress=progress, log=log)
        if result.interrupted:
            return {"train": result._asdict(), "eval": {}}
        scores = evaluate_tasks(merged_model(model, fc), tokenizer, splits["test"], fc.eval_examples)
        atomic_write_json(os.path.join(out_dir, "eval.json"), {"split": "test", "tasks": scores})
    return {"train": result._asdict(), "eval": scores}
