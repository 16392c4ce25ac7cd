"""Shared helpers for the training-speed benchmarks.

The machines tinygen is developed on are noisy (+-25-30 % between identical
runs), so every measurement here follows one recipe:

- each measured thing runs in its OWN child process (`run_in_subprocess`),
  so peak RSS is per process and one run cannot warm or fragment another;
- sides being compared are interleaved (A B A B ...), and we report medians
  of per-process medians, plus the spread between processes;
- MFU is relative to the float32 (or float64) matmul peak measured in the
  same run, in the same child processes, right after the timed steps.

Configs S, M and L (GPT-2 small, 124M parameters) and the FLOP formula are
those of ../shared/ANCHORS.md:

    FLOPs per training step = (6 N + 12 L d T) B T,   N = 12 L d^2 + V d

    >>> round(model_flops_per_step(CONFIGS["S"]) / 1e9, 2), round(model_flops_per_step(CONFIGS["M"]) / 1e9, 1)
    (5.64, 154.6)
    >>> round(model_flops_per_step(CONFIGS["L"]) / 1e9)
    788
"""
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for _p in (REPO_ROOT, BENCH_DIR):  # run from anywhere without `pip install`
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

# GPT-2 architecture benchmark configs (ANCHORS.md). S64 is S in float64. L is GPT-2 small
# (openai-community/gpt2's shape, 124M parameters, random weights) trained at B=4, T=256;
# its decoding benchmarks use a 1024-position context (compare_hf.DECODE_CONFIGS).
CONFIGS = {
    "S": dict(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128, batch_size=16, dtype="float32"),
    "M": dict(vocab_size=2048, block_size=256, n_layer=6, n_head=6, n_embd=384, batch_size=8, dtype="float32"),
    "L": dict(vocab_size=50257, block_size=256, n_layer=12, n_head=12, n_embd=768, batch_size=4, dtype="float32"),
    "S64": dict(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128, batch_size=16, dtype="float64"),
}
# Default timed steps / warm-up steps per config: keeps each script under ~3 min
# (an L step takes several seconds on 2 cores: 1 warm-up + 3 timed).
DEFAULT_STEPS = {"S": 20, "S64": 10, "M": 5, "L": 3}
DEFAULT_WARMUP = {"S": 3, "S64": 2, "M": 2, "L": 1}
# The training recipe both tinygen and PyTorch run (nanoGPT's defaults).
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 6e-4, (0.9, 0.95), 1e-8, 0.1, 1.0

RESULT_TAG = "TINYGEN_BENCH_RESULT "


def config_by_name(name: str) -> dict:
    if name not in CONFIGS:
        raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    return CONFIGS[name]


def parse_configs(text: str) -> list:
    """'S,M' -> ['S', 'M'], validated."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    for n in names:
        config_by_name(n)
    return names


def gpt_config(cfg: dict):
    """The tinygen GPTConfig of a benchmark config dict (imports tinygen lazily)."""
    from tinygen.config import GPTConfig

    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dtype")
    return GPTConfig(**{k: cfg[k] for k in keys})


def make_batch(cfg: dict, seed: int = 0):
    """The one fixed batch every step uses: idx, targets each (B, T) int64."""
    rng = np.random.default_rng(seed + 1)
    data = rng.integers(0, cfg["vocab_size"], size=(cfg["batch_size"], cfg["block_size"] + 1))
    return data[:, :-1].copy(), data[:, 1:].copy()


# ------------------------------------------------------------------ FLOPs
def flop_params(cfg: dict) -> int:
    """N = 12 L d^2 + V d: the parameters that cost 6 FLOPs per token (ANCHORS.md)."""
    L, d, V = cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]
    return 12 * L * d * d + V * d


def model_flops_per_step(cfg: dict) -> int:
    """(6 N + 12 L d T) B T: matmul FLOPs of forward + backward, attention included."""
    L, d, T, B = cfg["n_layer"], cfg["n_embd"], cfg["block_size"], cfg["batch_size"]
    return (6 * flop_params(cfg) + 12 * L * d * T) * B * T


def tokens_per_step(cfg: dict) -> int:
    return cfg["batch_size"] * cfg["block_size"]


# ------------------------------------------------------------ machine peak
def matmul_peak(n: int = 2048, reps: int = 5, dtype: str = "float32") -> dict:
    """GFLOP/s of an (n, n) @ (n, n) NumPy matmul: median and max over `reps`.

    Threads as-is (OPENBLAS_NUM_THREADS of this process). One untimed warm-up
    call first, so thread start-up and page faults are not counted.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=c)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        samples.append(2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"dtype": dtype, "n": n, "median": statistics.median(samples), "max": max(samples), "samples": samples}


def read_bandwidth(mib: int = 512, reps: int = 5, vocab: int = 50257, width: int = 768) -> dict:
    """GB/s (10^9 bytes/s) at which this process reads memory, two ways, median of `reps`:

        sum   a.sum() over `mib` MiB of float32 (a streaming read, the plain limit)
        gemv  x @ w.T with w (vocab, width) float32, GPT-2's LM head (154 MB): the
              read decoding at batch 1 does for every weight matrix

    Threads as-is (OPENBLAS_NUM_THREADS of this process); one untimed call of each
    first. Decoding at batch 1 reads every weight once per token, so its limit in
    tokens/s is these GB/s / the weight bytes (weight_bytes_per_token).
    """
    a = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    w = np.random.default_rng(0).standard_normal((vocab, width), dtype=np.float32)
    x = np.ones((1, width), dtype=np.float32)
    out = {}
    for name, fn, nbytes in (("sum", a.sum, a.nbytes), ("gemv", lambda: x @ w.T, w.nbytes)):
        fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(nbytes / (time.perf_counter() - t0) / 1e9)
        out[name + "_gb_s"] = statistics.median(samples)
        out[name + "_samples"] = samples
    return out


def weight_bytes_per_token(cfg: dict) -> int:
    """Bytes of weights a batch-1 decoding step reads: every block's matrices, biases and
    gains, ln_f and the tied head (all of wte); one row of wte and wpe is left out. The KV
    cache adds 2 L n d values at position n (8.5 MB on L at n = 116, the mean of 16 + 200)."""
    L, d, V = cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]
    per_block = 12 * d * d + 13 * d  # c_attn 3d^2 + 3d, c_proj d^2 + d, c_fc 4d^2 + 4d, mlp.c_proj 4d^2 + d, 2 LNs 4d
    return (L * per_block + V * d + 2 * d) * np.dtype(cfg["dtype"]).itemsize


# -------------------------------------------------------------- memory
def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (getrusage ru_maxrss)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------- subprocesses
_CHILD_CODE = (
    "import sys; sys.path[:0] = [{bench!r}, {root!r}]; import common; common._child_main()"
)


def run_in_subprocess(func_name: str, args: dict, env: dict = None, timeout: float = 1800) -> dict:
    """Run `module:function(**args)` in a fresh `python -c` process; return its dict.

    The child prints one line `TINYGEN_BENCH_RESULT {json}`; its dict gets
    `peak_rss_mib`, the child's own ru_maxrss when the function returned
    (unless the function set it itself, e.g. before a matmul-peak probe).
    `module` is importable from benchmarks/ (e.g. "bench_train:train_child").
    """
    code = _CHILD_CODE.format(bench=BENCH_DIR, root=REPO_ROOT)
    child_env = dict(os.environ)
    child_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", code, func_name, json.dumps(args)],
        capture_output=True, text=True, env=child_env, timeout=timeout, cwd=REPO_ROOT,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise RuntimeError(f"child {func_name}({args}) exited with {proc.returncode} and no result line")


def _child_main():
    module_name, func_name = sys.argv[1].split(":")
    args = json.loads(sys.argv[2])
    result = getattr(importlib.import_module(module_name), func_name)(**args)
    result.setdefault("peak_rss_mib", peak_rss_mib())
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def thread_env(threads) -> dict:
    """Environment pinning NumPy's BLAS (and OpenMP) to `threads`; {} leaves it as-is."""
    if not threads:
        return {}
    t = str(threads)
    return {"OPENBLAS_NUM_THREADS": t, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}


def progress(msg: str):
    """Progress goes to stderr so stdout holds only the table and the JSON line."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ------------------------------------------------------------ statistics
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    """max / min - 1 of per-process values: how much identical runs disagreed."""
    xs = [x for x in xs if x is not None]
    return max(xs) / min(xs) - 1 if len(xs) > 1 and min(xs) > 0 else None


# --------------------------------------------------------------- output
def fmt(x, spec=".1f"):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return format(x, spec)


def pct(x):
    """0.453 -> '45%'; None -> '-'."""
    return "-" if x is None else f"{x * 100:.0f}%"


def format_table(headers, rows) -> str:
    """A Markdown table (pastes into docs as-is), columns padded to line up."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def print_report(title: str, table: str, record: dict):
    """Human table, then exactly one JSON line (the last line of stdout)."""
    print(title)
    print(table)
    print(json.dumps(record, sort_keys=True))
    sys.stdout.flush()


def machine_info() -> dict:
    import platform

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
