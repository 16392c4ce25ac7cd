"""Training-step speed of tinygen on the ANCHORS configs S and M (and S64, S in float64).

    python benchmarks/bench_train.py                      # S and M, defaults
    python benchmarks/bench_train.py --configs S,M,S64 --rounds 3
    python benchmarks/bench_train.py --profile            # cProfile, top 25 by tottime
    python benchmarks/bench_train.py --configs S --malloc both   # the cost of not reusing freed memory

One step = the training loop's: forward + backward of the batch's shards on
`--workers` threads, summed into the optimizer's flat grad buffer
(`train.accumulate_grads`), then the gradient norm (`opt.grad_norm`, the "clip"
column) and `opt.step` with clipping folded into AdamW's pass, each timed
on its own. `--malloc reuse` (the default) runs as tinygen does by default
(tinygen.plumbing.memory.reuse_freed_memory at the first computation);
`--malloc default` sets TINYGEN_MALLOC=default in the child, as a caller
who opts out does, so glibc's malloc stays as it is; `--malloc both` runs each config both ways. Forward alone (training mode, caches
kept) is timed in extra calls interleaved with the steps, so bwd = (fwd+bwd) - fwd.
Each config runs in its own process (per-config peak RSS), `--rounds` times
interleaved (S M S M ...); the table shows medians of the per-process
medians and the spread (max/min - 1) between processes.
"""
import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path too)

import numpy as np  # noqa: E402


# ------------------------------------------------------- the measured work
class Step:
    """The training loop's step on one fixed batch, in timed parts:

        fwdbwd()    train.accumulate_grads: the shards' forward + backward on the
                    worker threads, summed into the optimizer's flat grad buffer
        optimize()  opt.grad_norm, then opt.step clipping inside the update, as the
                    training loop does -> (norm_s, adamw_s)
        forward()   the shards' forward + loss alone (caches kept, as before a backward)
    """

    def __init__(self, cfg: dict, seed: int, workers: int, reuse_memory: bool = True):
        from tinygen.plumbing.memory import OPT_OUT, reuse_freed_memory
        from tinygen.gpt import GPT
        from tinygen.optim import AdamW
        from tinygen.plumbing.parallel import Workers, default_workers, ranges
        from tinygen.train import TrainConfig

        if reuse_memory:
            reuse_freed_memory()  # what tinygen's first computation would do anyway
        else:
            os.environ[OPT_OUT[0]] = OPT_OUT[1]  # the caller's opt-out, read at tinygen's first computation
        self.model = GPT(common.gpt_config(cfg), seed)
        self.idx, self.targets = common.make_batch(cfg, seed)
        B = cfg["batch_size"]
        self.workers = Workers(workers or default_workers(B))
        self.config = TrainConfig(vocab_size=cfg["vocab_size"], block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                                  n_head=cfg["n_head"], n_embd=cfg["n_embd"], dtype=cfg["dtype"], batch_size=B,
                                  seed=seed, workers=self.workers.n)
        self.opt = AdamW(self.model.params, lr=common.LR, betas=common.BETAS, eps=common.EPS,
                         weight_decay=common.WEIGHT_DECAY, workers=self.workers)
        self.shards = [slice(lo, hi) for lo, hi in ranges(B, self.workers.n)]

    def fwdbwd(self) -> float:
        from tinygen.train import accumulate_grads

        return accumulate_grads(self.model, self.opt, (self.idx, self.targets), workers=self.workers,
                                config=self.config, step=0)

    def optimize(self):
        from tinygen.optim import clip_coef

        t0 = time.perf_counter()
        norm = self.opt.grad_norm()
        t1 = time.perf_counter()
        self.opt.step(lr=common.LR, grad_scale=clip_coef(norm, common.CLIP))
        return t1 - t0, time.perf_counter() - t1

    def forward(self) -> float:
        from tinygen.loss import cross_entropy_forward
        from tinygen.model import gpt_forward

        def shard(rows):
            logits, cache = gpt_forward(self.model.params, self.idx[rows], self.model.config)
            cross_entropy_forward(logits, self.targets[rows])

        t0 = time.perf_counter()
        self.workers.map(shard, self.shards)
        return time.perf_counter() - t0


def train_child(config: str, steps: int, warmup: int, seed: int = 0, fwd_split: bool = True,
                peak_reps: int = 5, workers: int = 0, reuse_memory: bool = True) -> dict:
    """Runs in a child process: warm-up, then `steps` timed steps. Times in ms."""
    cfg = common.config_by_name(config)
    step = Step(cfg, seed, workers, reuse_memory)
    rec = {k: [] for k in ("step", "fwdbwd", "fwd", "clip", "adamw", "opt", "cpu")}
    losses = []
    gc.collect()
    for i in range(warmup + steps):
        timed = i >= warmup
        if fwd_split and timed:
            rec["fwd"].append(step.forward() * 1e3)
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step.fwdbwd()
        t1 = time.perf_counter()
        clip_s, adamw_s = step.optimize()
        t2, c2 = time.perf_counter(), time.process_time()
        losses.append(float(loss))
        if timed:
            rec["fwdbwd"].append((t1 - t0) * 1e3)
            rec["step"].append((t2 - t0) * 1e3)
            rec["cpu"].append((c2 - c0) * 1e3)  # CPU time of all threads (BLAS spin-waits included)
            rec["clip"].append(clip_s * 1e3)
            rec["adamw"].append(adamw_s * 1e3)
            rec["opt"].append((t2 - t1) * 1e3)
    out = {"config": config, "side": "tinygen", "workers": step.workers.n, "reuse_memory": reuse_memory,
           "losses": losses, "samples_ms": rec,
           "peak_rss_mib": common.peak_rss_mib()}  # recorded before the matmul probe below
    step.workers.close()
    out.update({k + "_ms": common.median(v) for k, v in rec.items()})
    out["peak"] = common.matmul_peak(reps=peak_reps, dtype=cfg["dtype"])
    return out


def profile_child(config: str, steps: int, warmup: int, seed: int = 0, top: int = 25, workers: int = 0) -> dict:
    """cProfile over `steps` full steps (fwd + bwd + clip + AdamW) after warm-up.

    cProfile sees the calling thread only: profile with --workers 1 to see
    where the shards' time goes, with the default to see the main thread's share.
    """
    cfg = common.config_by_name(config)
    step = Step(cfg, seed, workers)

    def one():
        step.fwdbwd()
        step.optimize()

    for _ in range(warmup):
        one()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        one()
    prof.disable()
    wall = time.perf_counter() - t0
    step.workers.close()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(top)
    text = buf.getvalue()
    text = text[text.find("   ncalls"):] if "   ncalls" in text else text
    return {"config": config, "steps": steps, "wall_ms_per_step": wall / steps * 1e3, "text": text}


# ---------------------------------------------------------------- parent
def summarize(cfg_name: str, runs: list, malloc: str = "reuse") -> dict:
    """Median over processes of each per-process median, plus derived rates."""
    cfg = common.config_by_name(cfg_name)
    s = {"config": cfg_name, "dtype": cfg["dtype"], "malloc": malloc, "processes": len(runs)}
    for k in ("step", "fwdbwd", "fwd", "clip", "adamw", "opt", "cpu"):
        s[k + "_ms"] = common.median([r[k + "_ms"] for r in runs])
    s["bwd_ms"] = s["fwdbwd_ms"] - s["fwd_ms"] if s["fwd_ms"] is not None else None
    s["step_spread"] = common.spread([r["step_ms"] for r in runs])
    s["peak_rss_mib"] = common.median([r["peak_rss_mib"] for r in runs])
    s["matmul_peak_gflops"] = common.median([x for r in runs for x in r["peak"]["samples"]])
    flops, tokens = common.model_flops_per_step(cfg), common.tokens_per_step(cfg)
    s["gflop_per_step"] = flops / 1e9
    s["tokens_per_s"] = tokens / (s["step_ms"] / 1e3)
    s["achieved_gflops"] = flops / (s["step_ms"] / 1e3) / 1e9
    s["mfu"] = s["achieved_gflops"] / s["matmul_peak_gflops"]
    s["fwdbwd_gflops"] = flops / (s["fwdbwd_ms"] / 1e3) / 1e9
    s["initial_loss"] = runs[0]["losses"][0]
    return s


def table(summaries) -> str:
    headers = ["config", "ms/step", "spread", "fwd+bwd ms", "fwd ms", "bwd ms", "norm ms", "AdamW ms",
               "opt ms", "tokens/s", "GFLOP/s", "peak GFLOP/s", "MFU", "peak RSS MiB", "CPU ms/step"]
    rows = []
    for s in summaries:
        rows.append([
            s["config"] + ("" if s["dtype"] == "float32" else f" ({s['dtype']})")
            + ("" if s["malloc"] == "reuse" else f" (malloc {s['malloc']})"),
            common.fmt(s["step_ms"]), common.pct(s["step_spread"]),
            common.fmt(s["fwdbwd_ms"]), common.fmt(s["fwd_ms"]), common.fmt(s["bwd_ms"]),
            common.fmt(s["clip_ms"], ".2f"), common.fmt(s["adamw_ms"], ".2f"), common.fmt(s["opt_ms"], ".2f"),
            common.fmt(s["tokens_per_s"], ",.0f"), common.fmt(s["achieved_gflops"], ".0f"),
            common.fmt(s["matmul_peak_gflops"], ".0f"), common.pct(s["mfu"]),
            common.fmt(s["peak_rss_mib"], ".0f"), common.fmt(s["cpu_ms"]),
        ])
    return common.format_table(headers, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="S,M", help="comma-separated, from S, M, L, S64 (default S,M)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default S 20, S64 10, M 5, L 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default S 3, S64 2, M 2, L 1)")
    p.add_argument("--rounds", type=int, default=3, help="processes per config, interleaved (default 3)")
    p.add_argument("--threads", type=int, default=0, help="pin BLAS threads (default: as-is)")
    p.add_argument("--workers", type=int, default=0,
                   help="threads running batch shards, as `tinygen pretrain --workers` (default 0: one per core)")
    p.add_argument("--malloc", choices=["reuse", "default", "both"], default="reuse",
                   help="reuse: tinygen's default, reuse_freed_memory (default); default: glibc's own settings, as with "
                   "TINYGEN_MALLOC=default; both: each config both ways")
    p.add_argument("--no-fwd-split", action="store_true", help="skip the extra forward-only calls")
    p.add_argument("--profile", action="store_true", help="cProfile a few steps per config instead of timing")
    p.add_argument("--top", type=int, default=25, help="rows of the --profile listing")
    a = p.parse_args(argv)
    names = common.parse_configs(a.configs)
    env = common.thread_env(a.threads)
    machine = common.machine_info()  # load average before we add ours

    if a.profile:
        for n in names:
            steps = a.steps or max(2, common.DEFAULT_STEPS[n] // 4)
            warmup = common.DEFAULT_WARMUP[n] if a.warmup is None else a.warmup
            common.progress(f"profiling {n}: {warmup} warm-up + {steps} profiled steps ...")
            r = common.run_in_subprocess("bench_train:profile_child",
                                         dict(config=n, steps=steps, warmup=warmup, top=a.top, workers=a.workers), env)
            print(f"## {n}: {r['wall_ms_per_step']:.0f} ms/step under cProfile, {steps} steps, top {a.top} by tottime")
            print(r["text"].rstrip() + "\n")
        return

    mallocs = ["reuse", "default"] if a.malloc == "both" else [a.malloc]
    runs = {(n, m): [] for n in names for m in mallocs}
    for rnd in range(a.rounds):
        for n, m in runs:  # interleaved: S M S M ...
            steps = a.steps or common.DEFAULT_STEPS[n]
            warmup = common.DEFAULT_WARMUP[n] if a.warmup is None else a.warmup
            common.progress(f"round {rnd + 1}/{a.rounds}: {n}, malloc {m} ({warmup} warm-up + {steps} timed steps) ...")
            runs[n, m].append(common.run_in_subprocess(
                "bench_train:train_child",
                dict(config=n, steps=steps, warmup=warmup, fwd_split=not a.no_fwd_split,
                     workers=a.workers, reuse_memory=m == "reuse"), env))
    summaries = [summarize(n, runs[n, m], m) for n, m in runs]
    title = (f"tinygen training step (fwd+bwd = train.accumulate_grads over the worker threads; opt = norm + AdamW with the clipping inside), "
             f"medians over {a.rounds} interleaved processes per config; MFU vs numpy matmul peak of the same dtype; "
             f"1-min load average before the run: {machine['loadavg_1min']:.2f}")
    common.print_report(title, table(summaries),
                        {"benchmark": "bench_train", "machine": machine, "results": summaries})


if __name__ == "__main__":
    main()
