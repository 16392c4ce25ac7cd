"""`tinygen demo`: the whole pipeline on built-in data, and whether pretraining paid off.

    1 tasks      the built-in ast tasks (tinygen.finetuning.tasks), split by module
    2 tokenizer  BPE trained on standard-library sources
    3 pretrain   a GPT-2 on those sources, minus every held-out module
                 (2 and 3 are tinygen.pretrain's pipeline, as `tinygen pretrain`
                 runs it: OUT/pretrain resumes with `tinygen pretrain --resume`)
    4 fine-tune  multi-task, from the pretrained model (full and LoRA) and
                 from a random initialisation (full); single-task on one task
    5 evaluate   per task on the test split: loss, exact match and the task's own
                 metric (subtoken F1, ROUGE-L and BLEU-4, parameter-name F1), each
                 with a bootstrap 95% interval; the pretrained model few-shot
                 (k solved examples in the prompt); greedy and sampled completions
    6 report     OUT/report.md, OUT/report.json, loss curves as SVG; which
                 differences between runs are beyond noise (paired bootstrap)

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

from .config import NON_NEGATIVE, POSITIVE, number, one_of, optional, option, validate
from .data import DataConfig
from .errors import TinygenError
from .explain import explain
from .finetuning.evaluate import evaluate_tasks, few_shot_examples, task_metrics
from .finetuning.metrics import LOSS, beyond_noise, example_stats, paired_bootstrap, values
from .finetuning.finetune import FinetuneConfig, run as finetune
from .finetuning.tasks import TASKS, builtin_examples, encode_examples, heldout_modules
from .gpt import GPT
from .plumbing.fileio import atomic_write_json, atomic_write_text
from .plumbing.lock import run_lock
from .plumbing.metrics import read_metrics
from .plumbing.plot import loss_svg
from .plumbing.progress import format_duration
from .plumbing.rundir import METRICS, TOKENIZER
from .pretrain import RunSettings, pretrain
from .sampling import generate
from .train import TrainConfig

# OUT/: the demo's own files; each run directory inside it has the files of tinygen.plumbing.rundir
PRETRAIN_DIR, SCRATCH_DIR = "pretrain", "scratch-base"
REPORT_JSON, REPORT_MD, FINETUNE_SVG = "report.json", "report.md", "finetune_loss.svg"
EXPLAIN_HTML = "explain.html"  # tinygen explain's page of the LoRA run on one test example
LR = number(0.0, low_open=True)  # a learning rate: a positive number


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults fit in 10 minutes on 2 cores."""

    vocab_size: int = option(1024, "size of the BPE vocabulary trained on the corpus", POSITIVE)
    block_size: int = option(128, "context length T of the model", POSITIVE)
    n_layer: int = option(4, "transformer blocks", POSITIVE)
    n_head: int = option(4, "attention heads per block (must divide --n-embd)", POSITIVE)
    n_embd: int = option(128, "width of the residual stream", POSITIVE)
    corpus_bytes: int = option(8_000_000, "cap on the standard-library sources used for pretraining, in bytes",
                               POSITIVE)
    tokenizer_bytes: int = option(1_000_000, "bytes of the corpus the tokenizer trains on", POSITIVE)
    pretrain_steps: int = option(1800, "pretraining steps", POSITIVE)
    pretrain_batch: int = option(16, "sequences per pretraining step", POSITIVE)
    pretrain_lr: float = option(2e-3, "peak learning rate of pretraining", LR)
    finetune_steps: int = option(250, "steps of each fine-tuning run", POSITIVE)
    finetune_batch: int = option(16, "examples per fine-tuning step", POSITIVE)
    full_lr: float = option(1e-3, "peak learning rate of full fine-tuning", LR)
    lora_lr: float = option(3e-3, "peak learning rate of LoRA fine-tuning", LR)
    lora_rank: int = option(8, "rank r of the LoRA updates", POSITIVE)
    single_task: str = option("name", "the task of the single-task run (compared with multi-task)", one_of(*TASKS))
    few_shot_k: int = option(2, "solved examples in front of each few-shot prompt", NON_NEGATIVE)
    eval_examples: int = option(200, "test examples per task for the loss", POSITIVE)
    accuracy_examples: int = option(48, "test examples per task decoded for the accuracy", POSITIVE)
    train_examples: Optional[int] = option(None, "fine-tuning examples per task (default: all)", optional(POSITIVE))
    seed: int = option(0, "seed of the weights, the batches and the example subsets", NON_NEGATIVE)

    def __post_init__(self):
        validate(self)
        if self.n_embd % self.n_head:
            raise TinygenError(f"DemoConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


TINY = dict(vocab_size=300, block_size=96, n_layer=1, n_head=2, n_embd=32, corpus_bytes=150_000,
            tokenizer_bytes=50_000, pretrain_steps=30, pretrain_batch=4, finetune_steps=8, finetune_batch=4,
            eval_examples=8, accuracy_examples=2, train_examples=100)
# About an hour on 2 cores (measured 1h20m on a machine shared with other work, load 3-7; its
# uncontended steps put it at ~1 hour; docs/transfer.md): a model of ~3M parameters, 3.3x the
# pretraining steps on twice the corpus, 3.2x the fine-tuning steps, and three times the decoded
# test examples (narrower intervals).
LONG = dict(vocab_size=2048, n_layer=6, n_head=6, n_embd=192, corpus_bytes=16_000_000, tokenizer_bytes=2_000_000,
            pretrain_steps=6000, finetune_steps=800, eval_examples=400, accuracy_examples=150)
PRESETS = {"default": {}, "tiny": TINY, "long": LONG}
SAMPLE_OPTIONS = dict(temperature=0.8, top_p=0.95)  # the sampled completion of the report's samples
COMPARED = ("pretrained_lora", "scratch_full", "few_shot")  # each against pretrained_full, paired


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


def pretrain_settings(cfg: DemoConfig, out: str) -> RunSettings:
    """The demo's pretraining as a tinygen.pretrain run in OUT/pretrain: the built-in corpus
    without the standard-library modules held out for validation/test, and the demo's sizes."""
    steps = cfg.pretrain_steps
    train = TrainConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_embd=cfg.n_embd, batch_size=cfg.pretrain_batch, max_steps=steps,
                        lr=cfg.pretrain_lr, min_lr=cfg.pretrain_lr / 10, warmup_steps=min(50, steps),
                        lr_decay_steps=steps, eval_interval=max(1, steps // 6), eval_batches=4,
                        checkpoint_interval=steps, seed=cfg.seed)
    data = DataConfig(corpus_bytes=cfg.corpus_bytes, tokenizer_bytes=cfg.tokenizer_bytes, val_fraction=0.05,
                      exclude_modules=",".join(sorted(heldout_modules())))
    return RunSettings(run_dir=os.path.join(out, PRETRAIN_DIR), train=train, data=data, command="demo")


def pretrain_stage(cfg: DemoConfig, out: str, progress: bool):
    """Tokenizer + GPT pretraining into OUT/pretrain (tinygen.pretrain.pretrain, starting over);
    returns what it returns."""
    settings = pretrain_settings(cfg, out)
    say(f"[2-3/6] tokenizer and pretraining (tinygen.pretrain) into {settings.run_dir}: "
        f"BPE to {cfg.vocab_size} tokens, then {settings.train.max_steps} steps")
    return pretrain(settings, overwrite=True, progress=progress, say=say)


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
    """The whole demo into `out`; returns the report (also OUT/report.json and OUT/report.md).

    OUT is locked for the whole demo (tinygen.plumbing.lock): a second demo into it gets RunDirBusy.
    """
    t_start = time.perf_counter()
    with run_lock(out):  # creates OUT
        say("[1/6] tasks: deriving summarize / name / args examples from the standard library with ast")
        splits = builtin_examples()
        train_split = (splits["train"] if cfg.train_examples is None
                       else subset(splits["train"], cfg.train_examples, cfg.seed))
        splits = {"train": train_split, "val": subset(splits["val"], 64, cfg.seed),
                  "test": subset(splits["test"], cfg.eval_examples, cfg.seed)}
        pretrained = pretrain_stage(cfg, out, progress)
        tok, base_dir = pretrained.tokenizer, os.path.join(out, PRETRAIN_DIR)
        times = {"tokenizer_s": pretrained.seconds["data_s"], "pretrain_s": pretrained.seconds["train_s"]}
        scratch_dir = os.path.join(out, SCRATCH_DIR)
        base = GPT.from_pretrained(base_dir)
        GPT(base.config, seed=cfg.seed + 1).save_pretrained(scratch_dir)  # same shape, random weights
        tok.save(os.path.join(scratch_dir, TOKENIZER))
        t = time.perf_counter()
        runs = finetune_runs(cfg, out, tok, base_dir, scratch_dir, splits, progress)
        times["finetune_s"] = time.perf_counter() - t
        say(f"[5/6] evaluate: the pretrained model few-shot (k={cfg.few_shot_k}) on {len(splits['test'])} "
            "test examples")
        t = time.perf_counter()
        shots = few_shot_examples(splits["test"], splits["train"], cfg.few_shot_k)
        few = evaluate_tasks(base, tok, shots, cfg.accuracy_examples, cut_newline=True)
        examples = sample_completions(GPT.from_pretrained(os.path.join(out, "pretrained_full")), tok,
                                      splits["test"], seed=cfg.seed)
        explain_page(out, tok, splits["test"], GPT.from_pretrained(base_dir).config.block_size)
        times["evaluate_s"] = time.perf_counter() - t
        report = build_report(cfg, runs, few, times, time.perf_counter() - t_start, examples)
        say("[6/6] report")
        write_report(out, report, runs)
        say(f"done in {format_duration(report['elapsed_s'])}: {os.path.join(out, REPORT_MD)}")
    return report


def explain_page(out, tok, test, block_size) -> str:
    """OUT/explain.html: `tinygen explain` on the LoRA-fine-tuned run, for the shortest of the first
    test examples of the first task (prompt and reference completion), so the page shows what the
    model attends to and how much each token of the right answer surprised it."""
    candidates = [e.prompt + e.completion for e in [x for x in test if x.task == TASKS[0]][:8]]
    fitting = [c for c in candidates if len(tok.encode(c)) <= block_size] or [tok.decode(tok.encode(candidates[0])[:block_size])]
    return explain(os.path.join(out, "pretrained_lora"), min(fitting, key=len), os.path.join(out, EXPLAIN_HTML))


def sample_completions(model, tok, test, per_task=2, max_new_tokens=32, seed=0) -> list:
    """For the first test prompts of each task, three completions of the same prompt:
    greedy; greedy with min_new_tokens=1 (end-of-text may not win the first step); and sampled
    (SAMPLE_OPTIONS, seeded). [{"task", "prompt", "reference", "greedy", "greedy_min1", "sampled",
    "scores": {"greedy": {...}, ...}}], scored by the task's metrics."""
    picked = [e for task in TASKS for e in [x for x in test if x.task == task][:per_task]]
    rng = np.random.default_rng(seed)
    out = []
    for e in picked:
        ids = tok.encode(e.prompt)[-(model.config.block_size - max_new_tokens):]
        runs = {"greedy": dict(temperature=0), "greedy_min1": dict(temperature=0, min_new_tokens=1),
                "sampled": dict(SAMPLE_OPTIONS, seed=rng)}
        row = {"task": e.task, "prompt": e.prompt, "reference": e.completion}
        for name, options in runs.items():
            new = generate(model, np.array(ids), max_new_tokens, stop=[tok.eot_id], **options)[len(ids):]
            row[name] = tok.decode([t for t in new.tolist() if t != tok.eot_id])
        metrics = [m for m in task_metrics(e.task, [e]) if m != "exact_match"]
        row["scores"] = {name: {k: round(v, 3) for m in metrics
                                for k, v in values(m, example_stats(m, [row[name]], [e.completion])).items()}
                         for name in runs}
        out.append(row)
    return out


def build_report(cfg, runs, few, times, elapsed, examples) -> dict:
    evals = {name: runs[name]["eval"] for name in ("pretrained_full", "pretrained_lora", "scratch_full")}
    evals["few_shot"] = few
    tasks = {task: {name: _scores(table, task) for name, table in evals.items()} for task in TASKS}
    differences = {task: {other: _differences(evals["pretrained_full"].get(task), table.get(task))
                          for other, table in evals.items() if other in COMPARED} for task in TASKS}
    single = f"single_{cfg.single_task}"
    multi_eval, single_eval = runs["pretrained_full"]["eval"], runs[single]["eval"]
    comparison = {cfg.single_task: {"multi_task": _scores(multi_eval, cfg.single_task),
                                    "single_task": _scores(single_eval, cfg.single_task),
                                    "difference": _differences(multi_eval.get(cfg.single_task),
                                                               single_eval.get(cfg.single_task)),
                                    "steps": cfg.finetune_steps}}
    beat = {t: tasks[t]["pretrained_full"]["val_loss"] < tasks[t]["scratch_full"]["val_loss"] for t in TASKS}
    return {"tasks": tasks, "differences": differences, "multi_task_vs_single": comparison,
            "pretrained_beats_scratch": beat,
            "elapsed_s": round(elapsed, 1), "stage_seconds": {k: round(v, 1) for k, v in times.items()},
            "run_seconds": {k: round(v["seconds"], 1) for k, v in runs.items()},
            "config": asdict(cfg), "samples": examples}


def _scores(table, task) -> dict:
    """{"val_loss", "accuracy", "scores": {value: [value, low, high]}} of one run on one task."""
    s = table.get(task, {})
    return {"val_loss": s.get("val_loss"), "accuracy": s.get("accuracy"), "scores": s.get("scores", {}),
            "empty": s.get("empty"), "decoded": s.get("decoded")}


def _differences(a, b) -> dict:
    """{value: {"difference": a - b, "low", "high", "beyond_noise"}}: run a against run b on the same
    test examples, a paired bootstrap per metric (metrics.paired_bootstrap)."""
    if not a or not b:
        return {}
    out = {}
    for metric, stats_a in a.get("stats", {}).items():
        stats_b = b.get("stats", {}).get(metric)
        if stats_b is None or len(stats_a) != len(stats_b) or not stats_a:
            continue
        diffs = paired_bootstrap(LOSS if metric == "loss" else metric, np.array(stats_a), np.array(stats_b))
        for name, d in diffs.items():
            out[name] = {"difference": round(d.value, 4), "low": round(d.low, 4), "high": round(d.high, 4),
                         "beyond_noise": beyond_noise(d)}
    return out


def write_report(out, report, runs) -> None:
    atomic_write_json(os.path.join(out, REPORT_JSON), report)
    series = {}
    for name, r in runs.items():
        rows = read_metrics(os.path.join(out, name, METRICS))
        series[name] = [(row["step"], row["val_loss"]) for row in rows if row.get("val_loss") is not None]
    atomic_write_text(os.path.join(out, FINETUNE_SVG),
                      loss_svg(series, "fine-tuning: validation loss (completion tokens)"))
    atomic_write_text(os.path.join(out, REPORT_MD), report_markdown(report))


VALUE_NAMES = {"val_loss": "loss", "exact_match": "exact match", "subtoken_precision": "subtoken precision",
               "subtoken_recall": "subtoken recall", "subtoken_f1": "subtoken F1", "rouge_l": "ROUGE-L F1",
               "bleu4": "BLEU-4", "args_f1": "parameter-name F1"}


def _cell(scores, name) -> str:
    """"0.412 [0.35, 0.47]", or the bare value when there is no interval."""
    v = scores.get(name)
    return "" if v is None else f"{v[0]:.3f} [{v[1]:.2f}, {v[2]:.2f}]"


def _say_difference(name, d) -> str:
    """One difference in words: "loss -1.705 [-1.80, -1.62]: beyond noise"."""
    word = "beyond noise" if d["beyond_noise"] else "within noise"
    return f"{VALUE_NAMES.get(name, name)} {d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]: {word}"


def _differences_markdown(diffs) -> list:
    """A table of pretrained_full minus each other run, and which differences are beyond noise, in words."""
    diffs = {other: d for other, d in diffs.items() if d}
    if not diffs:
        return []
    names = list(next(iter(diffs.values())))
    lines = ["pretrained_full minus each other run, on the same test examples (paired bootstrap 95% interval; "
             "\\* = beyond noise, the interval leaves out 0):", "",
             "| | " + " | ".join(VALUE_NAMES.get(n, n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for other, d in diffs.items():
        cells = [f"{d[n]['difference']:+.3f} [{d[n]['low']:+.3f}, {d[n]['high']:+.3f}]"
                 + (" \\*" if d[n]["beyond_noise"] else "") if n in d else "" for n in names]
        lines.append(f"| − {other} | " + " | ".join(cells) + " |")
    beyond = [f"{VALUE_NAMES.get(n, n)} vs {other} ({'better' if (x['difference'] < 0) == (n == 'val_loss') else 'worse'})"
              for other, d in diffs.items() for n, x in d.items() if x["beyond_noise"]]
    lines += ["", ("Beyond noise: pretrained_full's " + "; ".join(beyond) + ". Every other difference is within "
                   "noise: these test examples cannot tell those runs apart.") if beyond else
              "No difference is beyond noise: these test examples cannot tell the runs apart.", ""]
    return lines


def report_markdown(report) -> str:
    cols = ("pretrained_full", "pretrained_lora", "scratch_full", "few_shot")
    lines = ["# tinygen demo report", "",
             f"Wall time {format_duration(report['elapsed_s'])} "
             f"({', '.join(f'{k[:-2]} {v:.0f}s' for k, v in report['stage_seconds'].items())}).", "",
             "Held-out (test-split) scores of greedy completions: the loss per completion token (lower is "
             "better), exact match, and each task's own metric (higher is better), each with a bootstrap 95% "
             "interval over the test examples in brackets. Columns: fine-tuned from the pretrained model (full, "
             "LoRA), fine-tuned from random initialisation (full), the pretrained model few-shot with no training. "
             "An empty completion (end-of-text as the first greedy token) scores 0 on every metric; the last row "
             "counts them.", ""]
    for task, row in report["tasks"].items():
        beat = "yes" if report["pretrained_beats_scratch"][task] else "NO"
        names = list(row["pretrained_full"].get("scores") or {"val_loss": 0, "exact_match": 0})
        lines += [f"## {task}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        if not row["pretrained_full"].get("scores"):  # a report without intervals
            lines += ["| loss | " + " | ".join(f"{row[c]['val_loss']:.3f}" for c in cols) + " |",
                      "| accuracy | " + " | ".join(f"{row[c]['accuracy']:.1%}" for c in cols) + " |"]
        for name in names if row["pretrained_full"].get("scores") else ():
            lines.append(f"| {VALUE_NAMES.get(name, name)} | "
                         + " | ".join(_cell(row[c].get("scores", {}), name) for c in cols) + " |")
        if row["pretrained_full"].get("decoded"):
            lines.append("| empty completions | " + " | ".join(f"{row[c]['empty']} of {row[c]['decoded']}" for c in cols)
                         + " |")
        lines += ["", f"Pretrained beats scratch on held-out loss: {beat}.", ""]
        lines += _differences_markdown(report.get("differences", {}).get(task, {}))
    lines += ["## Multi-task vs single-task fine-tuning (full, from the pretrained model, same steps)", ""]
    for task, c in report["multi_task_vs_single"].items():
        lines += [f"| {task} | loss | accuracy |", "|---|---|---|",
                  f"| multi-task | {c['multi_task']['val_loss']:.3f} | {c['multi_task']['accuracy']:.1%} |",
                  f"| single-task | {c['single_task']['val_loss']:.3f} | {c['single_task']['accuracy']:.1%} |", ""]
        if c.get("difference"):
            lines += ["multi − single: " + "; ".join(_say_difference(n, d) for n, d in c["difference"].items())
                      + ".", ""]
    lines += ["## Samples (fine-tuned from pretrained, full): greedy, greedy with min_new_tokens=1, sampled", "",
              "Greedy decoding takes the most likely token; when that is end-of-text at the first step the "
              "completion is empty. `min_new_tokens=1` forbids end-of-text until one token is out (Hugging "
              f"Face's option of that name); sampling ({', '.join(f'{k}={v}' for k, v in SAMPLE_OPTIONS.items())}) "
              "draws from the distribution instead.", ""]
    for s in report["samples"]:
        lines += ["```text", s["prompt"], "```", f"reference: `{s['reference'].strip()}`", ""]
        for name in ("greedy", "greedy_min1", "sampled"):
            score = ", ".join(f"{VALUE_NAMES.get(k, k)} {v:.2f}" for k, v in s.get("scores", {}).get(name, {}).items())
            lines.append(f"- {name}: {s[name]!r}" + (f" ({score})" if score else ""))
        lines.append("")
    lines += ["Loss curves: `pretrain/loss.svg`, `finetune_loss.svg`; numbers: `report.json`.", ""]
    lines += [f"What the LoRA-fine-tuned model attends to and predicts on one test example: [{EXPLAIN_HTML}]({EXPLAIN_HTML})"
              " (`tinygen explain`; open it in a browser).", ""]
    return "\n".join(lines)
