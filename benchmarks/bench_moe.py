"""Mixture of experts against the dense model: the same active parameters per token, more in total.

    python benchmarks/bench_moe.py                          # step time, then the training comparison
    python benchmarks/bench_moe.py --skip-training          # step time only (about a minute)
    python benchmarks/bench_moe.py --train-steps 1600 --chunk 200 --out runs/bench-moe

The models, all the `small` preset's shape (V 2048, T 128, L 4, H 4, C 128, batch 16):

    dense      GPT-2, 4 dense MLPs
    moe-top1   8 experts in blocks 1 and 3, each token routed to 1 (Switch's k): per token
               exactly the dense model's parameters and FLOPs, plus a router (C x 8)
    moe-top2   the same with GLaM's k = 2: two experts per token, so blocks 1 and 3 run
               twice the MLP (more active parameters than dense; shown for GLaM's setting)

Part 1, step time. Each model's training step (train.accumulate_grads on the worker
threads + clip + AdamW, on one fixed batch) runs in its own process; processes run
interleaved (dense, top1, top2, dense, ...) for --rounds rounds, and each MoE/dense
ratio is taken within a round, so the machine's load at that moment cancels.

Part 2, training. `tinygen pretrain` (the small preset on the built-in corpus, same seed,
so the same batches: the same tokens) trains each model for --train-steps, in chunks of
--chunk steps that alternate between the models through `--resume` (resuming is
bit-exact, so chunking changes nothing in the result; it spreads the machine's load
over the models). Reports validation loss (the language-model loss), tokens/s (median
step), parameters (total, active per token) and the expert load at the end.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path too)

SMALL = dict(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128, batch_size=16)
MODELS = {
    "dense": dict(n_expert=0),
    "moe-top1": dict(n_expert=8, expert_top_k=1, moe_every=2),
    "moe-top2": dict(n_expert=8, expert_top_k=2, moe_every=2),
}


def model_config(name: str):
    from tinygen.config import GPTConfig

    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
    return GPTConfig(**{k: SMALL[k] for k in keys}, **MODELS[name])


def param_counts(name: str) -> tuple:
    """(total, active per token) parameters of a model."""
    from tinygen.gpt import GPT
    from tinygen.moe import active_params

    config = model_config(name)
    params = GPT(config, seed=0).params
    return sum(p.size for p in params.values()), active_params(params, config.expert_top_k if config.n_expert else 1)


# ------------------------------------------------------------------ part 1: step time
def step_child(name: str, steps: int, warmup: int, seed: int = 0) -> dict:
    """Runs in a child process: `warmup` untimed then `steps` timed training steps; ms per step."""
    import numpy as np

    from tinygen.gpt import GPT
    from tinygen.optim import AdamW, clip_coef
    from tinygen.plumbing.memory import reuse_freed_memory
    from tinygen.plumbing.parallel import Workers, default_workers
    from tinygen.train import TrainConfig, accumulate_grads

    reuse_freed_memory()
    config = model_config(name)
    model = GPT(config, seed)
    B, T = SMALL["batch_size"], SMALL["block_size"]
    data = np.random.default_rng(seed + 1).integers(0, config.vocab_size, size=(B, T + 1))
    batch = (data[:, :-1].copy(), data[:, 1:].copy())
    samples = []
    with Workers(default_workers(B)) as workers:
        train_config = TrainConfig(vocab_size=config.vocab_size, block_size=T, n_layer=config.n_layer,
                                   n_head=config.n_head, n_embd=config.n_embd, batch_size=B, seed=seed,
                                   workers=workers.n)
        opt = AdamW(model.params, lr=common.LR, betas=common.BETAS, weight_decay=common.WEIGHT_DECAY,
                    workers=workers)
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            accumulate_grads(model, opt, batch, workers=workers, config=train_config, step=i)
            t1 = time.perf_counter()
            opt.step(lr=common.LR, grad_scale=clip_coef(opt.grad_norm(), common.CLIP))  # as train's loop
            if i >= warmup:
                samples.append(((time.perf_counter() - t0) * 1e3, (t1 - t0) * 1e3))
    step_ms = common.median([s for s, _ in samples])
    return {"model": name, "step_ms": step_ms, "fwdbwd_ms": common.median([f for _, f in samples]),
            "samples_ms": samples, "tokens_per_s": B * T / (step_ms / 1e3)}


def time_steps(names, rounds, steps, warmup) -> dict:
    runs = {n: [] for n in names}
    for r in range(rounds):
        for n in names:
            common.progress(f"step time, round {r + 1}/{rounds}: {n} ({warmup} warm-up + {steps} timed steps)")
            runs[n].append(common.run_in_subprocess("bench_moe:step_child", dict(name=n, steps=steps, warmup=warmup)))
    out = {}
    for n in names:
        out[n] = {"tokens_per_s": common.median([run["tokens_per_s"] for run in runs[n]])}
        for key in ("step_ms", "fwdbwd_ms"):
            values = [run[key] for run in runs[n]]
            ratios = [a[key] / d[key] for a, d in zip(runs[n], runs["dense"])]  # within a round
            out[n].update({key: common.median(values), key + "_spread": common.spread(values),
                           key + "_ratio": common.median(ratios), key + "_ratio_range": [min(ratios), max(ratios)]})
    return out


# ------------------------------------------------------------------ part 2: training
def pretrain(args: list):
    """`python -m tinygen pretrain ARGS`; raises with its stderr on failure."""
    proc = subprocess.run([sys.executable, "-m", "tinygen", "pretrain", *args], capture_output=True, text=True,
                          cwd=common.REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"tinygen pretrain {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def train_models(names, out_dir, total_steps, chunk) -> dict:
    """Train every model to total_steps in alternating chunks; return each run's metrics rows."""
    dirs = {n: os.path.join(out_dir, n) for n in names}
    done = 0
    while done < total_steps:
        target = min(done + chunk, total_steps)
        for n in names:
            common.progress(f"training {n}: steps {done} -> {target}")
            if done == 0:
                flags = [f"--{k.replace('_', '-')}={v}" for k, v in MODELS[n].items()]
                pretrain(["--preset", "small", "--out", dirs[n], "--overwrite", "--samples", "0",
                          "--max-steps", str(target), "--lr-decay-steps", str(total_steps), *flags])
            else:
                pretrain(["--resume", dirs[n], "--max-steps", str(target), "--samples", "0"])
        done = target
    return {n: [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for n, d in dirs.items()}


def val_at_time(rows, seconds):
    """The validation loss at elapsed training time `seconds`, linear between measurements
    (None when the run had not reached its first measurement after step 0 by then)."""
    points = [(r["elapsed_s"], r["val_loss"]) for r in rows if r.get("val_loss") is not None and r["step"] > 0]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / (t1 - t0)
    return points[-1][1] if points and seconds >= points[-1][0] else None


def summarize_training(rows: dict) -> dict:
    out = {}
    dense_time = rows["dense"][-1]["elapsed_s"] if "dense" in rows else None
    for n, r in rows.items():
        last = r[-1]
        vals = [x for x in r if x.get("val_loss") is not None]
        loads = last.get("expert_load") or {}
        out[n] = {
            "steps": last["step"], "tokens": last["tokens"], "val_loss": vals[-1]["val_loss"],
            "elapsed_s": last["elapsed_s"],
            "tokens_per_s": common.median([x["tokens_per_sec"] for x in r if x.get("tokens_per_sec")]),
            "val_loss_at_dense_time": val_at_time(r, dense_time) if dense_time else None,
            "aux_loss": last.get("aux_loss"),
            "expert_load": loads,
            "max_load_times_E": {b: max(v) * len(v) for b, v in loads.items()},
        }
    return out


# ------------------------------------------------------------------ report
def report(names, steps, training, machine, load_after):
    headers = ["model", "params total", "active / token", "step ms", "step / dense (range)", "fwd+bwd ms",
               "fwd+bwd / dense (range)", "tokens/s (step)"]
    if training:
        headers += ["val loss", "val loss at dense's time", "train tokens/s", "max expert share x E"]
    rows = []
    for n in names:
        total, active = param_counts(n)
        s = steps[n]
        row = [n, f"{total:,}", f"{active:,}"]
        for key in ("step_ms", "fwdbwd_ms"):
            low, high = s[key + "_ratio_range"]
            row += [common.fmt(s[key]), f"{s[key + '_ratio']:.2f} ({low:.2f}-{high:.2f})"]
        row.append(common.fmt(s["tokens_per_s"], ",.0f"))
        if training and n not in training:
            row += ["-"] * 4
        elif training:
            t = training[n]
            shares = ", ".join(f"{b} {v:.2f}" for b, v in t["max_load_times_E"].items()) or "-"
            row += [f"{t['val_loss']:.4f}", common.fmt(t["val_loss_at_dense_time"], ".4f"),
                    common.fmt(t["tokens_per_s"], ",.0f"), shares]
        rows.append(row)
    title = (f"MoE vs dense, small preset shape; step time: medians of interleaved processes, ratios within a round; "
             f"1-min load average {machine['loadavg_1min']:.2f} before, {load_after:.2f} after")
    common.print_report(title, common.format_table(headers, rows),
                        {"benchmark": "bench_moe", "machine": machine, "step_time": steps, "training": training})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--rounds", type=int, default=3, help="interleaved processes per model for the step time")
    p.add_argument("--steps", type=int, default=15, help="timed steps per process (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--skip-training", action="store_true", help="step time only")
    p.add_argument("--train-models", default="dense,moe-top1", help="models to train (default dense,moe-top1)")
    p.add_argument("--train-steps", type=int, default=1600, help="training steps per model (default 1600, the preset)")
    p.add_argument("--chunk", type=int, default=200, help="steps per alternating chunk (default 200)")
    p.add_argument("--out", default=None, help="directory for the run directories (default: a temporary one)")
    a = p.parse_args(argv)
    names = [n for n in a.models.split(",") if n]
    if "dense" not in names or any(n not in MODELS for n in names):
        raise SystemExit(f"--models must include dense and name only {', '.join(MODELS)}")
    machine = common.machine_info()
    steps = time_steps(names, a.rounds, a.steps, a.warmup)
    training = None
    if not a.skip_training:
        train_names = [n for n in a.train_models.split(",") if n]
        if "dense" not in train_names or not set(train_names) <= set(names):
            raise SystemExit("--train-models must include dense and be among --models")
        with tempfile.TemporaryDirectory() as tmp:
            rows = train_models(train_names, a.out or tmp, a.train_steps, a.chunk)
        training = summarize_training(rows)
    report(names, steps, training, machine, os.getloadavg()[0])


if __name__ == "__main__":
    main()
