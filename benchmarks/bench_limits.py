"""What bounds tinygen's training speed from below, measured: the BLAS NumPy ships, and the GIL.

    python benchmarks/bench_limits.py                  # S, M, L; 3 rounds
    python benchmarks/bench_limits.py --configs M --rounds 5
    python benchmarks/bench_limits.py --skip-gemm      # the GIL part only (no PyTorch needed)

Two measurements, each side in its own process, interleaved (A B A B ...):

gemm   Every matrix product of one shard's training step (B / 2 rows, as each of
       the two worker threads runs them), on one thread. Per block: each linear
       layer's (c_attn, attn.c_proj, c_fc, mlp.c_proj) forward x @ w, input
       gradient dout @ w^T and weight gradient x^T @ dout, and the attention's
       batched products over the blocks of 64 query rows tinygen.attention
       computes (scores q k^T and att v forward; four of the same size
       backward); then the tied head's three. NumPy (its bundled OpenBLAS)
       against PyTorch (MKL). Totals count every block (n_layer times the
       per-block products), so the FLOP-weighted ratio is the speed of all of a
       step's products on NumPy's BLAS relative to PyTorch's. Then the whole
       shard step on one thread, each side (tinygen's `loss_and_grads`,
       PyTorch's zero_grad + forward + backward), and the products' share of it.

gil    A chain of NumPy calls (x * 2, then + 1, in place) on arrays of `n`
       elements, ~0.3 s of it: microseconds per call on one thread alone; on two
       threads of one process at once, each with its own arrays (the sharded
       API's situation); and in two processes at once (no shared GIL; both
       warmed up, then started together). "CPUs busy" is the threads' process
       CPU time over the wall time: 2.0 is two calls running at once all along,
       1.0 is none overlapping. Then the same three ways for the model itself
       (configs S and M): `model.loss` on one shard of B / 2 rows alone, one
       shard in each of two processes at once, and the default call on the
       whole batch (two shards on two threads).

Prints a table per measurement, then one JSON line. PyTorch is needed for the
gemm comparison only (`pip install torch==2.13.0`; never a tinygen dependency).
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path too)

GIL_SIZES = (1 << 12, 1 << 15, 1 << 17)  # elements per call: S-sized pieces up to PIECE (512 KiB of float32)
GIL_SECONDS = 0.3  # of chain per measurement, on one thread
QUERY_BLOCK = 64  # tinygen.attention.BLOCK, the attention's query rows per block


def gemm_shapes(cfg: dict, workers: int = 2) -> list:
    """(label, batch, rows, K, N, count) of one shard's step: `batch` stacked (rows, K) @ (K, N)
    products, `count` times a step (n_layer for a block's, 1 for the head's)."""
    C, V, T, H, L = cfg["n_embd"], cfg["vocab_size"], cfg["block_size"], cfg["n_head"], cfg["n_layer"]
    B = max(1, cfg["batch_size"] // workers)
    rows, D = B * T, C // H
    shapes = [("c_attn", 1, rows, C, 3 * C, L), ("attn.c_proj", 1, rows, C, C, L), ("c_fc", 1, rows, C, 4 * C, L),
              ("mlp.c_proj", 1, rows, 4 * C, C, L)]
    for lo in range(0, T, QUERY_BLOCK):  # query rows [lo, hi) see keys [0, hi)
        hi = min(lo + QUERY_BLOCK, T)
        shapes.append((f"attention[{lo}:{hi}]", B * H, hi - lo, D, hi, L))  # (Tq, D) @ (D, hi): q k^T
    return shapes + [("head", 1, rows, C, V, 1)]


def gemm_child(config: str, side: str, reps: int = 7) -> dict:
    """Median ms of each product of gemm_shapes on one thread (fwd, dx, dw), NumPy or PyTorch."""
    import contextlib

    import numpy as np

    cfg = common.config_by_name(config)
    rng = np.random.default_rng(0)
    if side == "torch":
        import torch

        torch.set_num_threads(1)
        wrap, one_thread = torch.from_numpy, contextlib.nullcontext()
    else:
        wrap, one_thread = (lambda a: a), one_blas_thread()
    out = {}
    with one_thread:
        for label, batch, rows, K, N, count in gemm_shapes(cfg) * 2:  # the first pass is a warm-up: a library's
            # first products of a process pay its set-up (MKL's first call of each shape ran at half speed)
            x, w, d = (wrap(rng.standard_normal((batch,) + s, dtype=np.float32)) for s in ((rows, K), (K, N), (rows, N)))
            if batch == 1:
                x, w, d = x[0], w[0], d[0]
            # x @ w, d @ w^T (the input's gradient), x^T @ d (the weight's): for the attention the same three
            # sizes are its forward's q k^T, att v and its backward's four products (dv, d att, dq, dk)
            for kind, fn in (("fwd", lambda: x @ w), ("dx", lambda: d @ w.swapaxes(-1, -2)),
                             ("dw", lambda: x.swapaxes(-1, -2) @ d)):
                out[f"{label}.{kind}"] = {"ms": timed(fn, reps), "gflop": 2 * batch * rows * K * N / 1e9,
                                          "count": count * (2 if label.startswith("attention") else 1)}
        step_ms = timed(shard_step(config, side), STEP_CALLS[config])
    return {"config": config, "side": side, "products": out, "step_ms": step_ms}


STEP_CALLS = {"S": 20, "M": 5, "L": 2}  # timed shard steps per process


def shard_step(config: str, side: str):
    """One shard's training forward + backward as a call: tinygen's `model.loss_and_grads(x, y,
    workers=1)`, or PyTorch eager's zero_grad, forward, backward (compare_torch's model, same weights)."""
    import numpy as np

    from tinygen.model import init_params

    cfg = common.config_by_name(config)
    x, y = half_batch(config)
    if side == "numpy":
        from tinygen import GPT

        model = GPT(common.gpt_config(cfg), seed=0)
        return lambda: model.loss_and_grads(x, y, workers=1)
    import torch
    from compare_torch import torch_gpt

    model = torch_gpt(cfg, init_params(common.gpt_config(cfg), np.random.default_rng(0)), sdpa=False)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        model.zero_grad(set_to_none=True)
        model(tx, ty).backward()

    return step


# ------------------------------------------------------------------- the GIL
def chain(a, b, calls: int) -> None:
    """`calls` NumPy calls on (n,) float32 arrays, in place, each releasing the GIL for its loop."""
    import numpy as np

    for _ in range(calls // 2):
        np.multiply(a, 2.0, out=b)
        b += 1.0


def calls_for(n: int) -> int:
    """Calls of `chain` on n elements that take ~GIL_SECONDS on one thread (timed here, warm)."""
    import numpy as np

    a, b = np.ones(n, np.float32), np.zeros(n, np.float32)
    chain(a, b, 200)
    t0 = time.perf_counter()
    chain(a, b, 200)
    return max(200, int(GIL_SECONDS / ((time.perf_counter() - t0) / 200)) // 2 * 2)


def gil_child(mode: str, n: int, calls: int) -> dict:
    """us per call of the chain: mode 'one' (one thread) or 'threads' (two at once, started together)."""
    import numpy as np

    k = 1 if mode == "one" else 2
    arrays = [(np.ones(n, np.float32), np.zeros(n, np.float32)) for _ in range(k)]
    for a, b in arrays:
        chain(a, b, 200)  # warm-up: every page touched, the ufunc loops resolved
    start = threading.Barrier(k + 1)

    def run(a, b):
        start.wait()
        chain(a, b, calls)

    threads = [threading.Thread(target=run, args=ab) for ab in arrays]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"us_per_call": wall / calls * 1e6, "cpus_busy": (time.process_time() - cpu0) / wall}


_TOGETHER_CODE = "import sys; sys.path[:0] = [{bench!r}]; import bench_limits; bench_limits.together_child()"


def together(kind: str, args: dict, n: int = 2) -> list:
    """Run n processes of `together_child(kind, args)` at once: each warms up, says it is ready and
    waits; then all are told to go. Returns what each printed: (t0, t1, ...) around its timed work.
    Raises unless every child finished and the shortest window lay 90 % or more inside all the others."""
    code = _TOGETHER_CODE.format(bench=common.BENCH_DIR)
    procs = [subprocess.Popen([sys.executable, "-c", code, kind, json.dumps(args)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a {kind} child failed before its timed run")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    windows = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0 or not out.strip():
            raise RuntimeError(f"a {kind} child exited with {p.returncode}")
        windows.append(tuple(map(float, out.split())))  # t0, t1 and whatever the child adds
    overlap = (min(w[1] for w in windows) - max(w[0] for w in windows)) / min(w[1] - w[0] for w in windows)
    if overlap < 0.9:
        raise RuntimeError(f"the children's timed runs overlapped {overlap:.0%} only; rerun on a quieter machine")
    return windows


def together_child() -> None:
    """One child of `together` (argv: kind, JSON args). kind "chain": `chain` on arrays of n elements,
    `calls` calls; "shard": `model.loss` on one shard of `config`, one thread, one BLAS thread, `calls`
    calls, printing their median ms after t0 and t1."""
    import contextlib

    import numpy as np

    kind, args = sys.argv[1], json.loads(sys.argv[2])
    with contextlib.ExitStack() as stack:
        if kind == "chain":
            a, b = np.ones(args["n"], np.float32), np.zeros(args["n"], np.float32)
            chain(a, b, 200)  # warm-up

            def run():
                chain(a, b, args["calls"])
        else:
            loss = shard_loss(args["config"])
            stack.enter_context(one_blas_thread())
            loss()  # warm-up

            def run():
                return timed(loss, args["calls"])
        print("ready", flush=True)
        sys.stdin.readline()
        t0 = time.perf_counter()
        extra = run()
        t1 = time.perf_counter()
    print(t0, t1, *([] if extra is None else [extra]), flush=True)


def gil_processes(n: int, calls: int) -> float:
    """us per call with two processes running the chain at once (both warm, started together)."""
    return max(w[1] - w[0] for w in together("chain", {"n": n, "calls": calls})) / calls * 1e6


# ------------------------------------------------------- the GIL, in the model
MODEL_CALLS = {"S": 200, "M": 10}  # timed `loss` calls per measurement (S: ~3 s)


def half_batch(config: str):
    """(x, y) of one of two shards: the first B / 2 rows of the benchmark batch."""
    x, y = common.make_batch(common.config_by_name(config), 0)
    return x[: len(x) // 2], y[: len(y) // 2]


def shard_loss(config: str):
    """One shard's `model.loss` (B / 2 rows, one stream) as a call; run it under one_blas_thread(),
    as each worker thread does."""
    from tinygen import GPT

    model = GPT(common.gpt_config(common.config_by_name(config)), seed=0)
    x, y = half_batch(config)
    return lambda: model.loss(x, y, workers=1)


def one_blas_thread():
    """A `with` block holding OpenBLAS at one thread (tinygen's own scope, as its shard threads use)."""
    from tinygen.plumbing.parallel import one_blas_thread as scope, openblas_threads_api

    return scope.scope(openblas_threads_api())


def model_child(config: str, mode: str, calls: int) -> dict:
    """Median ms of `model.loss`: mode 'shard' one shard (B / 2 rows) on one thread with one BLAS
    thread, as each worker runs it; 'threads' the whole batch, the default call (two shard threads)."""
    if mode == "shard":
        loss = shard_loss(config)
        with one_blas_thread():
            return {"ms": timed(loss, calls)}
    from tinygen import GPT

    cfg = common.config_by_name(config)
    model = GPT(common.gpt_config(cfg), seed=0)
    x, y = common.make_batch(cfg, 0)
    return {"ms": timed(lambda: model.loss(x, y), calls)}


def timed(fn, calls: int) -> float:
    """Median ms of `calls` calls after two untimed ones (a product's, a step's, a `loss`)."""
    fn(), fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return common.median(samples)


def model_processes(config: str, calls: int) -> float:
    """Median ms of one shard's `loss` in each of two processes running at once (the slower one)."""
    return max(w[2] for w in together("shard", {"config": config, "calls": calls}))


# ---------------------------------------------------------------- reporting
def gemm_table(configs: list, rounds: int, record: dict) -> str:
    rows, steps = [], []
    for config in configs:
        runs = {"numpy": [], "torch": []}
        for r in range(rounds):
            for side in ("numpy", "torch"):
                common.progress(f"round {r + 1}/{rounds}: gemm {config} {side} ...")
                runs[side].append(common.run_in_subprocess("bench_limits:gemm_child", {"config": config, "side": side}))
        products = runs["numpy"][0]["products"]
        med = {side: {k: common.median([run["products"][k]["ms"] for run in runs[side]]) for k in products}
               for side in runs}
        groups = {}  # the per-block attention products shown as one line per kind
        for k, p in products.items():
            label = "attention" + k[k.index("."):] if k.startswith("attention") else k
            g = groups.setdefault(label, {"gflop": 0.0, "numpy": 0.0, "torch": 0.0})
            g["gflop"] += p["gflop"] * p["count"]
            for side in ("numpy", "torch"):
                g[side] += med[side][k] * p["count"]
        for label, g in groups.items():
            rows.append([config, label, f"{g['gflop']:.2f}", f"{g['gflop'] / g['numpy'] * 1e3:.0f}",
                         f"{g['gflop'] / g['torch'] * 1e3:.0f}", f"{g['torch'] / g['numpy']:.2f}"])
        total = {k: sum(g[k] for g in groups.values()) for k in ("gflop", "numpy", "torch")}
        rows.append([config, "all of the step's products", f"{total['gflop']:.1f}",
                     f"{total['gflop'] / total['numpy'] * 1e3:.0f}", f"{total['gflop'] / total['torch'] * 1e3:.0f}",
                     f"{total['torch'] / total['numpy']:.2f}"])
        step = {side: common.median([run["step_ms"] for run in runs[side]]) for side in runs}
        steps.append([config, f"{step['numpy']:.1f}", f"{total['numpy']:.1f} ({total['numpy'] / step['numpy']:.0%})",
                      f"{step['torch']:.1f}", f"{total['torch']:.1f} ({total['torch'] / step['torch']:.0%})",
                      f"{step['torch'] / step['numpy']:.2f}"])
        record["gemm"][config] = {"numpy_ms": total["numpy"], "torch_ms": total["torch"], "gflop": total["gflop"],
                                  "numpy_speed_over_torch": total["torch"] / total["numpy"],
                                  "numpy_step_ms": step["numpy"], "torch_step_ms": step["torch"]}
    products = common.format_table(["config", "products of one shard's step (one thread)", "GFLOP", "NumPy GFLOP/s",
                                    "PyTorch GFLOP/s", "NumPy speed / PyTorch's"], rows)
    return products + "\n\none shard's whole step (forward + backward), one thread, ms\n" + common.format_table(
        ["config", "tinygen", "of which products (share)", "PyTorch", "of which products (share)",
         "tinygen speed / PyTorch's"], steps)


def gil_table(rounds: int, record: dict) -> str:
    rows = []
    for n in GIL_SIZES:
        calls = calls_for(n)
        per = {"one": [], "threads": [], "busy": [], "processes": []}
        for r in range(rounds):
            common.progress(f"round {r + 1}/{rounds}: gil n={n} ({calls} calls) ...")
            per["one"].append(common.run_in_subprocess("bench_limits:gil_child",
                                                       {"mode": "one", "n": n, "calls": calls})["us_per_call"])
            both = common.run_in_subprocess("bench_limits:gil_child", {"mode": "threads", "n": n, "calls": calls})
            per["threads"].append(both["us_per_call"])
            per["busy"].append(both["cpus_busy"])
            per["processes"].append(gil_processes(n, calls))
        one, threads, busy, procs = (common.median(per[k]) for k in ("one", "threads", "busy", "processes"))
        rows.append([f"{n:,}", f"{one:.1f}", f"{threads:.1f}", f"{busy:.2f}", f"{procs:.1f}"])
        record["gil"].append({"n": n, "calls": calls, "one_us": one, "two_threads_us": threads,
                              "two_threads_cpus_busy": busy, "two_processes_us": procs})
    return common.format_table(["elements per call", "one thread, us", "two threads, us", "CPUs busy (threads)",
                                "two processes, us"], rows)


def model_table(configs: list, rounds: int, record: dict) -> str:
    rows = []
    for config in configs:
        calls = MODEL_CALLS.get(config, 3)
        per = {"shard": [], "processes": [], "threads": []}
        for r in range(rounds):
            common.progress(f"round {r + 1}/{rounds}: model {config} ...")
            per["shard"].append(common.run_in_subprocess("bench_limits:model_child",
                                                         {"config": config, "mode": "shard", "calls": calls})["ms"])
            per["processes"].append(model_processes(config, calls))
            per["threads"].append(common.run_in_subprocess("bench_limits:model_child",
                                                           {"config": config, "mode": "threads", "calls": calls})["ms"])
        shard, procs, threads = (common.median(per[k]) for k in ("shard", "processes", "threads"))
        rows.append([config, f"{shard:.1f}", f"{procs:.1f}", f"{threads:.1f}", f"{threads / procs - 1:+.0%}"])
        record["model"][config] = {"shard_alone_ms": shard, "two_processes_ms": procs, "two_threads_ms": threads}
    return common.format_table(["config", "one shard alone, ms", "two shards in two processes, ms",
                                "two shards on two threads (the default call), ms", "threads vs processes"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="S,M,L", help="comma-separated, from S, M, L (default S,M,L)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per side, interleaved (default 3)")
    ap.add_argument("--skip-gemm", action="store_true", help="only the GIL measurements (no PyTorch needed)")
    args = ap.parse_args(argv)
    record = {"benchmark": "bench_limits", "machine": common.machine_info(), "gemm": {}, "gil": [], "model": {}}
    if not args.skip_gemm:
        table = gemm_table(common.parse_configs(args.configs), args.rounds, record)
        print(f"matrix products: NumPy (OpenBLAS) vs PyTorch (MKL), one thread, medians over {args.rounds} "
              "interleaved processes each; a line's GFLOP and times add up every block")
        print(table)
        print()
    table = gil_table(args.rounds, record)
    print("the GIL: us per NumPy call of a chain (each thread or process its own calls), "
          "one thread alone / two threads at once / two processes at once")
    print(table)
    print()
    table = model_table([c for c in common.parse_configs(args.configs) if c in MODEL_CALLS], args.rounds, record)
    print("the GIL in the model: `model.loss` of a two-shard batch, one shard alone (one thread, one BLAS "
          "thread), two shards in two processes at once, and the default sharded call")
    print(table)
    print(f"1-min load average before the run: {record['machine']['loadavg_1min']:.2f}")
    print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
