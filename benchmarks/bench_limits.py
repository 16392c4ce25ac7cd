"""What bounds tinygen's training speed from below, measured: the BLAS NumPy ships, and the GIL.

    python benchmarks/bench_limits.py                  # S, M, L; 3 rounds
    python benchmarks/bench_limits.py --configs M --rounds 5

Two measurements, each side in its own process, interleaved (A B A B ...):

gemm   The matrix products of one shard of a training step (B / 2 rows, as each of
       the two worker threads runs them), on one thread: for every linear layer
       (c_attn, attn.c_proj, c_fc, mlp.c_proj) and the tied head, the forward
       x @ w, the input gradient dout @ w^T and the weight gradient x^T @ dout.
       NumPy (its bundled OpenBLAS) against PyTorch (MKL). The FLOP-weighted
       ratio says how much faster tinygen's step would be on PyTorch's BLAS
       with nothing else changed: the matrix products are ~75-90 % of the step.

gil    A chain of NumPy calls (x * 2, then + 1, in place) on arrays of `n`
       elements: microseconds per call on one thread alone, on two threads at
       once (each its own arrays: the sharded API's situation), and in two
       processes at once (no shared GIL). Every call releases the GIL for its
       loop and takes it back, so two threads hand it to each other at every
       call; the difference between the thread and process columns is what
       that hand-over costs.

Prints a table per measurement, then one JSON line. PyTorch is needed for the
gemm comparison only (`pip install torch==2.13.0`; never a tinygen dependency).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path too)

GIL_SIZES = (1 << 12, 1 << 15, 1 << 17)  # elements per call: S-sized pieces to PIECE (512 KiB of float32); much
#                                          larger calls stream memory and measure its bandwidth, not the GIL


def gemm_shapes(cfg: dict, workers: int = 2) -> list:
    """(label, rows, K, N) of each matrix product of one shard's linear layers and head."""
    C, V = cfg["n_embd"], cfg["vocab_size"]
    rows = max(1, cfg["batch_size"] // workers) * cfg["block_size"]
    return [("c_attn", rows, C, 3 * C), ("attn.c_proj", rows, C, C), ("c_fc", rows, C, 4 * C),
            ("mlp.c_proj", rows, 4 * C, C), ("head", rows, C, V)]


def gemm_child(config: str, side: str, reps: int = 7) -> dict:
    """Median ms of each product of gemm_shapes on one thread, NumPy or PyTorch."""
    import contextlib

    import numpy as np

    cfg = common.config_by_name(config)
    rng = np.random.default_rng(0)
    if side == "torch":
        import torch

        torch.set_num_threads(1)
        wrap, one_thread = torch.from_numpy, contextlib.nullcontext()
    else:
        from tinygen.plumbing.parallel import one_blas_thread, openblas_threads_api

        wrap, one_thread = (lambda a: a), one_blas_thread.scope(openblas_threads_api())
    out = {}
    with one_thread:
        for label, rows, K, N in gemm_shapes(cfg) * 2:  # the first pass is a warm-up: a library's first
            # products of a process pay its set-up (MKL's first call of each shape ran at half speed)
            x, w, d = (wrap(rng.standard_normal(s, dtype=np.float32)) for s in ((rows, K), (K, N), (rows, N)))
            for kind, fn in (("fwd", lambda: x @ w), ("dx", lambda: d @ w.T), ("dw", lambda: x.T @ d)):
                fn()
                samples = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    samples.append((time.perf_counter() - t0) * 1e3)
                out[f"{label}.{kind}"] = {"ms": common.median(samples), "gflop": 2 * rows * K * N / 1e9}
    return {"config": config, "side": side, "products": out}


def _chain(a, b, calls: int):
    import numpy as np

    for _ in range(calls // 2):
        np.multiply(a, 2.0, out=b)
        b += 1.0


def gil_child(mode: str, n: int, calls: int) -> dict:
    """us per call of the chain: mode 'one' (one thread), 'threads' (two at once, this process)."""
    import threading

    import numpy as np

    arrays = [(np.ones(n, np.float32), np.empty(n, np.float32)) for _ in range(2)]
    _chain(*arrays[0], calls // 10)  # warm-up: pages touched, ufunc loops resolved
    t0 = time.perf_counter()
    if mode == "one":
        _chain(*arrays[0], calls)
    else:
        threads = [threading.Thread(target=_chain, args=(a, b, calls)) for a, b in arrays]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"us_per_call": (time.perf_counter() - t0) / calls * 1e6}


def gil_processes(n: int, calls: int) -> float:
    """us per call with two processes running the chain at once (started together, timed inside)."""
    import subprocess

    code = ("import sys, time, numpy as np; sys.path[:0] = [{b!r}]; import bench_limits as m; "
            "a, b = np.ones({n}, np.float32), np.empty({n}, np.float32); m._chain(a, b, {w}); "
            "t = time.perf_counter(); m._chain(a, b, {c}); print((time.perf_counter() - t) / {c} * 1e6)")
    code = code.format(b=common.BENCH_DIR, n=n, c=calls, w=calls // 10)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    return max(float(p.communicate()[0]) for p in procs)


def calls_for(n: int) -> int:
    """Enough calls for ~0.3 s of work on one thread."""
    return max(200, int(3e8 // max(n, 1 << 12) // 10) * 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="S,M,L", help="comma-separated, from S, M, L (default S,M,L)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per side, interleaved (default 3)")
    ap.add_argument("--skip-gemm", action="store_true", help="only the GIL measurement (no PyTorch needed)")
    args = ap.parse_args(argv)
    configs = common.parse_configs(args.configs)
    record = {"benchmark": "bench_limits", "machine": common.machine_info(), "gemm": {}, "gil": []}

    if not args.skip_gemm:
        rows = []
        for config in configs:
            runs = {"numpy": [], "torch": []}
            for r in range(args.rounds):
                for side in ("numpy", "torch"):
                    common.progress(f"round {r + 1}/{args.rounds}: gemm {config} {side} ...")
                    runs[side].append(common.run_in_subprocess("bench_limits:gemm_child",
                                                               {"config": config, "side": side}))
            products = runs["numpy"][0]["products"]
            med = {side: {k: common.median([run["products"][k]["ms"] for run in runs[side]]) for k in products}
                   for side in runs}
            for k, p in products.items():
                rows.append([config, k, f"{p['gflop']:.2f}", common.fmt(p["gflop"] / med["numpy"][k] * 1e3, ".0f"),
                             common.fmt(p["gflop"] / med["torch"][k] * 1e3, ".0f"),
                             common.fmt(med["torch"][k] / med["numpy"][k], ".2f")])
            total = {side: sum(med[side].values()) for side in med}
            rows.append([config, "all (FLOP-weighted)", f"{sum(p['gflop'] for p in products.values()):.2f}",
                         "", "", common.fmt(total["torch"] / total["numpy"], ".2f")])
            record["gemm"][config] = {"numpy_ms": med["numpy"], "torch_ms": med["torch"],
                                      "torch_over_numpy_time": total["torch"] / total["numpy"]}
        table = common.format_table(["config", "product (one shard, one thread)", "GFLOP", "NumPy GFLOP/s",
                                     "PyTorch GFLOP/s", "NumPy speed / PyTorch's"], rows)
        print("matrix products: NumPy (OpenBLAS) vs PyTorch (MKL), one thread, medians over "
              f"{args.rounds} interleaved processes each")
        print(table)

    rows = []
    for n in GIL_SIZES:
        calls = calls_for(n)
        per = {"one": [], "threads": [], "processes": []}
        for r in range(args.rounds):
            common.progress(f"round {r + 1}/{args.rounds}: gil n={n} ...")
            for mode in ("one", "threads"):
                per[mode].append(common.run_in_subprocess("bench_limits:gil_child",
                                                          {"mode": mode, "n": n, "calls": calls})["us_per_call"])
            per["processes"].append(gil_processes(n, calls))
        one, threads, procs = (common.median(per[k]) for k in ("one", "threads", "processes"))
        rows.append([f"{n:,}", f"{one:.1f}", f"{threads:.1f}", f"{procs:.1f}", f"{threads - procs:+.1f}"])
        record["gil"].append({"n": n, "one_us": one, "two_threads_us": threads, "two_processes_us": procs})
    print("\nthe GIL: us per NumPy call of a chain, one thread alone / two threads at once / two processes at once")
    print(common.format_table(["elements per call", "one thread", "two threads", "two processes",
                               "threads - processes"], rows))
    print(f"1-min load average before the run: {record['machine']['loadavg_1min']:.2f}")
    import json

    print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
