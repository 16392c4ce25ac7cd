"""Next-token, fill-in-the-middle and masked language modelling, side by side, measured.

    python benchmarks/objectives.py --out /tmp/objectives --steps 600   # docs/objectives.md's numbers
    python benchmarks/objectives.py --out /tmp/objectives --steps 60 --preset tiny --examples 40   # a smoke run

Three models of one shape (the `small` preset: 4 layers, width 128, context
128) on one corpus (the built-in corpus minus every standard-library module
held out by tinygen.finetuning.tasks, as the demo pretrains) with one
tokenizer (trained here once, with <|fim_prefix|>, <|fim_middle|>,
<|fim_suffix|>, <|mask|> and <|endoftext|>, so every number below is per
token of the same tokens):

    fim0    next-token prediction                          --fim-rate 0
    fim50   next-token prediction, half the documents FIM  --fim-rate 0.5
    mlm     masked language modelling                      --objective mlm

They train interleaved, a quarter of the steps each in turn (resuming,
which reproduces an uninterrupted run bit for bit), so a busy spell of the
shared machine slows all three alike; each is a `tinygen pretrain` run
directory in OUT (a run already at --steps is reused). Then, on functions of
the test-split modules (never seen in pretraining):

  infilling   a function cut around 1-3 whole lines of its body (the middle):
              the loss of the middle's tokens given prefix and suffix (PSM,
              SPM), and given the prefix alone (left to right)
  left to     the loss of every token of the function from the ones before
  right       it (what FIM might cost)
  masked      15% of a function's tokens replaced by <|mask|>: the masked
              language model's loss there, beside the causal models' loss on
              the same tokens from the left context only

Every value is a mean per token with a bootstrap 95% interval over the
functions, and differences are paired (tinygen.finetuning.metrics). Prints
the tables docs/objectives.md quotes and writes OUT/objectives.json.
"""
import argparse
import ast
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinygen.checkpoint import checkpoint_step  # noqa: E402
from tinygen.fim import FIM_TOKENS, fim_ids, middle_losses  # noqa: E402
from tinygen.finetuning.metrics import LOSS, bootstrap, paired_bootstrap  # noqa: E402
from tinygen.finetuning.tasks import heldout_modules, module_split, stdlib_files  # noqa: E402
from tinygen.gpt import GPT  # noqa: E402
from tinygen.loss import IGNORE, token_losses  # noqa: E402
from tinygen.mlm import MASK, MASK_RATE  # noqa: E402
from tinygen.pretrain import gather, new_settings, pretrain, resume_settings  # noqa: E402
from tinygen.data import text_slice  # noqa: E402
from tinygen.tokenizer.tokenizer import ENDOFTEXT, Tokenizer  # noqa: E402

RUNS = {"fim0": {"fim_rate": 0.0}, "fim50": {"fim_rate": 0.5}, "mlm": {"objective": "mlm"}}
SPECIALS = list(FIM_TOKENS) + [MASK, ENDOFTEXT]  # <|endoftext|> last: its id is vocab_size - 1


def say(message):
    print(message, file=sys.stderr, flush=True)


def base_overrides(args) -> dict:
    return {"max_steps": args.steps, "workers": args.workers, "exclude_modules": ",".join(sorted(heldout_modules())),
            "checkpoint_interval": max(1, args.steps // 4), "eval_interval": max(1, args.steps // 4)}


def shared_tokenizer(args) -> str:
    """OUT/tokenizer.json: BPE on the training split's first tokenizer_bytes, with every objective's tokens."""
    path = os.path.join(args.out, "tokenizer.json")
    if os.path.isfile(path):
        return path
    settings = new_settings(os.path.join(args.out, "fim0"), preset=args.preset, overrides=base_overrides(args))
    train_docs, _ = gather(settings, say)
    texts = text_slice(train_docs, settings.data.tokenizer_bytes)
    say(f"tokenizer: BPE to {settings.train.vocab_size} tokens, specials {SPECIALS}")
    tok = Tokenizer.train(texts, settings.train.vocab_size, pattern=settings.data.pattern, special_tokens=SPECIALS)
    os.makedirs(args.out, exist_ok=True)
    tok.save(path)
    return path


def train_runs(args, tokenizer_path) -> dict:
    """The three runs, interleaved in quarters of --steps; {name: training seconds}."""
    seconds = {name: 0.0 for name in RUNS}
    quarters = sorted({max(1, round(args.steps * k / 4)) for k in range(1, 5)})
    for target in quarters:
        for name, extra in RUNS.items():
            run_dir = os.path.join(args.out, name)
            done = checkpoint_step(run_dir) if os.path.isdir(run_dir) else None
            if done is not None and done >= target:
                continue
            if done is None:
                overrides = {**base_overrides(args), **extra, "max_steps": target, "lr_decay_steps": args.steps}
                settings = new_settings(run_dir, preset=args.preset, overrides=overrides, tokenizer=tokenizer_path)
            else:
                settings = resume_settings(run_dir, max_steps=target)
            say(f"{name}: steps {done or 0} -> {target} in {run_dir}")
            t = time.perf_counter()
            pretrain(settings, resume=done is not None, overwrite=done is None, progress=False, say=say)
            seconds[name] += time.perf_counter() - t
    return {k: round(v, 1) for k, v in seconds.items()}


# ------------------------------------------------------------------ held-out functions
def held_out_functions(n, max_chars, seed) -> list:
    """Up to n function sources (def line to last line, dedented) of test-split modules, in a seeded order."""
    found = []
    for module, path in stdlib_files():
        if module_split(module) != "test":
            continue
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) >= 2:
                body_first = node.body[0].lineno - node.lineno  # index of the first body line in the function
                text = lines[node.lineno - 1:node.end_lineno]
                indent = len(text[0]) - len(text[0].lstrip())
                text = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in text]
                if body_first >= 1 and len(text) - body_first >= 3 and sum(map(len, text)) <= max_chars:
                    found.append((text, body_first))
    order = np.random.default_rng(seed).permutation(len(found))
    return [found[i] for i in order[:n]]


def infill_triples(functions, tok, block_size, seed) -> list:
    """(prefix, middle, suffix) token ids: 1-3 whole body lines as the middle; prefix and suffix
    trimmed at their far ends so PSM with its sentinels and end-of-text fits block_size."""
    rng = np.random.default_rng(seed)
    triples = []
    for lines, body_first in functions:
        start = int(rng.integers(body_first, len(lines)))
        stop = min(len(lines), start + int(rng.integers(1, 4)))
        prefix = "\n".join(lines[:start]) + "\n"
        middle = "\n".join(lines[start:stop]) + "\n"
        suffix = "\n".join(lines[stop:]) + ("\n" if stop < len(lines) else "")
        p, m, s = (tok.encode_ordinary(x) for x in (prefix, middle, suffix))
        room = block_size - 4 - len(m)  # three sentinels and end-of-text
        if room < 8 or not m:
            continue
        keep_s = min(len(s), room // 2)
        keep_p = min(len(p), room - keep_s)
        keep_s = min(len(s), room - keep_p)
        triples.append((p[len(p) - keep_p:], m, s[:keep_s]))
    return triples


def whole_function_losses(model, functions, tok, block_size) -> np.ndarray:
    """(n, 2): each function's tokens (the first block_size + 1) scored left to right."""
    out = np.zeros((len(functions), 2))
    for i, (lines, _) in enumerate(functions):
        ids = tok.encode_ordinary("\n".join(lines) + "\n")[:block_size + 1]
        x, y = np.array([ids[:-1]]), np.array([ids[1:]])
        nll = token_losses(model.forward(x), y)
        out[i] = nll.sum(), y.size
    return out


def masked_positions(functions, tok, block_size, seed) -> list:
    """(ids, chosen positions) per function: 15% of its first block_size tokens (never position 0,
    which a causal model cannot predict), all to be replaced by <|mask|>."""
    rng = np.random.default_rng(seed)
    out = []
    for lines, _ in functions:
        ids = tok.encode_ordinary("\n".join(lines) + "\n")[:block_size]
        k = max(1, round(MASK_RATE * (len(ids) - 1)))
        out.append((ids, np.sort(rng.choice(np.arange(1, len(ids)), size=k, replace=False))))
    return out


def masked_losses(model, masked, mask_id) -> np.ndarray:
    """(n, 2) at the chosen positions: a masked language model sees the text with those tokens masked;
    a causal one the original text to their left (logits at t - 1 predict the token at t)."""
    out = np.zeros((len(masked), 2))
    for i, (ids, chosen) in enumerate(masked):
        ids = np.array(ids)
        if model.config.causal:
            y = np.full(len(ids) - 1, IGNORE)
            y[chosen - 1] = ids[chosen]
            nll = token_losses(model.forward(ids[None, :-1]), y[None])
        else:
            x = ids.copy()
            x[chosen] = mask_id
            y = np.full(len(ids), IGNORE)
            y[chosen] = ids[chosen]
            nll = token_losses(model.forward(x[None]), y[None])
        out[i] = nll.sum(), len(chosen)
    return out


# ------------------------------------------------------------------ report
def interval(stats) -> list:
    iv = bootstrap(LOSS, stats)["val_loss"]
    return [round(iv.value, 3), round(iv.low, 3), round(iv.high, 3)]


def difference(a, b) -> list:
    d = paired_bootstrap(LOSS, a, b)["val_loss"]
    return [round(d.value, 3), round(d.low, 3), round(d.high, 3)]


def fmt(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the tokenizer, the three runs and objectives.json")
    parser.add_argument("--steps", type=int, default=1000, help="pretraining steps of each run (default: 1000)")
    parser.add_argument("--preset", default="small", help="tinygen pretrain preset for the shape (default: small)")
    parser.add_argument("--examples", type=int, default=400, help="held-out functions (default: 400)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the functions, cuts and masks (default: 0)")
    parser.add_argument("--workers", type=int, default=0, help="worker threads per run (default: 0, one per core)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    tokenizer_path = shared_tokenizer(args)
    seconds = train_runs(args, tokenizer_path)
    tok = Tokenizer.load(tokenizer_path)
    models = {name: GPT.from_pretrained(os.path.join(args.out, name)) for name in RUNS}
    block = models["fim0"].config.block_size
    functions = held_out_functions(args.examples, max_chars=4 * block * 3, seed=args.seed)
    triples = infill_triples(functions, tok, block, args.seed)
    ids, eot = fim_ids(tok), tok.eot_id
    say(f"evaluating on {len(functions)} held-out functions ({len(triples)} infilling examples)")
    stats = {}
    for name in ("fim0", "fim50"):
        model = models[name]
        for mode in ("psm", "spm", "prefix"):
            stats[f"{name}.infill_{mode}"] = middle_losses(model, triples, ids, eot, mode)
        stats[f"{name}.left_to_right"] = whole_function_losses(model, functions, tok, block)
    masked = masked_positions(functions, tok, block, args.seed)
    for name in RUNS:
        stats[f"{name}.masked"] = masked_losses(models[name], masked, tok.special_tokens[MASK])
    metrics = {name: [json.loads(line) for line in open(os.path.join(args.out, name, "metrics.jsonl"))]
               for name in RUNS}
    val = {name: [r["val_loss"] for r in rows if r.get("val_loss") is not None][-1] for name, rows in metrics.items()}
    result = {
        "conditions": {"steps": args.steps, "preset": args.preset, "workers": args.workers, "functions": len(functions),
                       "infill_examples": len(triples), "seed": args.seed, "block_size": block,
                       "vocab_size": tok.vocab_size, "train_seconds": seconds,
                       "elapsed_s": round(time.perf_counter() - t0, 1)},
        "val_loss": val,
        "scores": {k: interval(v) for k, v in stats.items()},
        "differences": {
            "infill_psm fim50 - fim0": difference(stats["fim50.infill_psm"], stats["fim0.infill_psm"]),
            "infill fim50 psm - fim50 prefix": difference(stats["fim50.infill_psm"], stats["fim50.infill_prefix"]),
            "infill fim50 spm - fim50 psm": difference(stats["fim50.infill_spm"], stats["fim50.infill_psm"]),
            "infill_prefix fim50 - fim0": difference(stats["fim50.infill_prefix"], stats["fim0.infill_prefix"]),
            "left_to_right fim50 - fim0": difference(stats["fim50.left_to_right"], stats["fim0.left_to_right"]),
            "masked mlm - fim0": difference(stats["mlm.masked"], stats["fim0.masked"]),
        },
    }
    with open(os.path.join(args.out, "objectives.json"), "w") as f:
        json.dump(result, f, indent=1)
    s = result["scores"]
    print(f"{len(functions)} held-out functions, {len(triples)} infilling examples; mean loss per token (nats) "
          "[bootstrap 95% interval]")
    print(f"{'':34} {'fim0 (R = 0)':>26} {'fim50 (R = 0.5)':>26}")
    for key, label in (("infill_psm", "middle | prefix + suffix (PSM)"), ("infill_spm", "middle | prefix + suffix (SPM)"),
                       ("infill_prefix", "middle | prefix only"), ("left_to_right", "whole function, left to right")):
        print(f"{label:34} {fmt(s['fim0.' + key]):>26} {fmt(s['fim50.' + key]):>26}")
    print(f"{'validation loss (plain windows)':34} {val['fim0']:>26.3f} {val['fim50']:>26.3f}")
    print(f"masked tokens (15%): mlm {fmt(s['mlm.masked'])}, fim0 from the left {fmt(s['fim0.masked'])}, "
          f"fim50 from the left {fmt(s['fim50.masked'])}; mlm validation (masked tokens) {val['mlm']:.3f}")
    print("paired differences:")
    for k, v in result["differences"].items():
        print(f"  {k:36} {fmt(v)}")
    print(f"conditions: {json.dumps(result['conditions'])}")


if __name__ == "__main__":
    main()
