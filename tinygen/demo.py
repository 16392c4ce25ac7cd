"""`tinygen demo`: the whole pipeline on built-in data, and whether pretraining paid off.

    1 tasks      the built-in ast tasks (tinygen.finetuning.tasks), split by module
    2 tokenizer  BPE trained on standard-library sources
    3 pretrain   a GPT-2 on those sources, minus every held-out module
    4 fine-tune  multi-task, from the pretrained model (full and LoRA) and
                 from a random initialisation (full); single-task on one task
    5 evaluate   per task on the test split: loss and exact-match accuracy;
                 the pretrained model few-shot (k solved examples in the prompt)
    6 report     OUT/report.md, OUT/report.json, loss curves as SVG

Every fine-tuning run uses the same data, steps and learning rate, so the
only difference between "pretrained_full" and "scratch_full" is the start.
The held-out modules are left out of pretraining too: test functions are
unseen by every stage.
"""
import dataclasses
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .data import Document, RandomBatches, builtin_corpus, fixed_batches, split_documents, text_slice, token_cache
from .finetuning.evaluate import evaluate_tasks, few_shot_examples, greedy_complete
from .plumbing.fileio import atomic_write_json, atomic_write_text
from .finetuning.finetune import FinetuneConfig, run as finetune
from .plumbing.metrics import read_metrics
from .gpt import GPT
from .plumbing.plot import loss_svg
from .plumbing.progress import Progress, format_duration
from .finetuning.tasks import TASKS, builtin_examples, encode_examples, heldout_modules
from .tokenizer.tokenizer import ENDOFTEXT, Tokenizer
from .train import TrainConfig, train


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults fit in 10 minutes on 2 cores."""

    vocab_size: int = 1024
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    corpus_bytes: int = 8_000_000
    tokenizer_bytes: int = 1_000_000
    pretrain_steps: int = 1800
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    finetune_steps: int = 250
    finetune_batch: int = 16
    full_lr: float = 1e-3
    lora_lr: float = 3e-3
    lora_rank: int = 8
    single_task: str = "name"
    few_shot_k: int = 2
    eval_examples: int = 200  # test examples per task for the loss
    accuracy_examples: int = 48  # of them, greedy-decoded for accuracy
    train_examples: Optional[int] = None  # per task for fine-tuning (None: all)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


TINY = dict(vocab_size=300, block_size=96, n_layer=1, n_head=2, n_embd=32, corpus_bytes=150_000,
            tokenizer_bytes=50_000, pretrain_steps=30, pretrain_batch=4, finetune_steps=8, finetune_batch=4,
            eval_examples=8, accuracy_examples=2, train_examples=100)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def subset(examples, n_per_task, seed) -> list:
    """A deterministic random n_per_task examples of each task, in task order."""
    out = []
    for task in TASKS:
        items = [e for e in examples if e.task == task]
        order = np.random.default_rng([seed, TASKS.index(task)]).permutation(len(items))[:n_per_task]
        out += [items[i] for i in sorted(order)]
    return out


def pretraining_corpus(cfg: DemoConfig) -> list:
    """Built-in corpus documents, without the standard-library modules held out for validation/test."""
    held = heldout_modules()
    docs = builtin_corpus(cfg.corpus_bytes, notice=say)
    kept = [d for d in docs if not (d.name.startswith("stdlib/") and
                                    d.name.split("/")[1].removesuffix(".py") in held)]
    return kept or [Document("empty", "")]


def pretrain(cfg: DemoConfig, out: str, progress: bool) -> tuple:
    """Tokenizer + GPT pretraining into OUT/pretrain; returns (tokenizer, run_dir, seconds per stage)."""
    run_dir = os.path.join(out, "pretrain")
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.perf_counter()
    train_docs, val_docs = split_documents(pretraining_corpus(cfg), 0.05)
    say(f"[2/6] tokenizer: BPE to {cfg.vocab_size} tokens on {cfg.tokenizer_bytes:,} bytes of code")
    tok = Tokenizer.train(text_slice(train_docs, cfg.tokenizer_bytes), cfg.vocab_size, special_tokens=[ENDOFTEXT])
    tok.save(os.path.join(run_dir, "tokenizer.json"))
    tokens = token_cache(os.path.join(run_dir, "data"), tok, train_docs, val_docs)
    t1 = time.perf_counter()
    tc = TrainConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, batch_size=cfg.pretrain_batch, max_steps=cfg.pretrain_steps,
                     lr=cfg.pretrain_lr, min_lr=cfg.pretrain_lr / 10, warmup_steps=min(50, cfg.pretrain_steps),
                     eval_interval=max(1, cfg.pretrain_steps // 6), eval_batches=4,
                     checkpoint_interval=cfg.pretrain_steps, seed=cfg.seed)
    atomic_write_json(os.path.join(run_dir, "train_config.json"), {"demo": cfg.to_dict(), "train": tc.to_dict()})
    model = GPT(tc.model_config(tok.vocab_size), seed=cfg.seed)
    say(f"[3/6] pretrain: {model.num_params / 1e6:.2f}M parameters, {tokens.train.size:,} tokens, "
        f"{tc.max_steps} steps of {tc.tokens_per_step:,} tokens")
    batches = RandomBatches(tokens.train, tc.batch_size, tc.block_size, tc.seed)
    val = fixed_batches(tokens.val, tc.eval_batches, tc.batch_size, tc.block_size, tc.seed)
    train(model, batches, tc, run_dir, val_batches=val, progress=None if progress else False, log=say)
    return tok, run_dir, {"tokenizer_s": t1 - t0, "pretrain_s": time.perf_counter() - t1}


def finetune_runs(cfg: DemoConfig, out, tok, base_dir, scratch_dir, splits, progress) -> dict:
    """The fine-tuning runs of the comparison: name -> finetune.run's result."""
    full = FinetuneConfig(method="full", max_steps=cfg.finetune_steps, batch_size=cfg.finetune_batch,
                          lr=cfg.full_lr, eval_interval=max(1, cfg.finetune_steps // 5),
                          checkpoint_interval=cfg.finetune_steps, eval_examples=cfg.accuracy_examples,
                          seed=cfg.seed)
    lora = dataclasses.replace(full, method="lora", lr=cfg.lora_lr, lora_rank=cfg.lora_rank, lora_alpha=2.0 * cfg.lora_rank)
    single = [e for e in splits["train"] if e.task == cfg.single_task]
    plan = [("pretrained_full", base_dir, full, splits), ("pretrained_lora", base_dir, lora, splits),
            ("scratch_full", scratch_dir, full, splits),
            (f"single_{cfg.single_task}", base_dir, dataclasses.replace(full, tasks=cfg.single_task),
             {"train": single, "val": [e for e in splits["val"] if e.task == cfg.single_task],
              "test": [e for e in splits["test"] if e.task == cfg.single_task]})]
    enc = {s: encode_examples(splits[s], tok, cfg.block_size) for s in ("train", "val")}  # once for all runs
    results = {}
    for k, (name, base, fc, data) in enumerate(plan):
        say(f"[4/6] fine-tune {k + 1}/{len(plan)}: {name} ({fc.method}, {fc.max_steps} steps)")
        t = time.perf_counter()
        encoded = {s: [e for e in enc[s] if e.task in {x.task for x in data[s]}] for s in ("train", "val")}
        results[name] = finetune(base, "builtin", os.path.join(out, name), fc, splits=data, encoded=encoded,
                                 progress=None if progress else False, log=say)
        results[name]["seconds"] = time.perf_counter() - t
    return results


def run(out="tinygen-demo", cfg: DemoConfig = DemoConfig(), progress=True) -> dict:
    """The whole demo into `out`; returns the report (also OUT/report.json and OUT/report.md)."""
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    say("[1/6] tasks: deriving summarize / name / args examples from the standard library with ast")
    splits = builtin_examples()
    train_split = splits["train"] if cfg.train_examples is None else subset(splits["train"], cfg.train_examples, cfg.seed)
    splits = {"train": train_split, "val": subset(splits["val"], 64, cfg.seed),
              "test": subset(splits["test"], cfg.eval_examples, cfg.seed)}
    tok, base_dir, times = pretrain(cfg, out, progress)
    scratch_dir = os.path.join(out, "scratch-base")
    base = GPT.from_pretrained(base_dir)
    GPT(base.config, seed=cfg.seed + 1).save_pretrained(scratch_dir)  # same shape, random weights
    tok.save(os.path.join(scratch_dir, "tokenizer.json"))
    t = time.perf_counter()
    runs = finetune_runs(cfg, out, tok, base_dir, scratch_dir, splits, progress)
    times["finetune_s"] = time.perf_counter() - t
    say(f"[5/6] evaluate: the pretrained model few-shot (k={cfg.few_shot_k}) on {len(splits['test'])} test examples")
    t = time.perf_counter()
    shots = few_shot_examples(splits["test"], splits["train"], cfg.few_shot_k)
    few = evaluate_tasks(base, tok, shots, cfg.accuracy_examples, cut_newline=True)
    examples = sample_completions(GPT.from_pretrained(os.path.join(out, "pretrained_full")), tok, splits["test"])
    times["evaluate_s"] = time.perf_counter() - t
    report = build_report(cfg, runs, few, times, time.perf_counter() - t_start, examples)
    say("[6/6] report")
    write_report(out, report, runs)
    say(f"done in {format_duration(report['elapsed_s'])}: {os.path.join(out, 'report.md')}")
    return report


def sample_completions(model, tok, test, per_task=2) -> list:
    """Greedy completions of the first test prompts of each task: [(task, prompt, reference, generated)]."""
    picked = [e for task in TASKS for e in [x for x in test if x.task == task][:per_task]]
    outs = greedy_complete(model, [tok.encode(e.prompt) for e in picked], 32, {tok.eot_id})
    return [(e.task, e.prompt, e.completion, tok.decode(o)) for e, o in zip(picked, outs)]


def build_report(cfg, runs, few, times, elapsed, examples) -> dict:
    tasks = {}
    for task in TASKS:
        row = {name: _scores(runs[name]["eval"], task) for name in ("pretrained_full", "pretrained_lora", "scratch_full")}
        row["few_shot"] = _scores(few, task)
        tasks[task] = row
    single = f"single_{cfg.single_task}"
    comparison = {cfg.single_task: {"multi_task": _scores(runs["pretrained_full"]["eval"], cfg.single_task),
                                    "single_task": _scores(runs[single]["eval"], cfg.single_task),
                                    "steps": cfg.finetune_steps}}
    beat = {t: tasks[t]["pretrained_full"]["val_loss"] < tasks[t]["scratch_full"]["val_loss"] for t in TASKS}
    return {"tasks": tasks, "multi_task_vs_single": comparison, "pretrained_beats_scratch": beat,
            "elapsed_s": round(elapsed, 1), "stage_seconds": {k: round(v, 1) for k, v in times.items()},
            "run_seconds": {k: round(v["seconds"], 1) for k, v in runs.items()},
            "config": cfg.to_dict(), "samples": [dict(zip(("task", "prompt", "reference", "generated"), s))
                                                 for s in examples]}


def _scores(table, task) -> dict:
    s = table.get(task, {})
    return {"val_loss": s.get("val_loss"), "accuracy": s.get("accuracy")}


def write_report(out, report, runs) -> None:
    atomic_write_json(os.path.join(out, "report.json"), report)
    series = {}
    for name, r in runs.items():
        rows = read_metrics(os.path.join(out, name, "metrics.jsonl"))
        series[name] = [(row["step"], row["val_loss"]) for row in rows if row.get("val_loss") is not None]
    atomic_write_text(os.path.join(out, "finetune_loss.svg"),
                      loss_svg(series, "fine-tuning: validation loss (completion tokens)"))
    atomic_write_text(os.path.join(out, "report.md"), report_markdown(report))


def report_markdown(report) -> str:
    cols = ("pretrained_full", "pretrained_lora", "scratch_full", "few_shot")
    lines = ["# tinygen demo report", "",
             f"Wall time {format_duration(report['elapsed_s'])} "
             f"({', '.join(f'{k[:-2]} {v:.0f}s' for k, v in report['stage_seconds'].items())}).", "",
             "Held-out (test-split) loss per completion token and exact-match accuracy of greedy completions.",
             "Columns: fine-tuned from the pretrained model (full, LoRA), fine-tuned from random "
             "initialisation (full), the pretrained model few-shot with no training.", ""]
    for task, row in report["tasks"].items():
        beat = "yes" if report["pretrained_beats_scratch"][task] else "NO"
        lines += [f"## {task}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                  "| loss | " + " | ".join(f"{row[c]['val_loss']:.3f}" for c in cols) + " |",
                  "| accuracy | " + " | ".join(f"{row[c]['accuracy']:.1%}" for c in cols) + " |", "",
                  f"Pretrained beats scratch on held-out loss: {beat}.", ""]
    lines += ["## Multi-task vs single-task fine-tuning (full, from the pretrained model, same steps)", ""]
    for task, c in report["multi_task_vs_single"].items():
        lines += [f"| {task} | loss | accuracy |", "|---|---|---|",
                  f"| multi-task | {c['multi_task']['val_loss']:.3f} | {c['multi_task']['accuracy']:.1%} |",
                  f"| single-task | {c['single_task']['val_loss']:.3f} | {c['single_task']['accuracy']:.1%} |", ""]
    lines += ["## Samples (fine-tuned from pretrained, full, greedy)", ""]
    for s in report["samples"]:
        lines += ["```text", s["prompt"] + s["generated"], "```",
                  f"reference: `{s['reference'].strip()}`", ""]
    lines += ["Loss curves: `pretrain/loss.svg`, `finetune_loss.svg`; numbers: `report.json`.", ""]
    return "\n".join(lines)
