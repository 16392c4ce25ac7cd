"""Training data: documents in, memory-mapped token arrays and random batches out.

    documents (built-in corpus or --data files)
      -> train / validation split, by document (a hash of its name)
      -> token ids, documents joined by <|endoftext|>     (N,) uint16 or uint32
      -> RUN_DIR/data/train.npy, val.npy                  cached, memory-mapped
      -> batches: B random windows of T+1 tokens          x (B, T), y (B, T)

The built-in corpus needs no download: every CPython carries the language
reference (`pydoc_data.topics`) and the standard library's own sources.
Both are gathered in a fixed order, so a given Python version always yields
the same corpus. Randomness is passed in: the batch of step s is drawn from
`np.random.default_rng([seed, 0, s])`, so the data position of a run is its
step and nothing else needs saving to resume.

Shapes: B batch, T block size (context length), N tokens in a split.
"""
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from .config import POSITIVE, number, one_of, optional, option, validate
from .errors import TinygenError, WriteError
from .plumbing.fileio import atomic_open, atomic_write_json, make_dirs, read_json
from .plumbing.rundir import TOKENS_INFO, TRAIN_TOKENS, VAL_TOKENS
from .tokenizer.tokenizer import ENDOFTEXT

CACHE_FORMAT, CACHE_VERSION = "tinygen-token-cache", 1
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "encodings",  # codec tables: 80% hex literals
                 "pydoc_data"}  # topics.py, whose text is included as documents of its own
EXCLUDED_FILES = {"html/entities.py", "stringprep.py", "locale.py"}  # mostly generated lookup tables
STREAM_TRAIN, STREAM_DROPOUT, STREAM_VAL = 0, 1, 2  # the first words of default_rng([seed, stream, ...])


SPLIT_FILES = {"train": TRAIN_TOKENS, "val": VAL_TOKENS}  # the token cache's arrays, by split


def _text(value) -> Optional[str]:
    """A check: a non-empty string."""
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def _pattern(value) -> Optional[str]:
    """A check: a non-empty string (a pattern name or a regex; the tokenizer compiles it)."""
    return None if isinstance(value, str) and value else "'gpt2', 'gpt4' or a regex"


@dataclass(frozen=True)
class DataConfig:
    """How the corpus becomes training text; the pretraining command's data knobs."""

    corpus_bytes: Optional[int] = option(
        6_000_000, "cap on the built-in corpus, in bytes of UTF-8 (documents in a fixed shuffled order)",
        optional(POSITIVE))
    val_fraction: float = option(0.05, "share of documents held out for the validation loss",
                                 number(0.0, 1.0, low_open=True, high_open=True))
    tokenizer_bytes: Optional[int] = option(
        2_000_000, "train the tokenizer on the first this many bytes of the training split", optional(POSITIVE))
    pattern: str = option("gpt4", "the tokenizer's split regex: gpt2, gpt4 or a pattern of your own", _pattern)
    exclude_modules: Optional[str] = option(
        None, "standard-library modules to leave out of the built-in corpus, comma-separated "
        "(the demo leaves out the modules its fine-tuning tasks are evaluated on)", optional(_text))
    objective: str = option("next-token", "what the model learns: next-token (GPT-2, causal) or mlm (masked "
                            "language modelling, BERT: bidirectional attention); see docs/objectives.md",
                            one_of("next-token", "mlm"))
    fim_rate: float = option(0.0, "fill-in-the-middle: the share of documents rearranged as prefix/suffix/middle "
                             "(next-token only; 0 = plain text)", number(0.0, 1.0))

    def __post_init__(self):
        validate(self)
        if self.objective == "mlm" and self.fim_rate:
            raise TinygenError(f"DataConfig.fim_rate must be 0 with objective 'mlm', got {self.fim_rate}: "
                               "fill-in-the-middle rearranges text for next-token prediction")

    @property
    def excluded(self) -> frozenset:
        """exclude_modules as a set: "json, ast" -> {"json", "ast"}."""
        return frozenset(m.strip() for m in (self.exclude_modules or "").split(",") if m.strip())


class Document(NamedTuple):
    name: str  # "stdlib/json/decoder.py", "pydoc_data/topics/assert", "notes.txt#2"
    text: str


def _hash(text: str) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _nbytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8"))


# ------------------------------------------------------------------ gathering
def stdlib_sources(root=None) -> list:
    """Paths of the standard library's .py files, sorted.

    Left out: tests, site-packages, and files that are mostly data tables
    rather than Python (codec maps, HTML entities, the build's
    _sysconfigdata), which would teach the model to recite hex numbers.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        for f in sorted(files):
            path = os.path.join(directory, f)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if (f.endswith(".py") and not f.startswith(("test_", "_sysconfigdata"))
                    and relative not in EXCLUDED_FILES):
                paths.append(path)
    return sorted(paths)


def builtin_corpus(max_bytes=None, notice=None, exclude_modules=()) -> list:
    """The built-in corpus: pydoc_data topics + standard-library sources, as Documents.

    Documents come in a fixed pseudo-random order (by a hash of the name), so a
    `max_bytes` cap takes a spread of modules, not the alphabetically first;
    a document that would overflow the cap is skipped. `exclude_modules`
    (top-level names: {"json", "calendar"}) then drops those modules' sources:
    the cap is applied first, so a corpus with exclusions is the one without
    them minus those files. `notice(message)` is told when pydoc_data is
    missing (sources only, then).
    """
    notice = notice or (lambda message: print(message, file=sys.stderr))
    candidates = []  # (name, size in bytes, loader)
    try:
        from pydoc_data.topics import topics
    except ImportError:
        notice("pydoc_data is not installed: the built-in corpus uses the standard library sources only")
        topics = {}
    for key in sorted(topics):
        text = topics[key]
        candidates.append((f"pydoc_data/topics/{key}", len(text.encode("utf-8")), lambda t=text: t))
    root = sysconfig.get_paths()["stdlib"]
    for path in stdlib_sources(root):
        name = "stdlib/" + os.path.relpath(path, root).replace(os.sep, "/")
        candidates.append((name, os.path.getsize(path), lambda p=path: _read_source(p)))
    candidates.sort(key=lambda c: (_hash(c[0]), c[0]))
    docs, total = [], 0
    for name, size, load in candidates:
        if max_bytes is not None and total + size > max_bytes:
            continue
        text = load()
        if not text.strip():
            continue
        total += size
        if stdlib_module(name) not in exclude_modules:
            docs.append(Document(name, text))
    if not docs:
        raise TinygenError(f"the built-in corpus is empty (corpus_bytes={max_bytes}); raise --corpus-bytes")
    return docs


def stdlib_module(name: str) -> Optional[str]:
    """The top-level module of a built-in corpus document, None for a pydoc topic.

    >>> stdlib_module("stdlib/json/decoder.py"), stdlib_module("stdlib/calendar.py")
    ('json', 'calendar')
    """
    return name.split("/")[1].removesuffix(".py") if name.startswith("stdlib/") else None


def _read_source(path) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def read_documents(paths, encoding_errors="strict", exclude=()) -> list:
    """Documents from UTF-8 text files or folders (searched recursively, sorted).

    Hidden files and folders are skipped, and so are the folders in
    `exclude` (the run directory, when it sits inside the data). A file is split at each literal
    <|endoftext|> into several documents. Text that is not UTF-8 raises a
    TinygenError naming the file and byte offset, unless encoding_errors is
    "replace" (U+FFFD for each bad byte).
    """
    if encoding_errors not in ("strict", "replace"):
        raise TinygenError(f"encoding_errors must be 'strict' or 'replace', got {encoding_errors!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs = []
    for path in _expand(paths, {os.path.abspath(e) for e in exclude}):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8", errors=encoding_errors)
        except UnicodeDecodeError as e:
            raise TinygenError(
                f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} ({e.reason}); "
                f"convert the file, leave it out, or pass --encoding-errors replace") from None
        parts = text.removeprefix("\ufeff").split(ENDOFTEXT)
        for k, part in enumerate(parts):
            if part.strip():
                docs.append(Document(path if len(parts) == 1 else f"{path}#{k}", part))
    if not docs:
        raise TinygenError(f"no text in {', '.join(map(str, paths))}")
    return docs


def _expand(paths, exclude=frozenset()) -> list:
    """Files and folders -> files, folders walked in sorted order without hidden entries."""
    files = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = []
            for directory, subdirs, names in os.walk(path):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")
                                    and os.path.abspath(os.path.join(directory, d)) not in exclude)
                found += [os.path.join(directory, n) for n in names if not n.startswith(".")]
            if not found:
                raise TinygenError(f"{path}: the folder holds no files")
            files += sorted(found)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise TinygenError(f"{path}: no such file or folder")
    return files


def split_documents(docs, val_fraction: float):
    """(train, val): documents move to val, in the order of a hash of their names,
    until val holds val_fraction of the bytes.

    A document that would push val past 1.5x its share is skipped, so one
    large file cannot swallow the split; at least one document goes each way
    when there are two or more. A lone document gives its last val_fraction
    (cut at a line break) to val.
    """
    if len(docs) == 1:
        name, text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > len(text) // 2 else cut
        return [Document(name + "[train]", text[:cut])], [Document(name + "[val]", text[cut:])]
    sizes = [_nbytes(d) for d in docs]
    target = val_fraction * sum(sizes)
    order = sorted(range(len(docs)), key=lambda i: (_hash("val:" + docs[i].name), i))
    val, held = set(), 0
    for i in order:
        if held >= target or len(val) == len(docs) - 1:
            break
        if held + sizes[i] <= 1.5 * target:
            val.add(i)
            held += sizes[i]
    if not val:
        val.add(order[0])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def digest(docs) -> str:
    """sha256 of the documents' names and texts, in order: the identity of a split."""
    h = hashlib.sha256()
    for name, text in docs:
        for part in (name, text):
            data = part.encode("utf-8", errors="surrogatepass")
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()


def text_slice(docs, max_bytes=None) -> list:
    """The texts of the first documents, max_bytes of UTF-8 in all (the last one cut).

    >>> text_slice([Document("a", "hello"), Document("b", "world")], 7)
    ['hello', 'wo']
    """
    texts, total = [], 0
    for _, text in docs:
        if max_bytes is not None and total >= max_bytes:
            break
        raw = text.encode("utf-8", errors="surrogatepass")
        if max_bytes is not None and total + len(raw) > max_bytes:
            text = raw[: max_bytes - total].decode("utf-8", errors="ignore")
        texts.append(text)
        total += len(raw)
    return texts


# ------------------------------------------------------------------ tokens
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_documents(tokenizer, docs, progress=None, done=0) -> np.ndarray:
    """[doc0 ids, eot, doc1 ids, eot, ...] as one (N,) array.

    Each document is encoded as ordinary text: a literal "<|endoftext|>"
    inside one never becomes the separator. `progress.update` is told the
    characters done so far, counting from `done`.
    """
    if tokenizer.eot_id is None:
        raise TinygenError(f"the tokenizer has no {ENDOFTEXT} token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    eot = np.array([tokenizer.eot_id], dtype)
    parts = []
    for name, text in docs:
        parts += [np.array(tokenizer.encode_ordinary(text), dtype), eot]
        done += len(text)
        if progress is not None:
            progress.update(done)
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


class TokenData(NamedTuple):
    train: np.ndarray  # (N_train,) memory-mapped, read-only
    val: np.ndarray  # (N_val,)
    info: dict  # data/tokens.json: digests, counts, val_bytes


def load_token_cache(data_dir, tokenizer=None) -> Optional[TokenData]:
    """The cached arrays, or None if absent, damaged, or made with another tokenizer.

    A cache is only ever rebuilt, never trusted in part: a tokens.json that
    does not parse, or arrays that are not 1-D integer arrays of the sizes
    it records, make this return None (and the caller tokenize again).
    """
    path = os.path.join(data_dir, TOKENS_INFO)
    if not os.path.isfile(path):
        return None
    try:
        info = read_json(path, what="token cache description")
    except (TinygenError, OSError):
        return None  # damaged: rebuild
    if not isinstance(info, dict) or info.get("format") != CACHE_FORMAT or info.get("version") != CACHE_VERSION:
        return None
    if tokenizer is not None and info.get("tokenizer_sha256") != tokenizer_digest(tokenizer):
        return None
    try:
        arrays = [np.load(os.path.join(data_dir, SPLIT_FILES[split]), mmap_mode="r", allow_pickle=False)
                  for split in ("train", "val")]
    except (OSError, ValueError):
        return None  # a file missing or damaged: rebuild
    if any(a.ndim != 1 or a.dtype.kind not in "iu" for a in arrays):
        return None
    if [a.size for a in arrays] != [info.get("train_tokens"), info.get("val_tokens")]:
        return None
    return TokenData(arrays[0], arrays[1], info)


def token_cache(data_dir, tokenizer, train_docs, val_docs, progress=None, extra=None) -> TokenData:
    """Tokenize both splits once into data_dir/{train,val}.npy; later calls memory-map them.

    data_dir/tokens.json records the tokenizer's and the corpus's sha256; if
    either differs from the cache's, the cache is rebuilt. The rebuild
    removes tokens.json first and writes it last, so a build that is
    interrupted (Ctrl-C, SIGKILL, a full disk) leaves no description that a
    later start could take for a whole cache: at worst new train.npy next to
    old val.npy with no tokens.json, which is rebuilt.
    `extra`: more JSON-ready entries for tokens.json.
    """
    corpus = digest(train_docs) + digest(val_docs)
    cached = load_token_cache(data_dir, tokenizer)
    if cached is not None and cached.info.get("corpus_sha256") == corpus:
        return cached
    make_dirs(data_dir)
    description = os.path.join(data_dir, TOKENS_INFO)
    try:
        if os.path.lexists(description):
            os.remove(description)  # the old cache stops being trusted before any of it changes
    except OSError as e:
        raise WriteError(description, e) from e
    info = {"format": CACHE_FORMAT, "version": CACHE_VERSION,
            "tokenizer_sha256": tokenizer_digest(tokenizer), "corpus_sha256": corpus,
            "dtype": str(token_dtype(tokenizer.vocab_size)), **(extra or {})}
    done = 0
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = encode_documents(tokenizer, docs, progress, done)
        done += sum(len(d.text) for d in docs)
        with atomic_open(os.path.join(data_dir, SPLIT_FILES[split]), "wb") as f:
            np.save(f, ids, allow_pickle=False)
        info[f"{split}_tokens"] = int(ids.size)
        info[f"{split}_bytes"] = sum(map(_nbytes, docs))
        info[f"{split}_documents"] = len(docs)
    atomic_write_json(description, info)  # the commit point
    return load_token_cache(data_dir, tokenizer)


# ------------------------------------------------------------------ batches
def random_windows(ids, batch_size: int, block_size: int, rng: np.random.Generator):
    """B random windows of T+1 tokens -> (x, y), y is x shifted by one.

    ids (N,) -> x (B, T) int64, y (B, T) int64, with y[:, t] = x[:, t+1].
    >>> x, y = random_windows(np.arange(10), 2, 3, np.random.default_rng(0))
    >>> x.shape, bool((y == x + 1).all())
    ((2, 3), True)
    """
    n = ids.shape[0]
    if n < block_size + 1:
        raise TinygenError(f"a split of {n} tokens is shorter than one window of block_size+1 = "
                           f"{block_size + 1} tokens; use more text or a smaller --block-size")
    starts = rng.integers(0, n - block_size, size=batch_size)  # (B,) in [0, N-T-1]
    windows = np.asarray(ids[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


class RandomBatches:
    """batches(step) -> (x, y): the step's windows from default_rng([seed, 0, step]).

    A pure function of the step, so a resumed run sees the same batches as
    an uninterrupted one without any saved data position.
    """

    def __init__(self, ids, batch_size: int, block_size: int, seed: int):
        self.ids, self.batch_size, self.block_size, self.seed = ids, batch_size, block_size, seed
        random_windows(ids, 1, block_size, np.random.default_rng(0))  # fail early if too short

    def __call__(self, step: int):
        rng = np.random.default_rng([self.seed, STREAM_TRAIN, step])
        return random_windows(self.ids, self.batch_size, self.block_size, rng)


def fixed_batches(ids, n_batches: int, batch_size: int, block_size: int, seed: int) -> list:
    """The held-out batches every evaluation uses: [(x, y)] * n_batches, drawn once."""
    rng = np.random.default_rng([seed, STREAM_VAL])
    return [random_windows(ids, batch_size, block_size, rng) for _ in range(n_batches)]
