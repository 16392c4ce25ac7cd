"""Decode speed of tinygen: per-token time with and without the KV cache, by prompt length.

    python benchmarks/bench_decode.py                     # S and M, 2 rounds
    python benchmarks/bench_decode.py --configs S --rounds 3 --threads 1
    python benchmarks/bench_decode.py --configs L --prompt-lengths 16,256,768 --rounds 1

For each prompt length T the model first reads the prompt (prefill, timed
apart), then generates --new-tokens tokens greedily at batch 1; the table
shows the median time per new token. With the cache a token costs O(T C)
(one position through every layer, attention over T cached keys), so the
column stays nearly flat as T grows; without it every token recomputes the
whole window, O(T^2 C + T C^2), and the column grows with T.

Configs S and M of ../shared/ANCHORS.md with block_size 256 and L (GPT-2
small) with its 1024 (as in compare_hf.py), float32. Each (config, cache on/off) runs in its own process,
interleaved on/off/on/off; medians over rounds.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path too)
from compare_hf import DECODE_CONFIGS, prompt_ids  # noqa: E402

PROMPT_LENGTHS = (16, 64, 128, 192)


def decode_child(config: str, use_cache: bool, new_tokens: int, prompt_lengths: list) -> dict:
    """{T: (prefill ms, median ms per new token)} for greedy decoding at batch 1."""
    import numpy as np

    from tinygen.kv_decoding import Decoder
    from tinygen.gpt import GPT

    cfg = DECODE_CONFIGS[config]
    model = GPT(common.gpt_config(cfg), seed=0)
    out = {}
    for T in [prompt_lengths[0]] + list(prompt_lengths):  # the first, again, is a warm-up
        ids = np.zeros((1, T + new_tokens), dtype=np.int64)
        ids[:, :T] = prompt_ids(cfg, T)
        decoder = Decoder(model, 1, use_cache=use_cache)
        t0 = time.perf_counter()
        ids[:, T] = np.argmax(decoder.next_logits(ids, T), axis=-1)
        prefill = time.perf_counter() - t0
        steps = []
        for n in range(T + 1, T + new_tokens):
            t0 = time.perf_counter()
            ids[:, n] = np.argmax(decoder.next_logits(ids, n), axis=-1)
            steps.append(time.perf_counter() - t0)
        out[str(T)] = {"prefill_ms": prefill * 1e3, "ms_per_token": common.median(steps) * 1e3}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="S,M", help="comma-separated: S, M, L (default: S,M)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved on/off process pairs (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt length (default: 32)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: as the machine has)")
    parser.add_argument("--prompt-lengths", default=",".join(map(str, PROMPT_LENGTHS)),
                        help=f"comma-separated (default: {','.join(map(str, PROMPT_LENGTHS))})")
    args = parser.parse_args(argv)
    lengths = [int(t) for t in args.prompt_lengths.split(",")]
    env = common.thread_env(args.threads)
    rows, record = [], {"machine": common.machine_info(), "threads": args.threads, "configs": {}}
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if name not in DECODE_CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {', '.join(DECODE_CONFIGS)}")
        block = DECODE_CONFIGS[name]["block_size"]
        if max(lengths) + args.new_tokens > block:
            raise SystemExit(f"prompt length + --new-tokens must fit in {name}'s block_size {block} (no sliding here)")
        runs = {True: [], False: []}
        for r in range(args.rounds):
            for use_cache in (True, False):
                common.progress(f"{name} cache={'on' if use_cache else 'off'} round {r + 1}/{args.rounds}")
                runs[use_cache].append(common.run_in_subprocess(
                    "bench_decode:decode_child",
                    {"config": name, "use_cache": use_cache, "new_tokens": args.new_tokens, "prompt_lengths": lengths},
                    env))
        record["configs"][name] = {"cache_on": runs[True], "cache_off": runs[False]}
        for T in map(str, lengths):
            on = common.median([run[T]["ms_per_token"] for run in runs[True]])
            off = common.median([run[T]["ms_per_token"] for run in runs[False]])
            prefill = common.median([run[T]["prefill_ms"] for run in runs[True]])
            rows.append([name, T, common.fmt(prefill, ".2f"), common.fmt(on, ".3f"), common.fmt(1e3 / on, ".0f"),
                         common.fmt(off, ".3f"), common.fmt(1e3 / off, ".0f"), f"{off / on:.1f}x"])
    title = (f"Greedy decode at batch 1: median ms per new token ({args.new_tokens} tokens after each prompt), "
             f"threads={args.threads or 'default'}, {args.rounds} round(s)")
    table = common.format_table(["config", "prompt T", "prefill ms", "cache ms/tok", "cache tok/s",
                                 "no-cache ms/tok", "no-cache tok/s", "cache speed-up"], rows)
    common.print_report(title, table, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
