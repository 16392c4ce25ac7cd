"""One writer per run directory (tinygen.plumbing.lock): the lock in one process (an inner
run_lock passes through), across processes (RunDirBusy naming the holder's pid; readers never
blocked), after a SIGKILL (no stale lock), without fcntl (the pid only). The commands and the
pipelines that take it: tests/test_errors.py."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tinygen import GPT, GPTConfig
from tinygen.checkpoint import load_model
from tinygen.errors import RunDirBusy
from tinygen.plumbing.lock import LOCK_FILE, lock_holder, run_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HOLDER = """
import sys, time
from tinygen.plumbing.lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def spawn_holder(run_dir):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_lock_in_one_process(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert lock_holder(run) == os.getpid()
        with run_lock(run):  # the training loop inside a command that holds the lock already
            assert lock_holder(run) == os.getpid()
        assert lock_holder(run) == os.getpid()  # the inner one did not release it
    assert lock_holder(run) is None and (run / LOCK_FILE).exists()
    with run_lock(run):  # and it can be taken again
        pass


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_lock_across_processes_and_a_sigkill(tmp_path):
    run = tmp_path / "run"
    model = GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=1, n_embd=8))
    model.save_pretrained(run)
    child = spawn_holder(run)
    try:
        with pytest.raises(RunDirBusy, match=rf"{run} is being written by another tinygen process \(pid {child.pid}"):
            with run_lock(run):
                pass
        assert np.array_equal(load_model(run).params["wte.weight"], model.params["wte.weight"])  # readers pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert lock_holder(run) == child.pid  # the dead holder's pid is still written ...
    with run_lock(run):  # ... but the kernel released its lock: no stale lock
        assert lock_holder(run) == os.getpid()


def test_without_fcntl_the_lock_only_records_the_pid(tmp_path, monkeypatch):
    import tinygen.plumbing.lock as lock

    monkeypatch.setattr(lock, "fcntl", None)
    with run_lock(tmp_path):
        assert lock_holder(tmp_path) == os.getpid()
