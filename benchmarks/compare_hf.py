"""tinygen's decoding vs Hugging Face transformers' `generate`, same weights, interleaved.

    pip install transformers torch==2.13.0     # for this benchmark only, never tinygen dependencies
    python benchmarks/compare_hf.py                       # S and M, 3 rounds, 2 threads
    python benchmarks/compare_hf.py --configs L --rounds 3   # GPT-2 small (124M), ~2 min a round
    python benchmarks/compare_hf.py --rounds 5 --threads 1

The measurement of ../shared/ANCHORS.md: greedy, batch 1, a 16-token prompt,
200 new tokens, KV cache on, the whole `generate` call timed (prefill
included). Configs S and M with block_size 256, so that all 216 positions fit
in GPT-2's position table without sliding (transformers cannot slide); L is
GPT-2 small as released, context 1024 (random weights, no download).

Memory bandwidth, same run: at batch 1 every token reads every weight once
(M 46 MB, L 495 MB), so M and L are bound by how fast memory is read. Each
tinygen process, right after its timed calls, measures its read bandwidth
(common.read_bandwidth: a.sum() over 512 MiB, and a GEMV over a 768 x 50257
matrix); the table prints achieved GB/s = weight bytes per token x tokens/s
and its fraction of each probe. A fraction near 1 is the machine's limit.

A tinygen model (seed 0) is saved with `save_pretrained` and loaded by
`GPT2LMHeadModel.from_pretrained`, so both hold the same float32 weights; the
greedy tokens of both are compared (they should match: same weights, same
function, only float rounding differs). EOS is disabled on the transformers
side so both generate exactly 200 tokens. Each side runs in its own process,
interleaved (tinygen, transformers, tinygen, ...) with the same thread count
(OPENBLAS/OMP_NUM_THREADS and torch.set_num_threads); the table shows medians
over rounds and the median of the per-round ratios.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path too)

DECODE_CONFIGS = {  # ANCHORS.md's S and M architectures; block 256 fits 16 + 200 positions
    name: {**common.CONFIGS[name], "block_size": 256, "batch_size": 1} for name in ("S", "M")
}
DECODE_CONFIGS["L"] = {**common.CONFIGS["L"], "block_size": 1024, "batch_size": 1}  # GPT-2 small's context
DEFAULT_REPS = {"S": 3, "M": 3, "L": 2}  # timed generate calls per process (an L call is ~5-10 s)
PROMPT_LEN, NEW_TOKENS = 16, 200


def prompt_ids(cfg, length=PROMPT_LEN, seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (1, length))


def tinygen_child(config: str, reps: int, threads: int, probe: bool = True) -> dict:
    """tokens/s of tinygen.sampling.generate, greedy, cache on: median of `reps` calls;
    then (probe) this process's read bandwidth, common.read_bandwidth."""
    from tinygen.gpt import GPT
    from tinygen.sampling import generate

    cfg = DECODE_CONFIGS[config]
    model = GPT(common.gpt_config(cfg), seed=0)
    prompt = prompt_ids(cfg)
    generate(model, prompt, 8, temperature=0)  # warm-up: first calls, page faults
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = generate(model, prompt, NEW_TOKENS, temperature=0)
        times.append(time.perf_counter() - t0)
    result = {"tokens_per_s": NEW_TOKENS / common.median(times), "ids": out[0, PROMPT_LEN:].tolist()}
    if probe:
        del model  # the probe's 512 MiB + 154 MB come after, not on top of, the model
        result["peak_rss_mib"] = common.peak_rss_mib()
        result["bandwidth"] = common.read_bandwidth()
    return result


def hf_child(config: str, reps: int, threads: int) -> dict:
    """tokens/s of GPT2LMHeadModel.generate on the same weights, greedy, cache on."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    from tinygen.gpt import GPT

    logging.set_verbosity_error()
    torch.set_num_threads(threads)
    cfg = DECODE_CONFIGS[config]
    with tempfile.TemporaryDirectory() as tmp:
        GPT(common.gpt_config(cfg), seed=0).save_pretrained(tmp)
        model = GPT2LMHeadModel.from_pretrained(tmp).eval()  # float32, as saved
    model.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS, as tinygen does
    model.generation_config.pad_token_id = 0
    prompt = torch.from_numpy(prompt_ids(cfg))
    options = dict(do_sample=False, use_cache=True, num_beams=1)
    times = []
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, **options)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options)
            times.append(time.perf_counter() - t0)
    return {"tokens_per_s": NEW_TOKENS / common.median(times), "ids": out[0, PROMPT_LEN:].tolist(),
            "torch_threads": torch.get_num_threads()}


def first_mismatch(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="S,M", help="comma-separated: S, M, L (default: S,M)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved process pairs per config (default: 3)")
    parser.add_argument("--reps", type=int, default=None, help="timed generate calls per process (default: S, M 3; L 2)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS / torch threads on both sides (default: 2)")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("compare_hf: needs `pip install transformers torch==2.13.0` (benchmark only)", file=sys.stderr)
        return 2
    env = common.thread_env(args.threads)
    rows, record = [], {"machine": common.machine_info(), "threads": args.threads, "configs": {}}
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if name not in DECODE_CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {', '.join(DECODE_CONFIGS)}")
        reps = args.reps or DEFAULT_REPS[name]
        ours, theirs, ratios, achieved, sum_bw, gemv_bw, fractions = [], [], [], [], [], [], []
        weight_bytes = common.weight_bytes_per_token(DECODE_CONFIGS[name])
        for r in range(args.rounds):
            common.progress(f"{name} round {r + 1}/{args.rounds}")
            a = common.run_in_subprocess("compare_hf:tinygen_child", {"config": name, "reps": reps, "threads": args.threads}, env)
            b = common.run_in_subprocess("compare_hf:hf_child", {"config": name, "reps": reps, "threads": args.threads}, env)
            ours.append(a["tokens_per_s"])
            theirs.append(b["tokens_per_s"])
            ratios.append(a["tokens_per_s"] / b["tokens_per_s"])
            achieved.append(weight_bytes * a["tokens_per_s"] / 1e9)  # GB/s of weights read while decoding
            sum_bw.append(a["bandwidth"]["sum_gb_s"])
            gemv_bw.append(a["bandwidth"]["gemv_gb_s"])
            fractions.append(achieved[-1] / max(sum_bw[-1], gemv_bw[-1]))  # of this process's own probe
        mismatch = first_mismatch(a["ids"], b["ids"])
        same = "all 200" if mismatch is None else f"first {mismatch}"
        med = common.median
        rows.append([name, common.fmt(med(ours), ".0f"), common.fmt(med(theirs), ".0f"),
                     f"{med(ratios):.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}x", same,
                     f"{weight_bytes / 1e6:.0f}", common.fmt(med(achieved), ".1f"), common.fmt(med(sum_bw), ".1f"),
                     common.fmt(med(gemv_bw), ".1f"), common.pct(med(fractions)),
                     common.fmt(max(med(sum_bw), med(gemv_bw)) * 1e9 / weight_bytes, ".0f")])
        record["configs"][name] = {"tinygen_tok_s": ours, "hf_tok_s": theirs, "ratios": ratios,
                                   "greedy_tokens_equal": mismatch is None, "first_mismatch": mismatch,
                                   "weight_bytes_per_token": weight_bytes, "achieved_gb_s": achieved,
                                   "probe_sum_gb_s": sum_bw, "probe_gemv_gb_s": gemv_bw,
                                   "fraction_of_probe": fractions}
    title = (f"Greedy decode, batch 1, {PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens, KV cache, "
             f"{args.threads} thread(s); medians of {args.rounds} interleaved process pairs; achieved GB/s = "
             f"weight MB/token x tinygen tok/s, against the read bandwidth probed in the same tinygen processes "
             f"(fraction: of the larger probe, per process; limit tok/s = larger probe / weight bytes)")
    table = common.format_table(["config", "tinygen tok/s", "transformers tok/s", "ratio", "ratio range",
                                 "same greedy tokens", "weight MB/token", "achieved GB/s", "probe sum GB/s",
                                 "probe GEMV GB/s", "of probe", "limit tok/s"], rows)
    common.print_report(title, table, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
