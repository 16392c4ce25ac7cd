"""tinygen vs PyTorch eager on the same GPT-2 training step, interleaved.

    pip install torch==2.13.0          # CPU wheel; for this benchmark only, never a tinygen dependency
    python benchmarks/compare_torch.py                    # S and M, 3 rounds
    python benchmarks/compare_torch.py --sdpa --rounds 5  # + torch with F.scaled_dot_product_attention

The PyTorch model is nanoGPT's GPT (pre-LN, tanh GELU, tied LM head, biases,
LayerNorm eps 1e-5) with tinygen's initial parameters copied in (transposed
where torch's Linear stores (out, in)), so the two compute the same function:
the initial losses must agree to ~1e-5 and is checked. Both sides run the
same step: forward + loss, backward, clip_grad_norm(1.0), AdamW(lr 6e-4,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on parameters with >= 2 dims).

Processes run interleaved, tinygen, torch[, torch-sdpa], tinygen, torch ...,
each in its own process; ratios are medians of the per-round paired ratios.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path too)

LOSS_TOL = 1e-5  # |initial loss tinygen - torch| expected for float32


# ------------------------------------------------- the PyTorch model (child only)
def torch_gpt(cfg: dict, params: dict, sdpa: bool):
    """nanoGPT's GPT as a torch module, holding a copy of tinygen's `params`.

    Module names equal tinygen's parameter names (no `transformer.` prefix),
    so copying is a loop over keys.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    C, H, T, V, L = cfg["n_embd"], cfg["n_head"], cfg["block_size"], cfg["vocab_size"], cfg["n_layer"]

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C)
            self.c_proj = nn.Linear(C, C)
            self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T), persistent=False)

        def forward(self, x):
            B, Tx, _ = x.size()
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (a.view(B, Tx, H, C // H).transpose(1, 2) for a in (q, k, v))  # (B, H, T, D)
            if sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
                att = att.masked_fill(self.bias[:, :, :Tx, :Tx] == 0, float("-inf"))
                att = F.softmax(att, dim=-1)
                y = att @ v
            y = y.transpose(1, 2).contiguous().view(B, Tx, C)
            return self.c_proj(y)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(C, 4 * C)
            self.gelu = nn.GELU(approximate="tanh")
            self.c_proj = nn.Linear(4 * C, C)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(C, eps=1e-5), CausalSelfAttention()
            self.ln_2, self.mlp = nn.LayerNorm(C, eps=1e-5), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C, eps=1e-5)
            self.lm_head = nn.Linear(C, V, bias=False)
            self.lm_head.weight = self.wte.weight  # tied

        def forward(self, idx, targets):
            pos = torch.arange(idx.size(1), dtype=torch.long)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)

    model = GPT().to(dtype=getattr(torch, cfg["dtype"]))
    named = dict(model.named_parameters())
    assert set(named) == set(params), sorted(set(named) ^ set(params))
    with torch.no_grad():
        for name, p in named.items():
            a = params[name]
            linear = a.ndim == 2 and name not in ("wte.weight", "wpe.weight")
            p.copy_(torch.from_numpy(a.T.copy() if linear else a))  # Linear stores (out, in)
    return model


def torch_child(config: str, steps: int, warmup: int, seed: int = 0, threads: int = 2,
                sdpa: bool = False, peak_reps: int = 5) -> dict:
    """Runs in a child process: tinygen's initial params into torch, then timed steps."""
    import gc

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    cfg = common.config_by_name(config)
    from tinygen.model import init_params

    params = init_params(common.gpt_config(cfg), np.random.default_rng(seed))  # = GPT(config, seed).params
    model = torch_gpt(cfg, params, sdpa)
    del params
    idx, targets = (torch.from_numpy(a) for a in common.make_batch(cfg, seed))
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": common.WEIGHT_DECAY},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=common.LR, betas=common.BETAS, eps=common.EPS)
    rec = {k: [] for k in ("step", "fwdbwd", "fwd", "bwd", "clip", "adamw", "opt")}
    losses = []
    gc.collect()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(idx, targets)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), common.CLIP)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        losses.append(loss.item())
        if i >= warmup:
            for k, dt in (("fwd", t1 - t0), ("bwd", t2 - t1), ("fwdbwd", t2 - t0), ("clip", t3 - t2),
                          ("adamw", t4 - t3), ("opt", t4 - t2), ("step", t4 - t0)):
                rec[k].append(dt * 1e3)
    out = {"config": config, "side": "torch-sdpa" if sdpa else "torch", "losses": losses,
           "samples_ms": rec, "peak_rss_mib": common.peak_rss_mib(), "torch": torch.__version__}
    out.update({k + "_ms": common.median(v) for k, v in rec.items()})
    time.sleep(0.2)  # let torch's OpenMP threads go idle before the numpy probe
    out["peak"] = common.matmul_peak(reps=peak_reps, dtype=cfg["dtype"])
    return out


# ---------------------------------------------------------------- parent
def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def summarize(name: str, side: str, runs: list) -> dict:
    cfg = common.config_by_name(name)
    s = {"config": name, "side": side, "dtype": cfg["dtype"], "processes": len(runs)}
    for k in ("step", "fwdbwd", "fwd", "clip", "adamw", "opt"):
        s[k + "_ms"] = common.median([r.get(k + "_ms") for r in runs])
    s["bwd_ms"] = s["fwdbwd_ms"] - s["fwd_ms"] if s["fwd_ms"] is not None else None
    s["step_spread"] = common.spread([r["step_ms"] for r in runs])
    s["peak_rss_mib"] = common.median([r["peak_rss_mib"] for r in runs])
    flops = common.model_flops_per_step(cfg)
    s["tokens_per_s"] = common.tokens_per_step(cfg) / (s["step_ms"] / 1e3)
    s["achieved_gflops"] = flops / (s["step_ms"] / 1e3) / 1e9
    s["initial_loss"] = runs[0]["losses"][0]
    return s


def paired(a_runs, b_runs, key, invert=False):
    """Median and range over rounds of a/b (or b/a), pairing the processes of one round."""
    rs = [(b[key] / a[key]) if invert else (a[key] / b[key]) for a, b in zip(a_runs, b_runs)]
    return common.median(rs), min(rs), max(rs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="S,M", help="comma-separated, from S, M, L, S64 (default S,M)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default S 20, S64 10, M 5, L 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default S 3, S64 2, M 2, L 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; tinygen's --workers (each with a 1-thread BLAS) (default 2)")
    p.add_argument("--sdpa", action="store_true", help="also torch with F.scaled_dot_product_attention")
    p.add_argument("--no-fwd-split", action="store_true", help="skip tinygen's extra forward-only calls")
    a = p.parse_args(argv)
    if not torch_available():
        print("compare_torch: PyTorch is not installed here; `pip install torch==2.13.0` "
              "(CPU wheel, benchmark only) and run again.", file=sys.stderr)
        return 2
    names = common.parse_configs(a.configs)
    env = common.thread_env(a.threads)
    machine = common.machine_info()  # load average before we add ours
    sides = ["tinygen", "torch"] + (["torch-sdpa"] if a.sdpa else [])
    runs = {(n, s): [] for n in names for s in sides}
    for rnd in range(a.rounds):
        for n in names:
            steps = a.steps or common.DEFAULT_STEPS[n]
            warmup = common.DEFAULT_WARMUP[n] if a.warmup is None else a.warmup
            for side in sides:  # interleaved: tinygen, torch, tinygen, torch ...
                common.progress(f"round {rnd + 1}/{a.rounds}: {n} {side} ({warmup} warm-up + {steps} timed steps) ...")
                if side == "tinygen":
                    job = ("bench_train:train_child",
                           dict(config=n, steps=steps, warmup=warmup, fwd_split=not a.no_fwd_split,
                                workers=a.threads))  # the same cores: `threads` shards, 1 BLAS thread each
                else:
                    job = ("compare_torch:torch_child", dict(config=n, steps=steps, warmup=warmup,
                                                              threads=a.threads, sdpa=side == "torch-sdpa"))
                runs[n, side].append(common.run_in_subprocess(*job, env=env))

    summaries, ratios, rows, ratio_rows = [], [], [], []
    for n in names:
        peak = common.median([x for s in sides for r in runs[n, s] for x in r["peak"]["samples"]])
        tg = runs[n, "tinygen"]
        for side in sides:
            s = summarize(n, side, runs[n, side])
            s["matmul_peak_gflops"], s["mfu"] = peak, s["achieved_gflops"] / peak
            summaries.append(s)
            rows.append([n if s["dtype"] == "float32" else f"{n} ({s['dtype']})", side,
                         common.fmt(s["step_ms"]), common.pct(s["step_spread"]), common.fmt(s["fwd_ms"]),
                         common.fmt(s["bwd_ms"]), common.fmt(s["opt_ms"]), common.fmt(s["tokens_per_s"], ",.0f"),
                         common.pct(s["mfu"]), common.fmt(s["peak_rss_mib"], ".0f"), f"{s['initial_loss']:.6f}"])
        for side in sides[1:]:
            other = runs[n, side]
            tok = paired(tg, other, "step_ms", invert=True)  # tokens/s ratio = their ms / our ms
            fb = paired(tg, other, "fwdbwd_ms", invert=True)
            rss = paired(tg, other, "peak_rss_mib")
            dloss0 = abs(tg[0]["losses"][0] - other[0]["losses"][0])
            dloss = max(abs(x - y) for x, y in zip(tg[0]["losses"], other[0]["losses"]))
            ok = dloss0 <= (LOSS_TOL if common.config_by_name(n)["dtype"] == "float32" else 1e-9)
            ratios.append({"config": n, "vs": side, "tokens_per_s_ratio": tok[0], "tokens_per_s_ratio_range": tok[1:],
                           "fwdbwd_speed_ratio": fb[0], "fwdbwd_speed_ratio_range": fb[1:],
                           "peak_rss_ratio": rss[0], "initial_loss_absdiff": dloss0,
                           "max_loss_absdiff_all_steps": dloss, "initial_loss_ok": ok})
            ratio_rows.append([n, f"tinygen / {side}", f"{tok[0]:.2f} ({tok[1]:.2f}-{tok[2]:.2f})",
                               f"{fb[0]:.2f} ({fb[1]:.2f}-{fb[2]:.2f})", f"{rss[0]:.2f}",
                               f"{dloss0:.1e} {'ok' if ok else 'MISMATCH'}", f"{dloss:.1e}"])

    table = common.format_table(
        ["config", "impl", "ms/step", "spread", "fwd ms", "bwd ms", "clip+AdamW ms", "tokens/s", "MFU",
         "peak RSS MiB", "initial loss"], rows)
    table += "\n\n" + common.format_table(
        ["config", "ratio", "tokens/s (fwd+bwd+opt)", "fwd+bwd speed", "peak RSS", "|d initial loss|",
         f"max |d loss| over {len(tg[0]['losses'])} steps"], ratio_rows)
    title = (f"tinygen vs PyTorch {runs[names[0], 'torch'][0]['torch']} eager, {a.threads} threads, "
             f"{a.rounds} interleaved rounds, medians (ratio columns: median of per-round pairs, range in "
             f"parentheses; > 1 = tinygen faster / uses more memory); 1-min load average before the run: "
             f"{machine['loadavg_1min']:.2f}")
    common.print_report(title, table, {"benchmark": "compare_torch", "machine": machine,
                                       "threads": a.threads, "results": summaries, "ratios": ratios})
    return 1 if not all(r["initial_loss_ok"] for r in ratios) else 0


if __name__ == "__main__":
    sys.exit(main())
