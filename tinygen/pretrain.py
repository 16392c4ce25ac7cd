"""Pretraining, end to end: corpus -> tokenizer -> token cache -> training -> samples.

    settings = new_settings("runs/tiny", preset="tiny")      # or resume_settings("runs/tiny", max_steps=120)
    run = pretrain(settings)                                  # RUN_DIR holds a resumable checkpoint
    samples(run.model, run.tokenizer, ["def"], 48)            # [("def", " _get(self, ...")]

One pipeline, called by `tinygen pretrain` (tinygen.cli.pretrain, which only
turns flags into settings and prints) and by the demo's pretraining stage
(tinygen.demo). Its steps, each an importable function:

    new_settings / resume_settings   presets, flags or a run directory -> RunSettings
    start_run                        RUN_DIR/train_config.json (read back by read_settings)
    prepare_data                     documents -> tokenizer.json, data/ (the token cache)
    train_model                      a GPT and tinygen.train.train on the cached tokens
    samples, bits_per_byte           what the command prints at the end

The data settings' `objective` picks what the model learns (docs/objectives.md):
next-token prediction (GPT-2), with `fim_rate` of its documents rearranged for
fill-in-the-middle (tinygen.fim), or masked language modelling (tinygen.mlm, a
bidirectional model). Each adds its special tokens to the tokenizer, before
<|endoftext|>, which stays the last id (config.json's eos_token_id).

A run directory holds everything needed to continue it: the settings it
was started with (RunSettings, as JSON), the tokenizer, the token cache
and the checkpoint; `pretrain(resume_settings(RUN_DIR), resume=True)`
continues it bit for bit. File names: tinygen.plumbing.rundir.
"""
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from .checkpoint import checkpoint_step, report_kept
from .config import option, validate
from .data import (DataConfig, RandomBatches, TokenData, builtin_corpus, fixed_batches, load_token_cache,
                   read_documents, split_documents, text_slice, token_cache)
from .errors import TinygenError
from .fim import FIM_TOKENS, FimBatches
from .gpt import GPT
from .mlm import MASK, MaskedBatches, fixed_masked_batches, masking_ids
from .moe import active_params
from .plumbing.fileio import atomic_write_json, make_dirs, read_json
from .plumbing.lock import run_lock
from .plumbing.progress import Progress
from .plumbing.rundir import (CONFIG, DATA_DIR, EXPERT_LOAD_SVG, LOSS_SVG, METRICS, MODEL, TOKENIZER, TRAIN_CONFIG,
                              TRAIN_STATE)
from .sampling import generate
from .tokenizer.tokenizer import ENDOFTEXT, Tokenizer
from .train import TrainConfig, TrainResult, train

RUN_FORMAT, RUN_VERSION = "tinygen-train-config", 1
# What a resumed run may change: how far to train, and on how many threads (the
# same workers reproduce the uninterrupted run bit for bit; another count changes
# only rounding and dropout masks, see tinygen.train).
RESUMABLE = ("max_steps", "workers")
BUILTIN_PROMPTS = ("def", "    def __init__(self", "The")  # no trailing space: " x" is one token
REPETITION_PENALTY = 1.3  # pure greedy decoding of a model this small loops on one token

# Presets are overrides of TrainConfig and DataConfig fields.
PRESETS = {
    # seconds: for tests and a first look
    "tiny": dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64, batch_size=8,
                 max_steps=60, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=20, eval_batches=2,
                 checkpoint_interval=20, corpus_bytes=300_000, tokenizer_bytes=300_000),
    # the default: about 4 minutes on 2 cores (the TrainConfig/DataConfig defaults)
    "small": dict(),
}


def _instance(cls):
    """A check: an instance of `cls`."""
    return lambda value: None if isinstance(value, cls) else f"a {cls.__name__}"


def _paths(value) -> Optional[str]:
    ok = value is None or (isinstance(value, tuple) and value and all(isinstance(p, str) for p in value))
    return None if ok else "None (the built-in corpus) or a non-empty tuple of paths"


def _text(value) -> Optional[str]:
    return None if isinstance(value, str) and value else "a non-empty string"


@dataclass(frozen=True)
class RunSettings:
    """Everything a pretraining run is made of: RUN_DIR/train_config.json, resolved."""

    run_dir: str = option(None, "the run directory", _text)
    train: TrainConfig = option(TrainConfig(), "the model's shape and the training loop's settings",
                                _instance(TrainConfig))
    data: DataConfig = option(DataConfig(), "how the corpus becomes training text", _instance(DataConfig))
    sources: Optional[tuple] = option(None, "text files and folders (absolute paths); None: the built-in corpus",
                                      _paths)
    encoding_errors: str = option("strict", "on bytes that are not UTF-8: stop (strict) or use U+FFFD (replace)",
                                  lambda v: None if v in ("strict", "replace") else "'strict' or 'replace'")
    tokenizer: Optional[str] = option(None, "a tokenizer file to use instead of training one",
                                      lambda v: None if v is None else _text(v))
    preset: Optional[str] = option(None, "the preset the settings started from (a record, not used again)",
                                   lambda v: None if v is None or v in tuple(PRESETS) else f"one of {sorted(PRESETS)}")
    command: str = option("pretrain", "what started the run: pretrain or demo", _text)

    def __post_init__(self):
        validate(self)

    def to_json(self) -> dict:
        """The JSON object of train_config.json (format, version and every field)."""
        return {"format": RUN_FORMAT, "version": RUN_VERSION, "command": self.command, "preset": self.preset,
                "run_dir": self.run_dir, "sources": list(self.sources) if self.sources else None,
                "encoding_errors": self.encoding_errors, "tokenizer": self.tokenizer,
                "train": dataclasses.asdict(self.train), "data": dataclasses.asdict(self.data)}

    @classmethod
    def from_json(cls, obj: dict, run_dir: str) -> "RunSettings":
        """`to_json`'s output -> RunSettings located at run_dir (where the file was found).

        Every value is checked by its field's check (here, in TrainConfig and in
        DataConfig), so a hostile file is a TinygenError, or a KeyError (no
        "train"/"data") or TypeError (an unknown field, "train" not an object),
        which read_settings turns into one TinygenError naming the file.
        """
        sources = obj.get("sources")
        return cls(run_dir=os.fspath(run_dir), train=TrainConfig(**obj["train"]), data=DataConfig(**obj["data"]),
                   sources=tuple(sources) if isinstance(sources, list) else sources, encoding_errors=obj.get("encoding_errors", "strict"),
                   tokenizer=obj.get("tokenizer"), preset=obj.get("preset"), command=obj.get("command", "pretrain"))


class Pretrained(NamedTuple):
    """What `pretrain` returns."""

    model: GPT  # trained in place, also saved in RUN_DIR
    tokenizer: Tokenizer
    tokens: TokenData  # the memory-mapped token cache and its tokens.json
    result: TrainResult  # step reached, interrupted, last losses, training time
    seconds: dict  # {"data_s": tokenizer and token cache, "train_s": the loop}


# ------------------------------------------------------------------ settings
def new_settings(run_dir: Optional[str] = None, *, preset: str = "small", overrides: Optional[dict] = None,
                 sources=None, encoding_errors: str = "strict", tokenizer: Optional[str] = None,
                 command: str = "pretrain") -> RunSettings:
    """The settings of a fresh run: PRESETS[preset], then `overrides` (TrainConfig and DataConfig fields).

    sources: files and folders of text (None: the built-in corpus).
    tokenizer: a tokenizer file or directory to use instead of training one;
      it fixes vocab_size. lr_decay_steps is fixed to max_steps unless given,
      so resuming with a larger max_steps keeps the schedule.
    """
    if preset not in PRESETS:
        raise TinygenError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    overrides = dict(overrides or {})
    train_keys, data_keys = _field_names(TrainConfig), _field_names(DataConfig)
    unknown = sorted(set(overrides) - train_keys - data_keys)
    if unknown:
        raise TinygenError(f"{unknown[0]!r} is not a TrainConfig or DataConfig field")
    values = {**PRESETS[preset], **overrides}
    data = DataConfig(**{k: v for k, v in values.items() if k in data_keys})
    config = TrainConfig(**{k: v for k, v in values.items() if k in train_keys})
    if tokenizer:
        tokenizer = os.path.abspath(tokenizer)
        vocab = load_tokenizer(tokenizer).vocab_size
        if "vocab_size" in overrides and overrides["vocab_size"] != vocab:
            raise TinygenError(f"vocab_size {overrides['vocab_size']} differs from the tokenizer's {vocab} "
                               f"({tokenizer})")
        config = dataclasses.replace(config, vocab_size=vocab)
    config = dataclasses.replace(config, lr_decay_steps=config.decay_steps)
    return RunSettings(run_dir=os.fspath(run_dir or f"runs/pretrain-{preset}"), train=config, data=data,
                       sources=tuple(os.path.abspath(p) for p in sources) if sources else None,
                       encoding_errors=encoding_errors, tokenizer=tokenizer, preset=preset, command=command)


def _field_names(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)}


def read_settings(run_dir) -> RunSettings:
    """RUN_DIR/train_config.json -> RunSettings; a TinygenError says what is wrong with it."""
    run_dir = os.fspath(run_dir)
    path = os.path.join(run_dir, TRAIN_CONFIG)
    if not os.path.isdir(run_dir):
        raise TinygenError(f"{run_dir}: no such directory")
    if not os.path.isfile(path):
        raise TinygenError(f"{run_dir}: no {TRAIN_CONFIG}, so not a tinygen run directory")
    obj = read_json(path, what="run settings")
    if not isinstance(obj, dict) or obj.get("format") != RUN_FORMAT:
        raise TinygenError(f"{path}: not a tinygen run settings file (format {RUN_FORMAT!r})")
    if obj.get("version") != RUN_VERSION:
        raise TinygenError(f"{path}: settings version {obj.get('version')!r}, this tinygen reads {RUN_VERSION}")
    try:  # every field is checked (RunSettings, TrainConfig, DataConfig): a hostile file ends here
        return RunSettings.from_json(obj, run_dir)
    except (KeyError, TypeError, TinygenError) as e:
        raise TinygenError(f"{path}: malformed settings: {str(e)[:300]}") from None


def resume_settings(run_dir, **changes) -> RunSettings:
    """The settings of RUN_DIR's run, with `changes` to the RESUMABLE fields (max_steps, workers)."""
    settings = read_settings(run_dir)
    fixed = sorted(set(changes) - set(RESUMABLE))
    if fixed:
        raise TinygenError(f"a resumed run keeps the settings of its {TRAIN_CONFIG}; only "
                           f"{' and '.join(RESUMABLE)} can change (got {', '.join(fixed)})")
    return dataclasses.replace(settings, train=dataclasses.replace(settings.train, **changes))


def start_run(settings: RunSettings, *, resume: bool = False, overwrite: bool = False) -> None:
    """Write RUN_DIR/train_config.json. A fresh run creates RUN_DIR, refuses one that
    holds a checkpoint unless `overwrite`, and removes the previous run's files
    (its tokenizer and token cache stay: prepare_data reuses them when they match).
    Call it holding RUN_DIR's lock, as `pretrain` does (tinygen.plumbing.lock.run_lock)."""
    run_dir = settings.run_dir
    if not resume:
        step = checkpoint_step(run_dir) if os.path.isdir(run_dir) else None
        if step is not None and not overwrite:
            raise TinygenError(f"{run_dir} already holds a run (checkpoint at step {step}): continue it with "
                               f"--resume {run_dir} [--max-steps N], start over with --overwrite, or pick "
                               f"another --out")
        make_dirs(run_dir)
        for name in (TRAIN_STATE, MODEL, CONFIG, METRICS, LOSS_SVG, EXPERT_LOAD_SVG):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    atomic_write_json(os.path.join(run_dir, TRAIN_CONFIG), settings.to_json())


# ------------------------------------------------------------------ data
def special_tokens(data: DataConfig) -> list:
    """The special tokens the objective needs, <|endoftext|> last (so its id is vocab_size - 1).

    >>> special_tokens(DataConfig()), special_tokens(DataConfig(objective="mlm"))
    (['<|endoftext|>'], ['<|mask|>', '<|endoftext|>'])
    """
    extra = [MASK] if data.objective == "mlm" else list(FIM_TOKENS) if data.fim_rate > 0 else []
    return extra + [ENDOFTEXT]


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer file, or a directory holding one, that has the <|endoftext|> separator."""
    tok = Tokenizer.load_dir(path) if os.path.isdir(path) else Tokenizer.load(path)
    if tok.eot_id is None:
        raise TinygenError(f"tokenizer {path} has no {ENDOFTEXT} special token to separate documents")
    return tok


def gather(settings: RunSettings, say=print) -> tuple:
    """(train, val) documents of the run's sources (or of the built-in corpus)."""
    data = settings.data
    if settings.sources:
        docs = read_documents(settings.sources, settings.encoding_errors, exclude=[settings.run_dir])
    else:
        docs = builtin_corpus(data.corpus_bytes, notice=say, exclude_modules=data.excluded)
    return split_documents(docs, data.val_fraction)


def prepare_data(settings: RunSettings, *, resume: bool = False, progress: bool = True, say=print) -> tuple:
    """-> (tokenizer, TokenData): RUN_DIR/tokenizer.json and the memory-mapped token cache.

    A resumed run reuses both without reading its sources again. A fresh run
    reuses RUN_DIR's tokenizer if it was trained on the same text with the same
    settings, and the cache if it holds the same corpus and tokenizer.
    """
    data_dir = os.path.join(settings.run_dir, DATA_DIR)
    tok_path = os.path.join(settings.run_dir, TOKENIZER)
    if resume and os.path.isfile(tok_path):
        tok = Tokenizer.load(tok_path)
        cached = load_token_cache(data_dir, tok)
        if cached is not None:
            return tok, cached
    train_docs, val_docs = gather(settings, say)
    data, config = settings.data, settings.train
    texts = text_slice(train_docs, data.tokenizer_bytes)
    key = {"texts": _digest_texts(texts), "vocab_size": config.vocab_size, "pattern": data.pattern,
           "tokenizer": settings.tokenizer}
    specials = special_tokens(data)
    if specials != [ENDOFTEXT]:  # recorded only when there are more, so older caches keep matching
        key["special_tokens"] = specials
    previous = load_token_cache(data_dir)
    if resume and os.path.isfile(tok_path):
        tok = Tokenizer.load(tok_path)
    elif os.path.isfile(tok_path) and previous is not None and previous.info.get("tokenizer_key") == key:
        tok = Tokenizer.load(tok_path)
        say(f"reusing {tok_path}")
    elif settings.tokenizer:
        tok = load_tokenizer(settings.tokenizer)
        missing = [t for t in specials if t not in tok.special_tokens]
        if missing:
            raise TinygenError(f"tokenizer {settings.tokenizer} has no {missing[0]} special token, which objective "
                               f"{data.objective!r} (fim_rate {data.fim_rate}) needs")
        tok.save(tok_path)
    else:
        n_bytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
        say(f"tokenizer: BPE to {config.vocab_size} tokens on {n_bytes:,} bytes of the training split")
        bar = Progress(total=config.vocab_size - 257, desc="tokenizer", unit="merge", enabled=progress)
        tok = Tokenizer.train(texts, config.vocab_size, pattern=data.pattern, special_tokens=specials,
                              progress=bar)
        bar.close()
        tok.save(tok_path)
    bar = Progress(total=sum(len(d.text) for d in train_docs + val_docs), desc="tokenizing", unit="char",
                   enabled=progress)
    tokens = token_cache(data_dir, tok, train_docs, val_docs, bar, extra={"tokenizer_key": key})
    bar.close()
    return tok, tokens


def _digest_texts(texts) -> str:
    """sha256 of the tokenizer's training texts: whether RUN_DIR's tokenizer can be reused."""
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


# ------------------------------------------------------------------ training
def train_model(settings: RunSettings, tok: Tokenizer, tokens: TokenData, *, resume: bool = False,
                progress: bool = True, say=print) -> tuple:
    """-> (model, TrainResult): a GPT of the settings' shape trained on the token cache, into RUN_DIR.

    Resuming loads RUN_DIR's checkpoint into it and continues to settings.train.max_steps.
    Raises tinygen.train.TrainingDiverged on a NaN or inf loss or gradient.
    """
    config = settings.train
    model = GPT(model_config(settings, tok), seed=config.seed)
    active = f" ({active_params(model.params, model.config.expert_top_k) / 1e6:.2f}M active per token)" \
        if model.config.n_expert else ""
    say(f"{model.num_params / 1e6:.2f}M parameters{active}, {tokens.train.size:,} training tokens, "
        f"{tokens.val.size:,} validation tokens; {config.max_steps} steps of {config.tokens_per_step:,} tokens")
    batches, val = objective_batches(settings, tok, tokens)
    result = train(model, batches, config, settings.run_dir, val_batches=val, resume=resume,
                   progress=None if progress else False, log=say)
    return model, result


def model_config(settings: RunSettings, tok: Tokenizer):
    """The GPTConfig of the run: the settings' shape, bidirectional attention for masked language modelling."""
    config = settings.train.model_config(tok.vocab_size)
    return dataclasses.replace(config, causal=False) if settings.data.objective == "mlm" else config


def objective_batches(settings: RunSettings, tok: Tokenizer, tokens: TokenData) -> tuple:
    """(batches(step) -> (x, y), fixed validation batches) of the run's objective.

    next-token: windows and the same shifted by one (data.RandomBatches), or with fim_rate > 0 those
      windows' documents rearranged (fim.FimBatches); validation on plain text either way, so
      val_loss is the left-to-right loss, comparable between rates.
    mlm: windows with BERT's masking, targets at the chosen positions (mlm.MaskedBatches);
      validation masked the same way.
    """
    config, data = settings.train, settings.data
    rows, T, seed = config.batch_size * config.grad_accum, config.block_size, config.seed
    if data.objective == "mlm":
        ids = masking_ids(tok)
        return (MaskedBatches(tokens.train, rows, T, seed, *ids),
                fixed_masked_batches(tokens.val, config.eval_batches, config.batch_size, T, seed, *ids))
    val = fixed_batches(tokens.val, config.eval_batches, config.batch_size, T, seed)
    if data.fim_rate > 0:
        return FimBatches(tokens.train, rows, T, seed, tok, data.fim_rate), val
    return RandomBatches(tokens.train, rows, T, seed), val


def pretrain(settings: RunSettings, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
             say=print) -> Pretrained:
    """The whole pipeline into settings.run_dir: settings file, tokenizer, token cache, training.

    resume: continue RUN_DIR's checkpoint (settings from `resume_settings`).
    overwrite: start over in a RUN_DIR that holds a checkpoint.
    progress: progress lines on stderr; say(message): one-off messages.

    The run holds RUN_DIR's lock (tinygen.plumbing.lock) from before start_run
    removes an old run's files to the end: a second writer, --resume included,
    gets RunDirBusy naming this process. A write that fails raises WriteError
    saying what RUN_DIR still holds (its last good checkpoint).
    """
    with run_lock(settings.run_dir), report_kept(settings.run_dir):
        t0 = time.perf_counter()
        start_run(settings, resume=resume, overwrite=overwrite)
        tok, tokens = prepare_data(settings, resume=resume, progress=progress, say=say)
        t1 = time.perf_counter()
        model, result = train_model(settings, tok, tokens, resume=resume, progress=progress, say=say)
    return Pretrained(model, tok, tokens, result, {"data_s": t1 - t0, "train_s": time.perf_counter() - t1})


# ------------------------------------------------------------------ samples and report
def bits_per_byte(loss_nats: float, info: dict) -> float:
    """Validation loss per token (nats) -> bits per UTF-8 byte of validation text.

    bits/byte = loss / ln 2 * tokens / bytes, so tokenizers of any vocabulary compare.

    >>> round(bits_per_byte(3.0, {"val_tokens": 100_000, "val_bytes": 320_000}), 3)
    1.353
    """
    return loss_nats / math.log(2) * info["val_tokens"] / info["val_bytes"]


def samples(model, tok: Tokenizer, prompts, max_new_tokens: int) -> list:
    """Greedy continuation of each prompt: [(prompt, continuation text)].

    Greedy with a repetition penalty (transformers' rule, 1.3): still
    deterministic, but a small model no longer repeats one token forever.
    """
    out = []
    for prompt in prompts:
        ids = tok.encode_ordinary(prompt)[-model.config.block_size:] or [tok.eot_id]
        new = generate(model, np.array(ids), max_new_tokens, temperature=0.0, stop=[tok.eot_id],
                       repetition_penalty=REPETITION_PENALTY)
        new = new[len(ids):]
        out.append((prompt, tok.decode([i for i in new.tolist() if i != tok.eot_id])))
    return out


def default_prompts(settings: RunSettings, n: int) -> list:
    """The built-in corpus: BUILTIN_PROMPTS; your data: the first words of validation documents."""
    if not settings.sources:
        return list(BUILTIN_PROMPTS[:n]) + [""] * max(0, n - len(BUILTIN_PROMPTS))
    _, val_docs = gather(settings, say=lambda message: None)
    return [" ".join(d.text.split()[:3]) for d in val_docs[:n]]
