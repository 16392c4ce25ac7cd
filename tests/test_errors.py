"""What tinygen promises when things go wrong (docs/failures.md), command by command.

- hostile files at the command line: one line, exit 2 (the loaders themselves: test_plumbing_fileio.py);
- a write that fails (no space, no permission, a read-only filesystem, a file in the way): one line
  naming the path and the reason and what was kept, exit 74, no partial file, and the run resumes;
- two writers in one run directory: the second is refused (exit 75) naming the first's pid, by
  the pipelines themselves (tinygen.pretrain.pretrain, finetuning.finetune.run, demo.run) before
  they touch a file; a SIGKILLed holder leaves no stale lock; readers are never blocked (the
  lock itself: test_plumbing_lock.py);
- NaN in fine-tuning stops naming the step, keeping the last checkpoint (exit 1);
- Ctrl-C while tokenizing or caching tokens leaves nothing a later start trusts;
- anything else: one line naming the exception and where, exit 70.
"""
import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import tinygen.data
import tinygen.plumbing.fileio as fileio
from tinygen import GPT, GPTConfig
from tinygen.checkpoint import checkpoint_step
from tinygen.cli import main
from tinygen.data import Document, load_token_cache, token_cache
from tinygen.demo import TINY, DemoConfig, run as demo, write_report
from tinygen.errors import (EXIT_BAD_INPUT, EXIT_BUSY, EXIT_DIVERGED, EXIT_INTERNAL, EXIT_INTERRUPTED,
                            EXIT_WRITE_FAILED, RunDirBusy, WriteError)
from tinygen.finetuning.finetune import FinetuneConfig, run as finetune
from tinygen.finetuning.tasks import Example, write_jsonl
from tinygen.plumbing.lock import LOCK_FILE
from tinygen.plumbing.metrics import read_metrics
from tinygen.pretrain import new_settings, pretrain
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset", "tiny", "--vocab-size", "300", "--block-size", "16", "--n-layer", "1", "--n-embd", "32",
         "--batch-size", "4", "--eval-batches", "1", "--samples", "0", "--workers", "1"]
WORDS = ("the model reads a token and predicts the next one while the loss falls slowly "
         "def return class import self value print list from data").split()
TEMP = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{8}$")  # fileio's temp-file names


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(8):
        lines = [" ".join(rng.choice(WORDS, rng.integers(4, 12))) + "." for _ in range(40)]
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return str(folder)


def one_error_line(capsys, command):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"tinygen {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def temp_files(folder):
    return [str(p) for p in Path(folder).rglob("*") if TEMP.match(p.name)]


def spawn(*argv):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import sys\nfrom tinygen.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- a disk that fails on cue

class FailingDisk:
    """Make the `nth` write of a file named `name` fail the way a real disk does.

    Every file tinygen writes is opened by fileio._open_for_writing (the temp
    file of an atomic write, or a log it appends to). For the chosen write this
    opens /dev/full instead, whose writes fail with a real ENOSPC from the
    kernel, or raises `error` at the open (EACCES, EROFS: a directory one may
    not write, a read-only filesystem).
    """

    def __init__(self, monkeypatch, name, nth=1, error=errno.ENOSPC):
        self.name, self.nth, self.error, self.seen, self.failed = name, nth, error, 0, False
        self.real = fileio._open_for_writing
        monkeypatch.setattr(fileio, "_open_for_writing", self.open)

    def open(self, path, flags):
        base = os.path.basename(path)
        target = TEMP.match(base).group(1) if TEMP.match(base) else base
        if target == self.name:
            self.seen += 1
            if self.seen == self.nth:
                self.failed = True
                if self.error == errno.ENOSPC:
                    fd = self.real(path, flags)  # the temp file exists: it must be cleaned up
                    os.close(fd)
                    return os.open("/dev/full", os.O_WRONLY)
                raise OSError(self.error, os.strerror(self.error), path)
        return self.real(path, flags)


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
REASONS = {errno.ENOSPC: "No space left on device (ENOSPC)", errno.EACCES: "Permission denied (EACCES)",
           errno.EROFS: "Read-only file system (EROFS)"}


# ---------------------------------------------------------------- hostile files at the command line

def test_nested_tokenizer_and_task_files_are_one_line_and_exit_2(tmp_path, capsys):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000)
    text = tmp_path / "a.txt"
    text.write_text("hello")
    assert main(["tokenizer", "encode", "--tokenizer", str(nested), "--input", str(text)]) == EXIT_BAD_INPUT
    assert "nested.json: not a tinygen tokenizer file: JSON nested too deeply" in one_error_line(capsys, "tokenizer")

    base = tmp_path / "base"
    GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=1, n_embd=8)).save_pretrained(base)
    Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256}).save(base / "tokenizer.json")
    data = tmp_path / "nested.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n' + b"[" * 100_000 + b"\n")
    assert main(["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "ft")]) == 2
    assert "nested.jsonl:2: JSON nested too deeply" in one_error_line(capsys, "finetune")


def test_hostile_run_files_at_resume_and_sample(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", *SMALL, "--data", corpus, "--out", str(run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    settings = (run / "train_config.json").read_text()
    (run / "train_config.json").write_text(settings.replace('"sources": [', '"sources": ' + "[" * 100_000, 1))
    assert main(["pretrain", "--resume", str(run)]) == EXIT_BAD_INPUT
    assert "train_config.json: JSON nested too deeply" in one_error_line(capsys, "pretrain")
    (run / "train_config.json").write_text(settings.replace('"n_embd": 32', '"n_embd": "32"'))
    assert main(["pretrain", "--resume", str(run)]) == EXIT_BAD_INPUT
    assert "train_config.json: malformed settings" in one_error_line(capsys, "pretrain")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "n_embd": 1e400}))
    assert main(["sample", "--model", str(run), "--prompt", "the"]) == EXIT_BAD_INPUT
    assert "config.json: n_embd must be a positive integer, got inf" in one_error_line(capsys, "sample")


# ---------------------------------------------------------------- failed writes, command by command

@needs_dev_full
@pytest.mark.parametrize("error", sorted(REASONS))
def test_tokenizer_train_write_fails(tmp_path, corpus, capsys, monkeypatch, error):
    out = tmp_path / "tok.json"
    out.write_text("the previous tokenizer\n")
    disk = FailingDisk(monkeypatch, "tok.json", error=error)
    argv = ["tokenizer", "train", "--input", str(Path(corpus) / "doc0.txt"), "--vocab-size", "270", "--out", str(out)]
    assert main(argv) == EXIT_WRITE_FAILED and disk.failed
    line = one_error_line(capsys, "tokenizer")
    assert f"cannot write {out}: {REASONS[error]}" in line and "untouched" in line
    assert out.read_text() == "the previous tokenizer\n" and temp_files(tmp_path) == []


def test_tokenizer_train_into_a_path_below_a_file(tmp_path, corpus, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["tokenizer", "train", "--input", str(Path(corpus) / "doc0.txt"), "--vocab-size", "270",
            "--out", str(tmp_path / "file" / "tok.json")]
    assert main(argv) == EXIT_WRITE_FAILED
    assert "Not a directory (ENOTDIR)" in one_error_line(capsys, "tokenizer")


PRETRAIN_WRITES = [  # (file, which write of it fails, the checkpoint kept)
    ("train_config.json", 1, None), ("tokenizer.json", 1, None), ("train.npy", 1, None),
    ("tokens.json", 1, None), ("metrics.jsonl", 4, 2), ("model.safetensors", 2, 2),
    ("train_state.safetensors", 2, 2), ("loss.svg", 2, 4),
]


@needs_dev_full
@pytest.mark.parametrize("name, nth, kept", PRETRAIN_WRITES)
def test_pretrain_write_fails_then_resumes(tmp_path, corpus, capsys, monkeypatch, name, nth, kept):
    run = tmp_path / "run"
    argv = ["pretrain", *SMALL, "--data", corpus, "--out", str(run), "--max-steps", "4",
            "--checkpoint-interval", "2", "--eval-interval", "2"]
    with monkeypatch.context() as patch:
        disk = FailingDisk(patch, name, nth)
        assert main(argv) == EXIT_WRITE_FAILED and disk.failed
    line = one_error_line(capsys, "pretrain")
    assert f"cannot write {run}" in line and f"{name}: No space left on device (ENOSPC)" in line
    assert (f"kept: the last good checkpoint, at step {kept}, in {run}" if kept else "kept: no checkpoint") in line
    assert temp_files(run) == [] and checkpoint_step(run) == kept
    rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    assert [r["step"] for r in rows] == list(range(len(rows)))  # whole lines only, none twice
    again = argv if name == "train_config.json" else ["pretrain", "--resume", str(run), "--max-steps", "6"]
    assert main(again) == 0 and checkpoint_step(run) == (4 if name == "train_config.json" else 6)
    assert temp_files(run) == []


@pytest.fixture(scope="module")
def finetune_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base = root / "base"
    GPT(GPTConfig(vocab_size=257, block_size=24, n_layer=1, n_head=2, n_embd=16), seed=0).save_pretrained(base)
    Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256}).save(base / "tokenizer.json")
    write_jsonl(root / "d.jsonl", [Example(f"{w}:", f" {w[::-1]}", "rev") for w in ("abc", "dog", "cat", "sun")])
    return root, str(base), str(root / "d.jsonl")


def finetune_argv(base, data, out, *extra):
    return ["finetune", "--base", base, "--data", data, "--out", str(out), "--method", "lora", "--max-steps", "4",
            "--checkpoint-interval", "2", "--batch-size", "2", "--eval-examples", "1", "--workers", "1", *extra]


@needs_dev_full
@pytest.mark.parametrize("name, nth, kept", [("finetune.json", 1, None), ("tokenizer.json", 1, None),
                                             ("adapter.safetensors", 2, 2), ("metrics.jsonl", 4, 2),
                                             ("eval.json", 1, 4)])
def test_finetune_write_fails_then_resumes(finetune_setup, tmp_path, capsys, monkeypatch, name, nth, kept):
    _, base, data = finetune_setup
    out = tmp_path / "ft"
    with monkeypatch.context() as patch:
        disk = FailingDisk(patch, name, nth)
        assert main(finetune_argv(base, data, out)) == EXIT_WRITE_FAILED and disk.failed
    line = one_error_line(capsys, "finetune")
    assert f"{name}: No space left on device (ENOSPC)" in line
    assert (f"kept: the last good checkpoint, at step {kept}, in {out}" if kept else "kept: no checkpoint") in line
    assert temp_files(out) == [] and checkpoint_step(out) == kept
    again = finetune_argv(base, data, out) if name == "finetune.json" else ["finetune", "--resume", str(out)]
    assert main(again) == 0 and checkpoint_step(out) == 4 and (out / "eval.json").is_file()


def test_demo_into_a_file_and_its_report_writes(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--tiny", "--out", str(tmp_path / "file")]) == EXIT_WRITE_FAILED
    assert "File exists (EEXIST)" in one_error_line(capsys, "demo")
    runs = {"pretrained_full": {}}
    (tmp_path / "pretrained_full").mkdir()
    (tmp_path / "pretrained_full" / "metrics.jsonl").write_text('{"step": 1, "val_loss": 2.0}\n')
    report = {"tasks": {}, "pretrained_beats_scratch": {}, "multi_task_vs_single": {}, "samples": [],
              "elapsed_s": 1.0, "stage_seconds": {"pretrain_s": 1.0}}
    for name in ("report.json", "finetune_loss.svg", "report.md"):
        (tmp_path / name).write_text("previous")
        with monkeypatch.context() as patch:
            FailingDisk(patch, name, error=errno.EROFS)
            with pytest.raises(WriteError, match=f"{name}: Read-only file system"):
                write_report(str(tmp_path), report, runs)
        assert (tmp_path / name).read_text() == "previous" and temp_files(tmp_path) == []


def test_sample_and_gradcheck_write_nothing(tmp_path, capsys, monkeypatch):
    """With every write failing, the commands that only read still succeed."""
    GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=1, n_embd=8)).save_pretrained(tmp_path)
    Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256}).save(tmp_path / "tokenizer.json")

    def refuse(path, flags):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(fileio, "_open_for_writing", refuse)
    assert main(["sample", "--model", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    assert main(["gradcheck", "--max-coords", "2"]) == 0


# ---------------------------------------------------------------- two writers, one directory

@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_second_pretrain_is_refused_then_resume_after_sigkill(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    child = spawn("pretrain", *SMALL, "--data", corpus, "--out", run, "--max-steps", 100_000,
                  "--checkpoint-interval", 2, "--eval-interval", 100_000)
    try:
        deadline = time.time() + 60
        while checkpoint_step(run) is None and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert checkpoint_step(run) is not None, child.communicate()[1] if child.poll() is not None else ""
        for argv in (["--resume", str(run)], [*SMALL, "--data", corpus, "--out", str(run), "--overwrite"]):
            assert main(["pretrain", *argv]) == EXIT_BUSY
            assert f"(pid {child.pid}, lock file" in one_error_line(capsys, "pretrain")
        assert main(["sample", "--model", str(run), "--prompt", "the", "--max-new-tokens", "2"]) == 0  # a reader
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    step = checkpoint_step(run)
    assert main(["pretrain", "--resume", str(run), "--max-steps", str(step + 2)]) == 0
    assert checkpoint_step(run) == step + 2


@contextlib.contextmanager
def held_by_another(run_dir, pid=4711):
    """RUN_DIR's lock taken on a descriptor of its own, with another pid written: to run_lock in
    this process, exactly what a lock held by process `pid` looks like (flock belongs to the open
    file, not the process)."""
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{pid}\n".encode())
        yield
    finally:
        os.close(fd)


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*")
            if p.is_file() and p.name != LOCK_FILE}


@pytest.mark.skipif(fcntl is None, reason="needs fcntl.flock")
def test_the_pipelines_take_the_lock_before_they_touch_a_file(tmp_path, corpus, finetune_setup):
    """pretrain() before start_run removes an old run's files (the command and the demo's
    pretraining stage both call it), finetune.run before finetune.json, demo.run before anything."""
    run = tmp_path / "run"
    assert main(["pretrain", *SMALL, "--data", corpus, "--out", str(run), "--max-steps", "2"]) == 0
    before = files_of(run)
    with held_by_another(run):
        with pytest.raises(RunDirBusy, match=rf"{run} is being written by another tinygen process \(pid 4711"):
            pretrain(new_settings(str(run), preset="tiny", sources=[corpus]), overwrite=True, progress=False)
    assert files_of(run) == before and checkpoint_step(run) == 2
    _, base, data = finetune_setup
    for out, call in ((tmp_path / "ft", lambda out: finetune(base, data, str(out), FinetuneConfig(max_steps=2))),
                      (tmp_path / "demo", lambda out: demo(str(out), DemoConfig(**TINY), progress=False))):
        with held_by_another(out):
            with pytest.raises(RunDirBusy, match="pid 4711"):
                call(out)
        assert files_of(out) == {}


def test_two_pretrains_started_together(tmp_path, corpus):
    run = tmp_path / "run"
    argv = ["pretrain", *SMALL, "--data", corpus, "--out", run, "--max-steps", 40, "--eval-interval", 100]
    first, second = spawn(*argv), spawn(*argv)
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, EXIT_BUSY], [0, EXIT_BAD_INPUT]), results  # refused while running, or "already holds a run"
    refused = next(err for code, err in results if code != 0)
    assert "is being written by another tinygen process (pid" in refused or "already holds a run" in refused
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(41))  # one run's log, whole


# ---------------------------------------------------------------- NaN in fine-tuning

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_nan_in_finetuning_stops_naming_the_step(finetune_setup, tmp_path, capsys, method):
    _, base, data = finetune_setup
    out = tmp_path / "ft"
    argv = finetune_argv(base, data, out, "--max-steps", "40", "--checkpoint-interval", "1", "--lr", "1e30",
                         "--grad-clip", "0", "--warmup-steps", "0")
    argv[argv.index("lora")] = method
    assert main(argv) == EXIT_DIVERGED
    line = one_error_line(capsys, "finetune")
    found = re.search(r"step (\d+): the (loss|gradient norm) is (nan|inf).*last checkpoint \(step (\d+)\) is intact",
                      line)
    assert found, line
    assert int(found.group(4)) == int(found.group(1)) - 1 == checkpoint_step(out)
    from tinygen.finetuning.finetune import load_run

    model = load_run(out)
    assert all(np.isfinite(p).all() for p in model.params.values())  # the kept checkpoint is a good one


# ---------------------------------------------------------------- Ctrl-C while tokenizing

def interrupt_on_call(monkeypatch, module, name, n):
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_ctrl_c_while_caching_tokens_leaves_no_trusted_cache(tmp_path, monkeypatch):
    tok = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256})
    old = [Document(f"d{i}", "abc " * (10 + i)) for i in range(3)]
    new = [Document(f"d{i}", "xyz " * (10 + i)) for i in range(3)]  # the same token counts as `old`
    token_cache(tmp_path, tok, old[:2], old[2:])
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, tinygen.data, "encode_documents", 2)  # after train.npy, before val.npy
        with pytest.raises(KeyboardInterrupt):
            token_cache(tmp_path, tok, new[:2], new[2:])
    assert not (tmp_path / "tokens.json").exists() and load_token_cache(tmp_path, tok) is None
    assert temp_files(tmp_path) == []
    rebuilt = token_cache(tmp_path, tok, old[:2], old[2:])  # the next start rebuilds: old val, old train
    assert tok.decode(rebuilt.train.tolist()).startswith("abc")


def test_ctrl_c_in_tokenizer_training_writes_nothing(tmp_path, corpus, monkeypatch, capsys):
    import tinygen.tokenizer.tokenizer as module

    interrupt_on_call(monkeypatch, module, "train_merges", 1)
    out = tmp_path / "tok.json"
    argv = ["tokenizer", "train", "--input", str(Path(corpus) / "doc0.txt"), "--vocab-size", "270", "--out", str(out)]
    assert main(argv) == EXIT_INTERRUPTED
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_tokenizing_then_resume_equals_a_straight_run(tmp_path, corpus, monkeypatch):
    common = [*SMALL, "--data", corpus, "--max-steps", "3"]
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, tinygen.data, "encode_documents", 2)
        assert main(["pretrain", *common, "--out", str(tmp_path / "a")]) == EXIT_INTERRUPTED
    assert not (tmp_path / "a" / "data" / "tokens.json").exists() and temp_files(tmp_path) == []
    assert main(["pretrain", "--resume", str(tmp_path / "a")]) == 0
    assert main(["pretrain", *common, "--out", str(tmp_path / "b")]) == 0
    for name in ("data/train.npy", "data/val.npy", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ---------------------------------------------------------------- the last resort

def test_an_unexpected_exception_is_one_line_exit_70(tmp_path, monkeypatch, capsys):
    import tinygen.cli.tokenizer as command

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(command, "encode", broken)
    argv = ["tokenizer", "encode", "--tokenizer", str(tmp_path)]
    assert main(argv) == EXIT_INTERNAL
    assert re.search(r"internal error: RuntimeError: a bug \(at test_errors.py:\d+ in broken\)",
                     one_error_line(capsys, "tokenizer"))
    monkeypatch.setenv("TINYGEN_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv)
    monkeypatch.delenv("TINYGEN_TRACEBACK")

    def no_memory(args):
        raise MemoryError("Unable to allocate 7.28 TiB")

    monkeypatch.setattr(command, "encode", no_memory)
    assert main(argv) == EXIT_INTERNAL
    assert "out of memory (Unable to allocate 7.28 TiB)" in one_error_line(capsys, "tokenizer")


def test_docs_list_every_exit_code():
    import tinygen.errors as errors

    text = Path(ROOT, "docs", "failures.md").read_text(encoding="utf-8")
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    for code in codes | {0}:
        assert re.search(rf"^\| {code} \|", text, re.MULTILINE), f"exit code {code} is not in docs/failures.md"
    assert "docs/failures.md" in Path(ROOT, "README.md").read_text(encoding="utf-8")
