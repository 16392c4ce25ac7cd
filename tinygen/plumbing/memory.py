"""Keep freed NumPy temporaries in the process instead of handing them back to the OS.

A training step allocates and frees the same large temporaries every step
(the (B, T, 4C) MLP activations, the (B, H, T, T) attention probabilities).
glibc's malloc serves blocks above its mmap threshold with a fresh mmap() and
unmaps them on free, so every step pays page faults to map and zero those
pages again. Measured on config S (benchmarks/compare_torch.py): 125 ms per
forward+backward with the defaults, 70 ms with the thresholds raised; on M,
1.51 s -> 1.21 s. Nothing in the math changes.

`reuse_freed_memory()` raises the thresholds with mallopt(3) for this
process. Peak memory is unchanged: freed blocks are reused, not added to.

Who calls it: the `tinygen` command (tinygen.cli.main), which owns its
process. The library never does, not even `tinygen.train.train`: the
setting is process-wide and cannot be undone (glibc has no way to read the
thresholds back, and setting one turns off malloc's own adjustment of it for
good), so a library that applied it would change the allocator of whoever
imported it, say a test process using tinygen as an oracle. A program that
drives tinygen's training loop itself opts in with one call at its start:

    import tinygen
    tinygen.reuse_freed_memory()    # this process only, for the rest of its life

Not calling it costs speed, never a result: docs/performance.md has the
measurement (benchmarks/bench_train.py --malloc both).
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # free memory at the top of the heap kept before trimming
M_TOP_PAD = -2  # extra memory requested with each heap extension
M_MMAP_THRESHOLD = -3  # blocks at least this large get their own mmap()


def reuse_freed_memory(threshold: int = 1 << 30) -> bool:
    """Serve blocks below `threshold` bytes from the reusable heap. True if applied
    (glibc), False where mallopt does not exist (macOS, Windows, musl)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(
        mallopt(option, value) == 1
        for option, value in ((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, threshold), (M_TOP_PAD, 64 << 20))
    )
