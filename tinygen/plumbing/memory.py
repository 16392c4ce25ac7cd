"""Keep freed NumPy temporaries in the process instead of handing them back to the OS.

A training step allocates and frees the same large temporaries every step
(the (B, T, 4C) MLP activations, the (B, H, T, T) attention probabilities).
glibc's malloc serves blocks above its mmap threshold with a fresh mmap() and
unmaps them on free, so every step pays page faults to map and zero those
pages again. Measured on config S (benchmarks/compare_torch.py): 125 ms per
forward+backward with the defaults, 70 ms with the thresholds raised; on M,
1.51 s -> 1.21 s. Nothing in the math changes.

`reuse_freed_memory()` raises the thresholds with mallopt(3) for this
process, and keeps every thread's blocks in the one main heap (M_ARENA_MAX
1): a worker thread's own arena grows in heaps of at most 64 MiB, so any
larger block there (GPT-2 small's (B, T, 50257) logits, 103 MB per shard)
was mapped and faulted in afresh every step whatever the thresholds (on a
GPT-2 small shard, cross-entropy forward+backward in a worker thread: 88-96
ms with ~690 page faults per call, 73 ms with none; peak RSS of the training
loop 5.2 -> 4.7 GB). Peak memory does not grow: freed blocks are reused, not
added to.

Who applies it: tinygen itself, once per process, the first time a model
computes through the public API (GPT.forward, loss, loss_and_grads,
generate) or the training loop runs: `reuse_freed_memory_by_default()`.
It is process-wide and cannot be undone (glibc has no way to read the
thresholds back, and setting one turns off malloc's own adjustment of it
for good), so it is announced here and in docs/performance.md rather than
scoped, and it changes speed and the process's resident memory after a
peak, never a result. A program that wants malloc as it was opts out
before its first tinygen call:

    TINYGEN_MALLOC=default python my_program.py     # or os.environ["TINYGEN_MALLOC"] = "default"

and can still apply it itself later with `tinygen.reuse_freed_memory()`.
docs/performance.md has the measurement (benchmarks/bench_train.py --malloc both).
"""
import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1  # free memory at the top of the heap kept before trimming
M_TOP_PAD = -2  # extra memory requested with each heap extension
M_MMAP_THRESHOLD = -3  # blocks at least this large get their own mmap()
M_ARENA_MAX = -8  # at most this many arenas (glibc's default: 8 per core, one per thread in practice)
# mallopt's largest value (an int): a GPT-2 small forward at B = 4 frees ~1.4 GB at the heap's
# top, which a 1 GiB trim threshold handed back to the OS, so the next call faulted 110k pages
# in again: model.loss 1.3-1.7 s per call instead of 0.97-1.05 s
TRIM_MAX = 2**31 - 1
OPT_OUT = ("TINYGEN_MALLOC", "default")  # this environment variable and value keep malloc as it is


def reuse_freed_memory(threshold: int = 1 << 30) -> bool:
    """Serve blocks below `threshold` bytes from the reusable heap, and keep freed memory at
    the heap's top up to TRIM_MAX. True if applied (glibc), False where mallopt does not
    exist (macOS, Windows, musl)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(
        mallopt(option, value) == 1
        for option, value in ((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, TRIM_MAX), (M_TOP_PAD, 64 << 20),
                              (M_ARENA_MAX, 1))
    )


@functools.lru_cache(maxsize=None)  # once per process: the setting is the process's, not a call's
def reuse_freed_memory_by_default() -> bool:
    """reuse_freed_memory() the first time tinygen computes, unless TINYGEN_MALLOC=default.
    True if applied (by this first call)."""
    variable, value = OPT_OUT
    if os.environ.get(variable, "").strip().lower() == value:
        return False
    return reuse_freed_memory()
