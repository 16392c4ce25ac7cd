"""reuse_freed_memory: applied once per process at tinygen's first computation, unless
TINYGEN_MALLOC=default; the other process-wide settings are restored after every call.

Each check runs in a fresh Python process: malloc's settings are process-wide
and cannot be undone, and by the time this file runs, other tests have
run tinygen in the test process, which applies them.

The probe: glibc serves a block above its mmap threshold (at most 32 MiB
while the threshold is glibc's own, dynamic one) with a mapping of its own,
which mallinfo2() counts in `hblkhd`; after reuse_freed_memory (threshold
1 GiB) a 64 MiB block comes from the heap instead.
"""
import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.libc_ver()[0] == "glibc"

PROBE = r'''
import ctypes, json, platform, signal, sys
import numpy as np

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

def own_mapping(nbytes=64 << 20):
    """Whether malloc serves an nbytes block with an mmap of its own (glibc only; None elsewhere)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    before = libc.mallinfo2().hblkhd
    block = np.empty(nbytes, np.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del block
    return grown >= nbytes
'''

RESULT_UNCHANGED = PROBE + r'''
import numpy as np
from tinygen import GPT, GPTConfig, reuse_freed_memory

config = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
idx = np.arange(16).reshape(2, 8) % 32
mapped_at_import = own_mapping()
before = GPT(config).loss_and_grads(idx, idx)
mapped_before = own_mapping()  # after tinygen's first computation
applied = reuse_freed_memory()
mapped_after = own_mapping()
after = GPT(config).loss_and_grads(idx, idx)
same = bool(before[0] == after[0] and all(np.array_equal(before[1][k], after[1][k]) for k in before[1]))
print(json.dumps({"applied": applied, "mapped_at_import": mapped_at_import, "mapped_before": mapped_before,
                  "mapped_after": mapped_after, "same": same}))
'''

LIBRARY_PATH = PROBE + r'''
import os
from tinygen.plumbing.parallel import openblas_threads_api
from tinygen.pretrain import new_settings, pretrain, samples

folder = sys.argv[1]
with open(os.path.join(folder, "text.txt"), "w") as f:
    f.write("the model reads a token and predicts the next one\n" * 200)

def state():
    api = openblas_threads_api()
    return {"own_mapping": own_mapping(), "sigint": repr(signal.getsignal(signal.SIGINT)), "errstate": np.geterr(),
            "blas_threads": api[1]() if api else None}

before = state()
settings = new_settings(os.path.join(folder, "run"), preset="tiny", sources=[os.path.join(folder, "text.txt")],
                        overrides=dict(vocab_size=270, block_size=16, n_layer=1, n_head=2, n_embd=16, batch_size=4,
                                       max_steps=3, eval_batches=1, workers=2))
run = pretrain(settings, progress=False, say=lambda message: None)
samples(run.model, run.tokenizer, ["the"], 4)
print(json.dumps({"before": before, "after": state(), "step": run.result.step}))
'''


def fresh_python(code, *args, opt_out=False) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TINYGEN_MALLOC", None)
    if opt_out:
        env["TINYGEN_MALLOC"] = "default"
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_opting_out_keeps_malloc_until_the_caller_applies_it_and_no_result_changes():
    out = fresh_python(RESULT_UNCHANGED, opt_out=True)
    assert out["applied"] is GLIBC  # mallopt exists only in glibc
    assert out["same"]  # how memory is recycled never changes a number
    if GLIBC:  # the probe sees the setting: a 64 MiB block moves from its own mapping to the heap
        assert out["mapped_at_import"] is True and out["mapped_before"] is True and out["mapped_after"] is False


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_first_computation_applies_it_by_default_and_importing_does_not():
    out = fresh_python(RESULT_UNCHANGED)
    assert out["mapped_at_import"] is True  # `import tinygen` changes nothing
    assert out["mapped_before"] is False  # the first loss_and_grads did
    assert out["same"]


@pytest.mark.parametrize("opt_out", [False, True], ids=["default", "TINYGEN_MALLOC=default"])
def test_the_library_pipeline_restores_the_other_process_settings(tmp_path, opt_out):
    """tinygen.pretrain (tokenizer, training on 2 worker threads, samples) as a library:
    the Ctrl-C handler, NumPy's error state and the BLAS thread count are as they were; malloc too
    when the caller opted out, else it has the reuse setting."""
    out = fresh_python(LIBRARY_PATH, tmp_path, opt_out=opt_out)
    assert out["step"] == 3
    for key in ("sigint", "errstate", "blas_threads"):
        assert out["after"][key] == out["before"][key], key
    if GLIBC:
        assert out["before"]["own_mapping"] is True
        assert out["after"]["own_mapping"] is opt_out


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize("opt_out", [False, True], ids=["default", "TINYGEN_MALLOC=default"])
def test_the_command_applies_it_unless_opted_out(opt_out):
    code = PROBE + r'''
from tinygen.cli import main
assert main(["sample", "--model", sys.argv[1], "--prompt", "x"]) == 2  # no such run: fails after the setting
print(json.dumps({"own_mapping": own_mapping()}))
'''
    assert fresh_python(code, "/nonexistent-run", opt_out=opt_out)["own_mapping"] is opt_out
