"""The public API in a plain loop, as an experimenter first writes it, vs PyTorch eager.

    pip install torch==2.13.0          # CPU wheel; for this benchmark only, never a tinygen dependency
    python benchmarks/compare_api.py                       # S and M, 3 rounds
    python benchmarks/compare_api.py --configs L --rounds 2

tinygen, in a fresh process with nothing set up (no environment variables,
no call before the loop):

    model = GPT(config, seed=0)
    for step in range(n):
        loss = model.loss_and_grads(x, y)[0]              # training: forward + backward (grads used, dropped)
    for step in range(n):
        loss = model.loss(x, y)                           # evaluation: forward + loss

PyTorch eager, torch.set_num_threads(2), the same weights (compare_torch's
nanoGPT model): `model.zero_grad(set_to_none=True); loss = model(x, y);
loss.backward()`, and `with torch.no_grad(): model(x, y)` for evaluation.

Batched decoding, tinygen only: `model.generate(prompts, 64, temperature=0)`
for `--generate-batch` rows (16-token prompts, KV cache), with the default
(rows sharded over the cores) against `workers=1` (one stream, BLAS with its
own threads), each in its own process, interleaved.

Processes run interleaved (tinygen, torch, tinygen, torch, ...); ratios are
medians of the per-round pairs, with their range. The losses must agree to
1e-5 (float32), else MISMATCH and exit status 1. Prints a table, then one
JSON line.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path too)

LOSS_TOL = 1e-5


def timed_loop(fn, steps: int, warmup: int) -> tuple:
    """(median ms over `steps` calls after `warmup` untimed ones, the first call's result)."""
    first = None
    samples = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = fn()
        dt = (time.perf_counter() - t0) * 1e3
        first = out if first is None else first
        if i >= warmup:
            samples.append(dt)
    return common.median(samples), first, samples


def tinygen_child(config: str, steps: int, warmup: int, seed: int = 0) -> dict:
    """The public API with default arguments, nothing set up first."""
    from tinygen import GPT

    cfg = common.config_by_name(config)
    x, y = common.make_batch(cfg, seed)
    model = GPT(common.gpt_config(cfg), seed=seed)
    # the gradients are dropped after each call, as PyTorch's zero_grad(set_to_none=True) drops its
    train_ms, loss, samples = timed_loop(lambda: model.loss_and_grads(x, y)[0], steps, warmup)
    rss = common.peak_rss_mib()
    eval_ms, eval_loss, _ = timed_loop(lambda: model.loss(x, y), steps, warmup)
    workers = None  # a tinygen from before the sharded API (benchmarking an old checkout) has no workers_for
    if hasattr(model, "workers_for"):
        with model.workers_for(x.shape[0]) as pool:
            workers = pool.n
    return {"config": config, "side": "tinygen", "train_ms": train_ms, "eval_ms": eval_ms, "loss": float(loss),
            "eval_loss": float(eval_loss), "samples_ms": samples, "peak_rss_mib": rss, "workers": workers}


def torch_child(config: str, steps: int, warmup: int, seed: int = 0, threads: int = 2) -> dict:
    import numpy as np
    import torch

    from compare_torch import torch_gpt
    from tinygen.model import init_params

    torch.set_num_threads(threads)
    cfg = common.config_by_name(config)
    model = torch_gpt(cfg, init_params(common.gpt_config(cfg), np.random.default_rng(seed)), sdpa=False)
    x, y = (torch.from_numpy(a) for a in common.make_batch(cfg, seed))

    def train():
        model.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        return loss.item()

    def evaluate():
        with torch.no_grad():
            return model(x, y).item()

    train_ms, loss, samples = timed_loop(train, steps, warmup)
    rss = common.peak_rss_mib()
    eval_ms, eval_loss, _ = timed_loop(evaluate, steps, warmup)
    return {"config": config, "side": "torch", "train_ms": train_ms, "eval_ms": eval_ms, "loss": loss,
            "eval_loss": eval_loss, "samples_ms": samples, "peak_rss_mib": rss, "torch": torch.__version__}


def generate_child(config: str, batch: int, new_tokens: int, workers, seed: int = 0) -> dict:
    """tokens/s of greedy batched decoding through the public API (workers None: the default)."""
    import numpy as np

    from tinygen import GPT

    cfg = common.config_by_name(config)
    model = GPT(common.gpt_config(cfg), seed=seed)
    prompts = np.random.default_rng(seed).integers(0, cfg["vocab_size"], (batch, 16))
    model.generate(prompts, 4, temperature=0, workers=workers)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(prompts, new_tokens, temperature=0, workers=workers)
    dt = time.perf_counter() - t0
    with model.workers_for(batch, workers) as pool:
        n = pool.n
    return {"config": config, "workers": n, "tokens_per_s": batch * new_tokens / dt, "ids": out.tolist()}


def paired(ours, theirs, key):
    """Speed ratio (their ms / our ms) per round: median, min, max."""
    rs = [b[key] / a[key] for a, b in zip(ours, theirs)]
    return common.median(rs), min(rs), max(rs)


DEFAULT_STEPS = {"S": 20, "S64": 10, "M": 5, "L": 3}
DEFAULT_WARMUP = {"S": 3, "S64": 2, "M": 2, "L": 1}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="S,M", help="comma-separated configs of benchmarks/common.py (default S,M)")
    p.add_argument("--steps", type=int, default=None, help="timed calls per process (default S 20, M 5, L 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default S 3, M 2, L 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (tinygen takes its default)")
    p.add_argument("--generate-batch", type=int, default=8, help="rows of the batched-decoding comparison (0: skip)")
    a = p.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("compare_api: PyTorch is not installed here; `pip install torch==2.13.0` (CPU wheel, benchmark "
              "only) and run again.", file=sys.stderr)
        return 2
    names = common.parse_configs(a.configs)
    machine = common.machine_info()
    runs = {(n, s): [] for n in names for s in ("tinygen", "torch")}
    for rnd in range(a.rounds):
        for n in names:
            steps = a.steps or DEFAULT_STEPS.get(n, 3)
            warmup = DEFAULT_WARMUP.get(n, 1) if a.warmup is None else a.warmup
            for side in ("tinygen", "torch"):
                common.progress(f"round {rnd + 1}/{a.rounds}: {n} {side} ({warmup} + {steps} calls) ...")
                if side == "tinygen":  # the caller's environment as it is: no thread variables
                    job = ("compare_api:tinygen_child", dict(config=n, steps=steps, warmup=warmup))
                else:
                    job = ("compare_api:torch_child", dict(config=n, steps=steps, warmup=warmup, threads=a.threads))
                runs[n, side].append(common.run_in_subprocess(*job))
            for workers in ([None, 1] if a.generate_batch else []):
                common.progress(f"round {rnd + 1}/{a.rounds}: {n} generate, batch {a.generate_batch}, "
                                f"workers {workers or 'default'} ...")
                runs.setdefault((n, f"generate-{workers}"), []).append(common.run_in_subprocess(
                    "compare_api:generate_child", dict(config=n, batch=a.generate_batch, new_tokens=64,
                                                       workers=workers)))
    rows, ratios, ok = [], [], True
    for n in names:
        tg, pt = runs[n, "tinygen"], runs[n, "torch"]
        train, evaluate = paired(tg, pt, "train_ms"), paired(tg, pt, "eval_ms")
        rss = common.median([a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in zip(tg, pt)])
        dloss = max(abs(a["loss"] - b["loss"]) for a, b in zip(tg, pt))
        same = dloss <= (LOSS_TOL if common.config_by_name(n)["dtype"] == "float32" else 1e-9)
        ok &= same
        tokens = common.tokens_per_step(common.config_by_name(n))
        ratios.append({"config": n, "loss_and_grads_speed_ratio": train[0], "loss_and_grads_range": train[1:],
                       "loss_speed_ratio": evaluate[0], "loss_range": evaluate[1:], "peak_rss_ratio": rss,
                       "loss_absdiff": dloss, "loss_ok": same, "tinygen_workers": tg[0]["workers"],
                       "tinygen_train_ms": common.median([r["train_ms"] for r in tg]),
                       "torch_train_ms": common.median([r["train_ms"] for r in pt]),
                       "tinygen_eval_ms": common.median([r["eval_ms"] for r in tg]),
                       "torch_eval_ms": common.median([r["eval_ms"] for r in pt])})
        r = ratios[-1]
        rows.append([n, f"{r['tinygen_train_ms']:.1f} / {r['torch_train_ms']:.1f}",
                     f"{train[0]:.2f} ({train[1]:.2f}-{train[2]:.2f})",
                     f"{tokens / r['tinygen_train_ms'] * 1e3:,.0f}",
                     f"{r['tinygen_eval_ms']:.1f} / {r['torch_eval_ms']:.1f}",
                     f"{evaluate[0]:.2f} ({evaluate[1]:.2f}-{evaluate[2]:.2f})", f"{rss:.2f}",
                     f"{dloss:.1e} {'ok' if same else 'MISMATCH'}"])
    gen_rows = []
    for n in (names if a.generate_batch else []):
        sharded, one = runs[n, "generate-None"], runs[n, "generate-1"]
        speed = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(sharded, one)]
        same = all(x["ids"] == y["ids"] for x, y in zip(sharded, one))
        r = next(r for r in ratios if r["config"] == n)
        r.update({"generate_batch": a.generate_batch, "generate_workers": sharded[0]["workers"],
                  "generate_tokens_per_s": common.median([x["tokens_per_s"] for x in sharded]),
                  "generate_one_stream_tokens_per_s": common.median([y["tokens_per_s"] for y in one]),
                  "generate_sharded_speed_ratio": common.median(speed), "generate_range": [min(speed), max(speed)],
                  "generate_same_ids": same})
        gen_rows.append([n, a.generate_batch, sharded[0]["workers"], f"{r['generate_tokens_per_s']:,.0f}",
                         f"{r['generate_one_stream_tokens_per_s']:,.0f}",
                         f"{common.median(speed):.2f} ({min(speed):.2f}-{max(speed):.2f})",
                         "all" if same else "DIFFER"])
    table = common.format_table(
        ["config", "loss_and_grads ms tinygen / torch", "speed tinygen / torch", "tinygen tokens/s",
         "loss ms tinygen / torch", "speed tinygen / torch", "peak RSS tinygen / torch", "|d loss|"], rows)
    if gen_rows:
        table += "\n\n" + common.format_table(
            ["config", "generate batch", "default workers", "tokens/s default", "tokens/s workers=1",
             "speed default / one stream", "same greedy ids"], gen_rows)
    title = (f"tinygen's public API with default arguments vs PyTorch {runs[names[0], 'torch'][0]['torch']} eager "
             f"({a.threads} threads), {a.rounds} interleaved rounds; speed = torch ms / tinygen ms, median of "
             f"per-round pairs (range); 1-min load average before the run: {machine['loadavg_1min']:.2f}")
    common.print_report(title, table, {"benchmark": "compare_api", "machine": machine, "threads": a.threads,
                                       "ratios": ratios})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
