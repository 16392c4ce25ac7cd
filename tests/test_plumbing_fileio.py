"""Atomic file writes and strict JSON reading (tinygen.plumbing.fileio), and every file
tinygen reads fuzzed through them, as test_plumbing_safetensors fuzzes checkpoints.

Writes: the format written, a Ctrl-C mid-write leaves the old file and no temp file, a
failed append is cut back, clear errors for bad JSON and modes.

Hostile files. The contract of each loader, whatever bytes it is given: it returns, or
it raises TinygenError naming the file (and the line, in line-based files: JSONL,
tiktoken rank files, merges.txt); never another exception type, never longer than
TIME_LIMIT_S, never a peak allocation far beyond the file's size. Every JSON loader
reads through fileio.parse_json (deep nesting, invalid UTF-8, over-long integers and
repeated keys are its errors) and then checks the types it uses.

Each loader gets a fixed table of hostile inputs (deep nesting, invalid UTF-8, huge
numbers, wrong types, repeated and missing keys, truncation), then hypothesis-drawn
mutations of a valid file: byte edits (cuts, bit flips, hostile fragments spliced in)
and JSON-tree edits (a value replaced by a hostile one, a key deleted, a key repeated).
"""
import base64
import collections
import contextlib
import errno
import json
import os
import signal
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinygen.checkpoint import load_train_state, read_config
from tinygen.cli.main import build_parser
from tinygen.cli import finetune as finetune_cli
from tinygen.config import GPTConfig
from tinygen.data import SPLIT_FILES, Document, load_token_cache, token_cache
from tinygen.errors import TinygenError, WriteError
from tinygen.finetuning.finetune import (ADAPTER_FILE, FINETUNE_FILE, FinetuneConfig, apply_adapter, base_identity,
                                         build_model, save_adapter, write_run_files)
from tinygen.finetuning.tasks import Example, read_jsonl, write_jsonl
from tinygen.gpt import GPT
from tinygen.plumbing.fileio import (append_bytes, atomic_open, atomic_write_bytes, atomic_write_json,
                                     atomic_write_text, read_json)
from tinygen.plumbing.metrics import MetricsLog, read_metrics, truncate_after
from tinygen.plumbing.plot import write_loss_svg
from tinygen.plumbing.rundir import CONFIG, LOSS_SVG, METRICS, TOKENIZER, TOKENS_INFO, TRAIN_CONFIG, TRAIN_STATE
from tinygen.plumbing.safetensors import load_metadata, save_file
from tinygen.pretrain import new_settings, read_settings
from tinygen.tokenizer import ENDOFTEXT, Tokenizer
from tinygen.tokenizer.files import gpt2_byte_chars


# ---------------------------------------------------------------- writes

def test_ctrl_c_during_atomic_open(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path, "w") as f:
            f.write("new, half written")
            temps = [p.name for p in tmp_path.iterdir() if p.name.startswith(".state.json.tmp-")]
            assert len(temps) == 1  # the temp file sits next to its target
            raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_json_format_and_read_json(tmp_path):
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2], "é": "ü"}, sort_keys=True)
    assert (tmp_path / "c.json").read_text("utf-8") == (
        '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1,\n  "é": "ü"\n}\n')
    assert read_json(tmp_path / "c.json") == {"a": [1, 2], "b": 1, "é": "ü"}
    atomic_write_bytes(tmp_path / "c.json", b'{"a": 1,\n')
    with pytest.raises(TinygenError, match=r"run config .*c\.json: not valid JSON \(line 2"):
        read_json(tmp_path / "c.json", what="run config")


def test_atomic_open_rejects_other_modes(tmp_path):
    with pytest.raises(TinygenError, match="expected 'wb' or 'w'"):
        with atomic_open(tmp_path / "x", "ab"):
            pass


def test_an_append_that_fails_half_way_is_cut_back(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"step": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))  # half the line reaches the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(WriteError, match=r"metrics.jsonl: No space left on device \(ENOSPC\)"):
        append_bytes(log, b'{"step": 2, "train_loss": 3.5}\n')
    monkeypatch.undo()
    assert log.read_bytes() == b'{"step": 1}\n'


# ---------------------------------------------------------------- hostile files: every loader, fuzzed

TIME_LIMIT_S = 5.0  # per load; a healthy one takes milliseconds
MEMORY_FACTOR, MEMORY_SLACK = 64, 16_000_000  # peak allocation < 64 x file size + 16 MB
DEEP = 100_000  # brackets: far past Python's recursion limit

# ---------------------------------------------------------------- the contract


class Hang(BaseException):
    """Raised by the timer; a BaseException so that no loader's `except Exception` hides it."""


@contextlib.contextmanager
def time_limit(seconds):
    if not hasattr(signal, "setitimer"):  # Windows: no timer, the test still checks the result
        yield
        return

    def ring(signum, frame):
        raise Hang(f"a load took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def loads_or_rejects(loader, raw: bytes, line=None):
    """Write `raw` where `loader` reads it, load it; the outcome must keep the contract.

    Returns "loaded" or "rejected". `line`: the line number the message must name.
    """
    path = loader.write(raw)
    tracemalloc.start()
    try:
        with time_limit(TIME_LIMIT_S):
            try:
                result = loader.load()
                outcome = "rejected" if result is None and loader.none_rejects else "loaded"
            except TinygenError as e:
                message = str(e)
                assert os.path.basename(path) in message, f"{loader.name}: message does not name the file: {message}"
                if line is not None:
                    assert f":{line}:" in message or f"line {line}" in message, message
                outcome = "rejected"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_FACTOR * len(raw) + MEMORY_SLACK, f"{loader.name}: peak {peak} B for a {len(raw)} B file"
    return outcome


# ---------------------------------------------------------------- the loaders and their valid files


class Loader:
    """A file a loader reads: `write(raw)` puts bytes in place, `load()` reads them the way tinygen does."""

    def __init__(self, name, folder, filename, valid: bytes, load, json_lines=False, is_json=True,
                 none_rejects=False):
        self.name, self.path, self.valid = name, os.path.join(folder, filename), valid
        self.load, self.json_lines, self.is_json = load, json_lines, is_json
        self.none_rejects = none_rejects  # the token cache answers None (rebuild) to a damaged description

    def write(self, raw):
        with open(self.path, "wb") as f:
            f.write(raw)
        return self.path


def small_tokenizer():
    text = "the cat sat on the mat; the dog ate the hat. " * 20 + "def f(x):\n    return x + 1\n" * 10
    return Tokenizer.train(text, 280, special_tokens=[ENDOFTEXT])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder in memory (/dev/shm) where there is one: the loads are under test, not the disk,
    and the atomic writes of the metrics and train-state loaders fsync on every input."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="tinygen-hostile-") as folder:
            yield Path(folder)
    else:
        yield tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def loaders(scratch, tmp_path_factory):
    root, src = scratch, tmp_path_factory.mktemp("valid")
    tok = small_tokenizer()
    out = {}

    def add(name, filename, valid, load, **kw):
        folder = root / name
        folder.mkdir(exist_ok=True)
        out[name] = Loader(name, str(folder), filename, valid, lambda: load(str(folder)), **kw)
        out[name].write(valid)
        assert loads_or_rejects(out[name], valid) == "loaded", name  # the valid file loads

    tok.save(src / "tok.json")
    add("tokenizer.json", TOKENIZER, (src / "tok.json").read_bytes(),
        lambda d: Tokenizer.load(os.path.join(d, TOKENIZER)))

    chars = gpt2_byte_chars()
    show = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    vocab = {show(tok.id_to_bytes(i)): i for i in range(256 + len(tok.merges))}
    vocab[ENDOFTEXT] = tok.eot_id
    merges = "\n".join(["#version: 0.2"] + [f"{show(a)} {show(b)}" for a, b in tok.merges]) + "\n"
    for name in ("vocab.json", "merges.txt"):  # one of the pair is fuzzed, the other stays valid
        folder = root / f"gpt2-{name}"
        folder.mkdir()
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
        add(f"gpt2-{name}", name, (folder / name).read_bytes(),
            lambda d: Tokenizer.from_gpt2(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")),
            is_json=name == "vocab.json")

    ranks = b"".join(base64.b64encode(tok.id_to_bytes(i)) + b" %d\n" % i for i in range(256 + len(tok.merges)))
    add("tiktoken", "small.tiktoken", ranks, lambda d: Tokenizer.from_tiktoken(os.path.join(d, "small.tiktoken")),
        is_json=False)

    config = GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=8)
    add("config.json", CONFIG, json.dumps(config.to_hf(), indent=2).encode(), read_config)

    settings = new_settings(str(src / "run"), preset="tiny")
    add("train_config.json", TRAIN_CONFIG, json.dumps(settings.to_json(), indent=2).encode(), read_settings)

    base = src / "base"
    model = GPT(config, seed=0)
    model.save_pretrained(base)
    ft_dir = src / "finetune"
    identity = base_identity(model.params, config)
    write_run_files(ft_dir, base, FinetuneConfig(method="lora"), "data.jsonl", identity)

    parser = build_parser()

    def resolve_finetune(d):
        return finetune_cli.resolve(parser.parse_args(["finetune", "--resume", d, "--max-steps", "7"]))

    add("finetune.json", FINETUNE_FILE, (ft_dir / FINETUNE_FILE).read_bytes(), resolve_finetune)

    fc = FinetuneConfig(method="lora", lora_rank=2)  # adapter.safetensors: its metadata "config" is fuzzed
    tuned = build_model(model, fc)
    save_adapter(src / ADAPTER_FILE, tuned, [n for n in tuned.params if n not in model.params], identity, fc)
    adapter_meta = load_metadata(src / ADAPTER_FILE)
    adapter_tensors = {n: tuned.params[n] for n in tuned.params if n not in model.params}
    adapter_dir = root / "adapter config"
    adapter_dir.mkdir()

    def write_adapter(raw):
        text = raw.decode("utf-8", errors="surrogateescape").encode("utf-8", "replace").decode("utf-8")
        save_file(adapter_tensors, adapter_dir / ADAPTER_FILE, metadata={**adapter_meta, "config": text})
        return str(adapter_dir / ADAPTER_FILE)

    adapter = Loader("adapter config", str(adapter_dir), ADAPTER_FILE, adapter_meta["config"].encode(),
                     lambda: apply_adapter(model, adapter_dir / ADAPTER_FILE))
    adapter.write = write_adapter
    out["adapter config"] = adapter
    assert loads_or_rejects(adapter, adapter.valid) == "loaded"

    docs = [Document(f"d{i}", "the cat sat on the mat. " * (i + 3)) for i in range(4)]
    cache = src / "cache"
    token_cache(cache, tok, docs[:3], docs[3:])
    (root / "tokens.json").mkdir()
    for split in SPLIT_FILES.values():  # the arrays stay good; their description is what gets fuzzed
        (root / "tokens.json" / split).write_bytes((cache / split).read_bytes())
    add("tokens.json", TOKENS_INFO, (cache / TOKENS_INFO).read_bytes(), lambda d: load_token_cache(d, tok),
        none_rejects=True)

    write_jsonl(src / "tasks.jsonl", [Example(f"add: {i} {i}\n=>", f" {2 * i}", "add") for i in range(6)])
    add("tasks.jsonl", "tasks.jsonl", (src / "tasks.jsonl").read_bytes(),
        lambda d: read_jsonl(os.path.join(d, "tasks.jsonl")), json_lines=True)

    log = MetricsLog(src / METRICS)
    for step in range(6):
        log.append({"step": step, "tokens": 64 * step, "train_loss": 5.0 - 0.1 * step,
                    "val_loss": 5.1 if step % 3 == 0 else None, "lr": 1e-3, "grad_norm": 0.5,
                    "tokens_per_sec": 1e4, "elapsed_s": 0.1 * step})

    def resume_metrics(d):  # what --resume does with a run's log: truncate, reopen, read, plot
        path = os.path.join(d, METRICS)
        truncate_after(path, 3)
        MetricsLog(path)
        write_loss_svg(os.path.join(d, LOSS_SVG), read_metrics(path))

    add("metrics.jsonl", METRICS, (src / METRICS).read_bytes(), resume_metrics, json_lines=True)

    info = json.dumps({"seed": 1, "elapsed_s": 2.5, "tokens": 640, "workers": 1}).encode()
    state_dir = root / "train_state"
    state_dir.mkdir()

    def write_state(raw):
        meta = {"format": "tinygen-train-state", "version": "1", "step": "3",
                "info": raw.decode("utf-8", errors="surrogateescape").encode("utf-8", "replace").decode("utf-8")}
        save_file({"param.w": np.zeros(2, np.float32)}, state_dir / TRAIN_STATE, metadata=meta)
        return str(state_dir / TRAIN_STATE)

    state = Loader("train_state info", str(state_dir), TRAIN_STATE, info,
                   lambda: load_train_state(state_dir / TRAIN_STATE))
    state.write = write_state
    out["train_state info"] = state
    assert loads_or_rejects(state, info) == "loaded"
    return out


NAMES = ["tokenizer.json", "gpt2-vocab.json", "gpt2-merges.txt", "tiktoken", "config.json", "train_config.json",
         "finetune.json", "adapter config", "tokens.json", "tasks.jsonl", "metrics.jsonl", "train_state info"]


# ---------------------------------------------------------------- the fixed table of hostile inputs

SENTINEL_DEEP = "@@deep@@"
SENTINEL_DUP = "@@dup@@"
HOSTILE_VALUES = [None, True, False, 0, -1, 2**63, -(10**30), 1.5, 1e308, float("inf"), float("nan"), "",
                  "x" * 5000, "\ud800", [], {}, [[1, 2], [3]], {"a": {"b": None}}, SENTINEL_DEEP]


def dump(obj, one_line=False) -> bytes:
    """JSON with the sentinels expanded: a deep nest, and keys written twice."""
    text = json.dumps(obj, indent=None if one_line else 1)
    text = text.replace(json.dumps(SENTINEL_DEEP), "[" * DEEP + "]" * DEEP)
    return text.replace('"' + SENTINEL_DUP, '"').encode("utf-8", "surrogatepass")


def json_paths(obj, path=()):
    """Every (path, value) in a JSON tree, root first."""
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from json_paths(v, path + (k,))


def representative_paths(tree, first=6, last=2):
    """The paths of a JSON tree below the root, but of each list or object only its first
    `first` and last `last` entries (a vocabulary's 50,000 entries are alike)."""
    children = {}
    for path, _ in json_paths(tree):
        if path:
            children.setdefault(path[:-1], []).append(path)
    keep = {p for group in children.values() for p in group[:first] + group[-last:]}
    return [p for p, _ in json_paths(tree) if p and all(p[:n] in keep for n in range(1, len(p) + 1))]


def edit(obj, path, op, value=None):
    """A copy of `obj` with the node at `path` replaced ("set"), removed ("delete"), or its key doubled ("dup")."""
    if not path:
        return value if op == "set" else obj
    head, *rest = path
    copy = dict(obj) if isinstance(obj, dict) else list(obj)
    if rest:
        copy[head] = edit(copy[head], tuple(rest), op, value)
    elif op == "set":
        copy[head] = value
    elif op == "delete":
        del copy[head]
    elif op == "dup" and isinstance(copy, dict):
        copy = {**copy, SENTINEL_DUP + head: value}  # the key again, with another value
    return copy


def fixed_cases(loader):
    """[(description, bytes, line the message must name or None)] for one loader."""
    valid = loader.valid
    middle = len(valid) // 2
    cases = [
        ("empty", b"", None), ("truncated to half", valid[:middle], None),
        ("last byte cut", valid[:-1], None), ("deep nesting, open", b"[" * DEEP, None),
        ("deep nesting, closed", b"[" * DEEP + b"]" * DEEP, None),
        ("deep objects", b'{"a":' * DEEP, None),
        ("invalid UTF-8 in the middle", valid[:middle] + b"\xff\xfe" + valid[middle:], None),
        ("a lone continuation byte", b"\x80" + valid, None),
        ("5000-digit number", valid[:middle] + b"1" * 5000 + valid[middle:], None),
        ("NUL bytes", valid.replace(b"\n", b"\x00\n", 3), None),
    ]
    cases += [(f"the whole file is {v!r:.20}", dump(v), None) for v in HOSTILE_VALUES]
    if loader.is_json and not loader.json_lines:
        tree = json.loads(valid)
        for path in representative_paths(tree):
            for value in (None, "x", -1, 10**30, 1e400, [], {}, SENTINEL_DEEP):
                cases.append((f"{path} = {value!r:.20}", dump(edit(tree, path, "set", value)), None))
            cases.append((f"{path} deleted", dump(edit(tree, path, "delete")), None))
            if isinstance(path[-1], str):
                cases.append((f"{path} twice", dump(edit(tree, path, "dup", 7)), None))
    if loader.json_lines:
        lines = valid.split(b"\n")
        first = json.loads(lines[0])
        for key in first:
            for value in (None, 5, 10**30, 1e400, [], {}, SENTINEL_DEEP):
                bad = dump(edit(first, (key,), "set", value), one_line=True)
                cases.append((f"line 2: {key} = {value!r:.20}", b"\n".join([lines[0], bad, *lines[1:]]), 2))
            bad = dump(edit(first, (key,), "dup", 1), one_line=True)
            cases.append((f"line 2: {key} twice", b"\n".join([lines[0], bad, *lines[1:]]), 2))
            bad = dump(edit(first, (key,), "delete"), one_line=True)
            cases.append((f"line 2: no {key}", b"\n".join([lines[0], bad, *lines[1:]]), None))
        for junk in (b"[" * DEEP, b"\xff\xfe", b"1" * 5000, b"{", b"[1, 2]"):
            cases.append((f"line 2 is {junk[:8]!r}", b"\n".join([lines[0], junk, *lines[1:]]), 2))
    if not loader.is_json:  # rank files, merges.txt: one entry per line
        lines = valid.split(b"\n")
        for k, junk in enumerate((b"\xff\xfe", b"a b c", b"YQ== 99999999999999999999", b"YQ== -1", b"=", lines[3])):
            cases.append((f"line 5 is {junk[:12]!r}", b"\n".join([*lines[:4], junk, *lines[4:]]), 5))
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_fixed_hostile_inputs(loaders, name):
    loader, outcomes = loaders[name], collections.Counter()
    for description, raw, line in fixed_cases(loader):
        try:
            outcome = loads_or_rejects(loader, raw, line=line)
        except AssertionError as e:
            raise AssertionError(f"{name}, {description}: {e}") from None
        except BaseException as e:  # anything else is a loader letting an exception escape
            raise AssertionError(f"{name}, {description}: {type(e).__name__}: {str(e)[:300]}") from None
        outcomes[outcome] += 1
    assert outcomes["rejected"] > 0


# ---------------------------------------------------------------- random mutations

FRAGMENTS = [b"[" * DEEP, b'{"a":' * 1000, b"\xff", b"\xc3", b"\xed\xa0\x80", b"1" * 5000, b"1e999", b"-1e999",
             b"NaN", b"-Infinity", b"null", b"true", b'""', b"{}", b"[]", b'"\\ud800"', b"\x00", b",", b'"',
             b"\n", b"9" * 30, b'"a": 1, "a": 2', b"\r\n", b"\\", b" " * 1000]


@st.composite
def byte_mutation(draw, valid: bytes):
    raw = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["cut", "flip", "insert", "replace", "delete"]))
        i = draw(st.integers(0, len(raw)))
        if kind == "cut":
            del raw[i:]
        elif kind == "flip" and i < len(raw):
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            raw[i:i] = draw(st.sampled_from(FRAGMENTS))
        elif kind == "replace":
            j = draw(st.integers(i, min(len(raw), i + 40)))
            raw[i:j] = draw(st.sampled_from(FRAGMENTS) | st.binary(max_size=8))
        else:
            del raw[i:i + draw(st.integers(1, 16))]
    return bytes(raw)


json_values = st.recursive(
    st.sampled_from(HOSTILE_VALUES) | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def tree_mutation(draw, valid: bytes, json_lines: bool):
    if json_lines:
        lines = valid.split(b"\n")
        k = draw(st.integers(0, len(lines) - 2))
        return b"\n".join([*lines[:k], draw(tree_mutation(lines[k], False)), *lines[k + 1:]])
    tree = json.loads(valid)
    paths = [p for p, _ in json_paths(tree)]
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from(["set", "delete", "dup"] if path else ["set"]))
    if op == "dup" and not isinstance(path[-1], str):
        op = "set"
    return dump(edit(tree, path, op, draw(json_values)), one_line=json_lines)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_random_mutations(loaders, name, data):
    loader = loaders[name]
    structural = loader.is_json and data.draw(st.booleans(), label="structural")
    mutation = tree_mutation(loader.valid, loader.json_lines) if structural else byte_mutation(loader.valid)
    raw = data.draw(mutation, label="file")
    try:
        loads_or_rejects(loader, raw)
    except (AssertionError, Hang):
        raise
    except BaseException as e:
        raise AssertionError(f"{name}: {type(e).__name__} escaped: {str(e)[:300]}") from None
