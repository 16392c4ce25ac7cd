"""`tinygen pretrain`: corpus -> tokenizer -> token cache -> training loop -> run directory.

    tinygen pretrain                              # the `small` preset on the built-in corpus
    tinygen pretrain --preset tiny --out runs/t   # seconds
    tinygen pretrain --data notes/ --max-steps 2000 --out runs/notes
    tinygen pretrain --resume runs/notes --max-steps 4000

Every step of the way is an importable function: `resolve` (flags -> the
run's settings), `prepare_data` (documents -> tokenizer and cached token
arrays), `tinygen.train.train` (the loop), `samples` (greedy continuations).
"""
import dataclasses
import math
import os
import sys

import numpy as np

from .. import checkpoint as ckpt
from .flags import add_dataclass_arguments, dataclass_overrides
from ..data import (DataConfig, RandomBatches, builtin_corpus, fixed_batches, load_token_cache,
                    read_documents, split_documents, text_slice, token_cache)
from ..errors import TinygenError
from ..plumbing.fileio import atomic_write_json, read_json
from ..plumbing.lock import run_lock
from ..model import GPT
from ..plumbing.progress import Progress, format_duration
from ..tokenizer.tokenizer import ENDOFTEXT, Tokenizer
from ..train import HELP, PRESETS, TrainConfig, TrainingDiverged, train

RUN_FORMAT, RUN_VERSION = "tinygen-train-config", 1
DATA_HELP = {
    "corpus_bytes": "cap on the built-in corpus, in bytes of UTF-8 (documents in a fixed shuffled order)",
    "val_fraction": "share of documents held out for the validation loss",
    "tokenizer_bytes": "train the tokenizer on the first this many bytes of the training split",
    "pattern": "the tokenizer's split regex: gpt2, gpt4 or a pattern of your own",
}
BUILTIN_PROMPTS = ("def", "    def __init__(self", "The")  # no trailing space: " x" is one token
REPETITION_PENALTY = 1.3  # pure greedy decoding of a model this small loops on one token


def add_parser(sub):
    p = sub.add_parser(
        "pretrain",
        help="train a GPT-2 from scratch on the built-in corpus or your text",
        description="Train a byte-level BPE tokenizer and a GPT-2 from scratch. With no arguments: the "
        "`small` preset (about 4 minutes on 2 cores) on the built-in corpus (Python's language reference "
        "and standard-library sources). Writes a run directory that transformers can load and that "
        "--resume continues bit for bit. Ctrl-C saves a checkpoint and exits.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="starting values for every knob below; a flag overrides its value (default: small; "
                   + "; ".join(f"{k}: {_preset_summary(k)}" for k in sorted(PRESETS)) + ")")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="UTF-8 text files or folders to train on (default: the built-in corpus)")
    p.add_argument("--encoding-errors", choices=["strict", "replace"], default=None,
                   help="on bytes that are not UTF-8: stop with an error naming the file and offset "
                   "(strict), or substitute U+FFFD (replace) (default: strict)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory to create (default: runs/pretrain-PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint, to --max-steps")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that already holds a run (its tokenizer and token cache "
                   "are reused when they match)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="use this tokenizer (a tokenizer.json or a directory holding one) instead of training one")
    p.add_argument("--samples", type=int, default=3, metavar="N",
                   help="greedy samples printed at the end (default: 3)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt for the samples at the end; repeat for several (default: 'def', "
                   "'    def __init__(self', 'The' on the built-in corpus, the first words of "
                   "validation documents on --data)")
    p.add_argument("--sample-tokens", type=int, default=48, metavar="N",
                   help="tokens per sample (default: 48)")
    add_dataclass_arguments(p.add_argument_group("model and training (TrainConfig)"), TrainConfig, HELP)
    add_dataclass_arguments(p.add_argument_group("data (DataConfig)"), DataConfig, DATA_HELP)
    p.set_defaults(run=run)


def _preset_summary(name):
    values = {**TrainConfig().to_dict(), **DataConfig().to_dict(), **PRESETS[name]}
    keys = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "vocab_size", "max_steps")
    return ", ".join(f"{k}={values[k]}" for k in keys)


# ------------------------------------------------------------------ settings
# What --resume may change: how far to train, and on how many threads (the same
# --workers reproduce the uninterrupted run bit for bit; another count changes
# only rounding and dropout masks, see tinygen.train).
RESUMABLE = ("max_steps", "workers")


def resolve(args) -> dict:
    """Flags -> the run's settings (what train_config.json holds); checks the run directory."""
    train_over = dataclass_overrides(args, TrainConfig)
    data_over = dataclass_overrides(args, DataConfig)
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in {**train_over, **data_over} if k not in RESUMABLE]
        given += [f for f, v in (("--preset", args.preset), ("--data", args.data), ("--out", args.out),
                                 ("--encoding-errors", args.encoding_errors), ("--tokenizer", args.tokenizer),
                                 ("--overwrite", args.overwrite)) if v]
        if given:
            raise TinygenError(f"--resume continues the run as recorded in its {ckpt.TRAIN_CONFIG}; only "
                               f"--max-steps and --workers can change (got {', '.join(given)})")
        settings = read_settings(args.resume)
        changed = {k: v for k, v in train_over.items() if k in RESUMABLE}
        settings["train"] = TrainConfig(**{**settings["train"], **changed}).to_dict()
        return settings
    preset = args.preset or "small"
    values = {**PRESETS[preset], **train_over, **data_over}
    data_keys = DataConfig.__dataclass_fields__.keys()
    data = DataConfig(**{k: v for k, v in values.items() if k in data_keys})
    config = TrainConfig(**{k: v for k, v in values.items() if k not in data_keys})
    tokenizer = os.path.abspath(args.tokenizer) if args.tokenizer else None
    if tokenizer:
        vocab = _load_tokenizer(tokenizer).vocab_size
        if "vocab_size" in train_over and train_over["vocab_size"] != vocab:
            raise TinygenError(f"--vocab-size {train_over['vocab_size']} differs from --tokenizer's {vocab}")
        config = dataclasses.replace(config, vocab_size=vocab)
    config = dataclasses.replace(config, lr_decay_steps=config.decay_steps)  # fixed, so --resume --max-steps keeps it
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "command": "pretrain", "preset": preset,
            "run_dir": args.out or f"runs/pretrain-{preset}",
            "sources": [os.path.abspath(p) for p in args.data] if args.data else None,
            "encoding_errors": args.encoding_errors or "strict", "tokenizer": tokenizer,
            "train": config.to_dict(), "data": data.to_dict()}


def read_settings(run_dir) -> dict:
    path = os.path.join(run_dir, ckpt.TRAIN_CONFIG)
    if not os.path.isdir(run_dir):
        raise TinygenError(f"--resume {run_dir}: no such directory")
    if not os.path.isfile(path):
        raise TinygenError(f"--resume {run_dir}: no {ckpt.TRAIN_CONFIG}, so not a tinygen run directory")
    settings = read_json(path, what="run settings")
    if not isinstance(settings, dict) or settings.get("format") != RUN_FORMAT:
        raise TinygenError(f"{path}: not a tinygen run settings file")
    if settings.get("version") != RUN_VERSION:
        raise TinygenError(f"{path}: settings version {settings.get('version')!r}, this tinygen reads {RUN_VERSION}")
    try:
        TrainConfig(**settings["train"]), DataConfig(**settings["data"])
    except (KeyError, TypeError, TinygenError) as e:
        raise TinygenError(f"{path}: malformed settings: {type(e).__name__}: {str(e)[:200]}") from None
    sources, tokenizer = settings.get("sources"), settings.get("tokenizer")
    if (settings.get("encoding_errors") not in ("strict", "replace")
            or not (tokenizer is None or isinstance(tokenizer, str))
            or not (sources is None or isinstance(sources, list) and all(isinstance(p, str) for p in sources))):
        raise TinygenError(f"{path}: malformed settings: expected \"sources\" null or a list of paths, "
                           "\"encoding_errors\" strict or replace, \"tokenizer\" null or a path")
    settings["run_dir"] = run_dir
    return settings


def start_run_dir(settings, overwrite: bool) -> None:
    """Create the run directory of a fresh run; refuse one that holds a checkpoint unless overwrite."""
    run_dir = settings["run_dir"]
    step = ckpt.checkpoint_step(run_dir) if os.path.isdir(run_dir) else None
    if step is not None and not overwrite:
        raise TinygenError(f"{run_dir} already holds a run (checkpoint at step {step}): continue it with "
                           f"--resume {run_dir} [--max-steps N], start over with --overwrite, or pick another --out")
    os.makedirs(run_dir, exist_ok=True)
    for name in (ckpt.TRAIN_STATE, ckpt.MODEL, ckpt.CONFIG, ckpt.METRICS, ckpt.LOSS_SVG):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    atomic_write_json(os.path.join(run_dir, ckpt.TRAIN_CONFIG), settings)


# ------------------------------------------------------------------ data
def _load_tokenizer(path) -> Tokenizer:
    tok = Tokenizer.load_dir(path) if os.path.isdir(path) else Tokenizer.load(path)
    if tok.eot_id is None:
        raise TinygenError(f"tokenizer {path} has no {ENDOFTEXT} special token to separate documents")
    return tok


def gather(settings, say=print):
    """(train, val) documents of the run's sources."""
    data = DataConfig(**settings["data"])
    if settings["sources"]:
        docs = read_documents(settings["sources"], settings["encoding_errors"], exclude=[settings["run_dir"]])
    else:
        docs = builtin_corpus(data.corpus_bytes, notice=say)
    return split_documents(docs, data.val_fraction)


def prepare_data(settings, resume: bool, say=print):
    """-> (tokenizer, TokenData): RUN_DIR/tokenizer.json and the memory-mapped token cache.

    A resumed run reuses both without reading its sources again. A fresh run
    reuses RUN_DIR's tokenizer if it was trained on the same text with the same
    settings, and the cache if it holds the same corpus and tokenizer.
    """
    run_dir = settings["run_dir"]
    data_dir = os.path.join(run_dir, ckpt.DATA_DIR)
    tok_path = os.path.join(run_dir, ckpt.TOKENIZER)
    if resume and os.path.isfile(tok_path):
        tok = Tokenizer.load(tok_path)
        cached = load_token_cache(data_dir, tok)
        if cached is not None:
            return tok, cached
    train_docs, val_docs = gather(settings, say)
    data, config = DataConfig(**settings["data"]), TrainConfig(**settings["train"])
    texts = text_slice(train_docs, data.tokenizer_bytes)
    key = {"texts": _digest_texts(texts), "vocab_size": config.vocab_size, "pattern": data.pattern,
           "tokenizer": settings["tokenizer"]}
    previous = load_token_cache(data_dir)
    if resume and os.path.isfile(tok_path):
        tok = Tokenizer.load(tok_path)
    elif os.path.isfile(tok_path) and previous is not None and previous.info.get("tokenizer_key") == key:
        tok = Tokenizer.load(tok_path)
        say(f"reusing {tok_path}")
    elif settings["tokenizer"]:
        tok = _load_tokenizer(settings["tokenizer"])
        tok.save(tok_path)
    else:
        progress = Progress(total=config.vocab_size - 257, desc="tokenizer", unit="merge")
        tok = Tokenizer.train(texts, config.vocab_size, pattern=data.pattern, special_tokens=[ENDOFTEXT],
                              progress=progress)
        progress.close()
        tok.save(tok_path)
    total = sum(len(d.text) for d in train_docs + val_docs)
    progress = Progress(total=total, desc="tokenizing", unit="char")
    tokens = token_cache(data_dir, tok, train_docs, val_docs, progress, extra={"tokenizer_key": key})
    progress.close()
    return tok, tokens


def _digest_texts(texts) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


# ------------------------------------------------------------------ samples and report
def bits_per_byte(loss_nats: float, info: dict) -> float:
    """Validation loss per token (nats) -> bits per UTF-8 byte of validation text.

    bits/byte = loss / ln 2 * tokens / bytes, so tokenizers of any vocabulary compare.
    """
    return loss_nats / math.log(2) * info["val_tokens"] / info["val_bytes"]


def samples(model, tok, prompts, max_new_tokens: int) -> list:
    """Greedy continuation of each prompt: [(prompt, continuation text)].

    Greedy with a repetition penalty (transformers' rule, 1.3): still
    deterministic, but a small model no longer repeats one token forever.
    """
    from ..sampling import generate

    out = []
    for prompt in prompts:
        ids = tok.encode_ordinary(prompt)[-model.config.block_size:] or [tok.eot_id]
        new = generate(model, np.array(ids), max_new_tokens, temperature=0.0, stop=[tok.eot_id],
                       repetition_penalty=REPETITION_PENALTY)
        new = new[len(ids):]
        out.append((prompt, tok.decode([i for i in new.tolist() if i != tok.eot_id])))
    return out


def default_prompts(settings, n: int) -> list:
    """The built-in corpus: BUILTIN_PROMPTS; your data: the first words of validation documents."""
    if not settings["sources"]:
        return list(BUILTIN_PROMPTS[:n]) + [""] * max(0, n - len(BUILTIN_PROMPTS))
    _, val_docs = gather(settings, say=lambda message: None)
    return [" ".join(d.text.split()[:3]) for d in val_docs[:n]]


def run(args) -> int:
    settings = resolve(args)
    # issue 17: one writer per run directory, from before start_run_dir clears an old run's files;
    # a failed write (WriteError) says which checkpoint is kept
    with run_lock(settings["run_dir"]), ckpt.report_kept(settings["run_dir"]):
        return _run(args, settings)


def _run(args, settings) -> int:
    resume = bool(args.resume)
    run_dir = settings["run_dir"]
    if not resume:
        start_run_dir(settings, args.overwrite)
    else:
        atomic_write_json(os.path.join(run_dir, ckpt.TRAIN_CONFIG), settings)
    config = TrainConfig(**settings["train"])
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    done = ckpt.checkpoint_step(run_dir) if resume else None
    if done is not None and done >= config.max_steps:
        say(f"{run_dir} is already at step {done} (--max-steps {config.max_steps}): nothing to do; "
            f"pass a larger --max-steps to train further")
        return 0
    tok, tokens = prepare_data(settings, resume, say)
    model = GPT(config.model_config(tok.vocab_size), seed=config.seed)
    say(f"{model.num_params / 1e6:.2f}M parameters, {tokens.train.size:,} training tokens, "
        f"{tokens.val.size:,} validation tokens; {config.max_steps} steps of {config.tokens_per_step:,} tokens")
    batches = RandomBatches(tokens.train, config.batch_size * config.grad_accum, config.block_size, config.seed)
    val = fixed_batches(tokens.val, config.eval_batches, config.batch_size, config.block_size, config.seed)
    try:
        result = train(model, batches, config, run_dir, val_batches=val, resume=resume, log=say)
    except TrainingDiverged as e:
        print(f"tinygen pretrain: error: {e}", file=sys.stderr)
        return 1
    if result.interrupted:
        say(f"stopped at step {result.step}; continue with: tinygen pretrain --resume {run_dir}")
        return 130
    print(f"run directory: {run_dir}")
    if result.val_loss is not None:
        print(f"step {result.step}: val loss {result.val_loss:.4f} nats/token = "
              f"{bits_per_byte(result.val_loss, tokens.info):.3f} bits/byte "
              f"(training time {format_duration(result.elapsed_s)})")
    if args.samples > 0 and args.sample_tokens > 0:
        print("greedy samples:")
        prompts = args.prompt or default_prompts(settings, args.samples)
        for prompt, text in samples(model, tok, prompts[:args.samples], args.sample_tokens):
            print(f"--- {prompt!r}\n{prompt}{text}")
    return 0
