"""Data parallelism on the cores of one machine: threads, each with a one-thread BLAS.

A training step's loss is a mean over the batch's positions, so its gradient
is a weighted sum of the gradients of any split of the batch into shards of
rows (train.py does the weighting). `Workers.map` runs one shard per thread.
Threads work for NumPy because its BLAS calls and ufunc loops release the
GIL; what stays serial is the Python between them, small next to the arrays.

Why BLAS must drop to one thread per worker: OpenBLAS's own threads
busy-wait between calls, so two shards that each ask BLAS for 2 threads put
four busy threads on two cores. Measured on 2 cores (config M of
benchmarks/compare_torch.py): one stream with 2 BLAS threads 1.19 s per
forward+backward; 2 shards with 2 BLAS threads each 1.77 s; 2 shards with
1 BLAS thread each 1.07 s. A matmul runs at the same total rate either way
(one 2-thread call ~188 GFLOP/s, two 1-thread calls ~96 each); the gain is
that everything else (GELU, softmax, layer norm, AdamW) now uses both cores.

`Workers.map` therefore sets OpenBLAS to one thread while its threads run
and restores the previous count afterwards. The count is process-wide
(OpenBLAS 0.3.31's `openblas_set_num_threads_local` changed it for the
calling thread and every other one alike, measured), so BLAS calls from
other threads during a `map` run on one thread too. Maps may overlap (two
threads of the caller each calling GPT.forward): `one_blas_thread` counts
the scopes open at once, the first saves the caller's count and the last
restores it. OpenBLAS is found among the
libraries NumPy has already loaded (never loaded anew); where there is none
(NumPy built on Accelerate or MKL), `default_workers()` is 1 and one stream
with the BLAS's own threading is used, as before.
"""
import contextlib
import ctypes
import functools
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable, Optional

import numpy as np

from ..config import POSITIVE, require

# (set, get) symbol pairs of the OpenBLAS builds NumPy ships or links against:
# plain, 64-bit-integer interface, and the scipy-openblas wheels' prefixed names.
OPENBLAS_SYMBOLS = [
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
]


def ranges(n: int, parts: int) -> list:
    """Split range(n) into `parts` contiguous (start, stop) pieces whose sizes differ by at most 1.

    >>> ranges(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    """
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _loaded_libraries() -> list:
    """Paths of shared libraries that might be NumPy's OpenBLAS, already-mapped ones first."""
    paths = []
    if os.path.exists("/proc/self/maps"):  # Linux: exactly what is loaded
        with open("/proc/self/maps") as f:
            paths = [line.split(maxsplit=5)[-1].strip() for line in f if "openblas" in line.lower()]
    site = os.path.dirname(os.path.dirname(np.__file__))
    for pattern in ("numpy.libs/*openblas*", "numpy/.dylibs/*openblas*", "scipy_openblas*/lib/*openblas*"):
        paths += glob.glob(os.path.join(site, pattern))  # wheels: bundled next to numpy
    return list(dict.fromkeys(paths))


@functools.lru_cache(maxsize=None)  # a fact of the process: NumPy's BLAS is loaded once, with NumPy
def openblas_threads_api() -> Optional[tuple]:
    """(set_num_threads, get_num_threads) of the OpenBLAS NumPy uses, or None.

    Only libraries already loaded into this process are opened (RTLD_NOLOAD),
    so this never loads or runs a library of its own. Looked up once (~0.5 ms).
    """
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LOCAL", 0)
    for path in _loaded_libraries():
        try:
            lib = ctypes.CDLL(path, mode=mode)
        except OSError:
            continue
        for set_name, get_name in OPENBLAS_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                set_threads, get_threads = getattr(lib, set_name), getattr(lib, get_name)
                set_threads.argtypes, set_threads.restype = [ctypes.c_int], None
                get_threads.argtypes, get_threads.restype = [], ctypes.c_int
                return set_threads, get_threads
    return None


class OneBlasThread:
    """OpenBLAS at one thread while any of its (possibly overlapping) scopes is open.

    The count is the process's, so overlapping scopes share one save and restore:
    the first to open saves the caller's count, the last to close puts it back.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._open = 0  # scopes open now
        self._saved = None  # the caller's count, while any scope is open

    @contextlib.contextmanager
    def scope(self, api: Optional[tuple]):
        if api is None:
            yield
            return
        set_threads, get_threads = api
        with self._lock:
            if self._open == 0:
                self._saved = get_threads()
                set_threads(1)
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                if self._open == 0:
                    set_threads(self._saved)


one_blas_thread = OneBlasThread()  # one per process, as OpenBLAS's thread count is


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(batch_size: Optional[int] = None) -> int:
    """One worker per core (and at most one per row of `batch_size`) when
    OpenBLAS's threads can be limited, else 1."""
    if openblas_threads_api() is None:
        return 1
    return available_cores() if batch_size is None else max(1, min(available_cores(), batch_size))


class Workers:
    """`n` threads that run independent NumPy work at once, BLAS at one thread each.

        with Workers(2) as workers:
            squares = workers.map(lambda a: a @ a, [x, y])   # like list(map(...)), in parallel

    n = 1 runs everything in the calling thread and leaves BLAS alone, so
    it computes exactly what a plain loop would. n = None: default_workers().
    """

    def __init__(self, n: Optional[int] = None):
        if n is None:
            n = default_workers()
        self.n = int(require("Workers n (threads)", n, POSITIVE))
        self._blas = openblas_threads_api() if self.n > 1 else None
        self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="tinygen-worker") if self.n > 1 else None

    def map(self, fn: Callable, items: Iterable) -> list:
        """[fn(item) for item in items], up to n at a time; the first exception is raised.

        Each call runs under the caller's `np.errstate` (NumPy keeps it per
        thread or per context, so a thread would otherwise use the default),
        as it would in a plain loop. All calls finish before map returns,
        even when one fails.
        """
        items = list(items)
        if self._pool is None or len(items) <= 1:
            return [fn(item) for item in items]
        errors = np.geterr()

        def call(item):
            with np.errstate(**errors):
                return fn(item)

        with one_blas_thread.scope(self._blas):
            futures = [self._pool.submit(call, item) for item in items]
            wait(futures)
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Workers({self.n})"
