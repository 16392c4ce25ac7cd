"""`tinygen demo` at tiny sizes: every stage runs, the report has the promised shape, and the
pretraining directory it writes is a `tinygen pretrain` run that resumes and samples."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinygen import GPT, TinygenError
from tinygen.checkpoint import checkpoint_step, load_model
from tinygen.cli import main
from tinygen.data import stdlib_module
from tinygen.demo import TINY, DemoConfig, pretrain_settings, pretrain_stage, report_markdown
from tinygen.finetuning.tasks import heldout_modules
from tinygen.plumbing.metrics import read_metrics
from tinygen.pretrain import gather, pretrain, read_settings

COLUMNS = {"pretrained_full", "pretrained_lora", "scratch_full", "few_shot"}


RUN_DEMO = """
import sys
from tinygen.cli import main
sys.exit(main(["demo", "--tiny", "--out", sys.argv[1]]))
"""


def test_tiny_demo_writes_report(tmp_path):
    """In a subprocess with one BLAS thread: the tiny model's matrices are so small that
    a second thread only costs (a lot, on a busy machine)."""
    out = tmp_path / "demo"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", RUN_DEMO, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "report:" in done.stdout and "[6/6] report" in done.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) == {"summarize", "name", "args"}
    field = {"summarize": {"rouge_l", "bleu4"}, "name": {"subtoken_precision", "subtoken_recall", "subtoken_f1"},
             "args": {"args_f1"}}
    for task, row in report["tasks"].items():
        assert set(row) == COLUMNS
        for scores in row.values():
            assert scores["val_loss"] > 0 and 0.0 <= scores["accuracy"] <= 1.0
            assert set(scores["scores"]) == {"val_loss", "exact_match"} | field[task]
            for value, low, high in scores["scores"].values():
                assert low <= value <= high
        diffs = report["differences"][task]
        assert set(diffs) == {"pretrained_lora", "scratch_full", "few_shot"}
        for d in diffs["scratch_full"].values():
            assert d["low"] <= d["difference"] <= d["high"] and d["beyond_noise"] == (d["low"] > 0 or d["high"] < 0)
    for sample in report["samples"]:
        assert {"greedy", "greedy_min1", "sampled", "scores"} <= set(sample)
        assert sample["greedy_min1"] != ""  # min_new_tokens=1: at least one token before end-of-text
    comparison = report["multi_task_vs_single"]["name"]
    assert set(comparison) >= {"multi_task", "single_task"}
    assert report["elapsed_s"] > 0 and set(report["pretrained_beats_scratch"]) == set(report["tasks"])
    text = (out / "report.md").read_text()
    assert text == report_markdown(report) and "## summarize" in text and "few_shot" in text
    assert "ROUGE-L F1" in text and "subtoken F1" in text and "beyond noise" in text and "greedy_min1" in text
    for svg in ("finetune_loss.svg", "pretrain/loss.svg"):
        assert (out / svg).read_text().startswith("<svg")
    page = (out / "explain.html").read_text()  # the report links tinygen explain's page of the LoRA run
    assert "](explain.html)" in text and page.startswith("<!DOCTYPE html>") and 'class="heatmap"' in page
    for run in ("pretrained_full", "pretrained_lora", "scratch_full", "single_name"):
        assert os.path.isfile(out / run / "eval.json")
    settings = read_settings(out / "pretrain")  # the demo's settings file is a pretraining run's
    assert settings.command == "demo" and settings.train.max_steps == TINY["pretrain_steps"]
    moved = tmp_path / "moved" / "demo"  # the demo's output travels: every run in it loads and samples (tinygen.runs)
    os.renames(out, moved)
    for run in ("pretrain", "pretrained_full", "pretrained_lora", "scratch_full", "single_name"):
        assert GPT.from_pretrained(moved / run).config.n_layer == TINY["n_layer"], run
        assert main(["sample", "--model", str(moved / run), "--prompt", "def ", "--max-new-tokens", "3",
                     "--seed", "0"]) == 0, run


def test_pretraining_corpus_leaves_out_held_out_modules(tmp_path):
    held = heldout_modules()
    settings = pretrain_settings(DemoConfig(**{**TINY, "corpus_bytes": 2_000_000}), str(tmp_path))
    train_docs, val_docs = gather(settings, say=lambda message: None)
    tops = {stdlib_module(d.name) for d in train_docs + val_docs} - {None}
    assert tops and not tops & held


def test_demo_pretrain_directory_resumes_and_samples(tmp_path, capsys):
    """The demo's pretraining stage writes a run directory that `tinygen pretrain --resume`
    continues (reading back its train_config.json, tokenizer and token cache, not the corpus)
    to the very weights of an uninterrupted run, and that `tinygen sample` loads."""
    cfg = DemoConfig(**TINY)
    run_dir = tmp_path / "pretrain"
    first = pretrain_stage(cfg, str(tmp_path), progress=False)
    n, k = cfg.pretrain_steps, 6
    assert first.result.step == n and checkpoint_step(run_dir) == n
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run_dir), "--max-steps", str(n + k), "--samples", "1",
                 "--sample-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "greedy samples:\n--- 'def'\ndef" in out and "bits/byte" in out
    assert "tokenizer:" not in err  # the tokenizer and the token cache were reused
    assert checkpoint_step(run_dir) == n + k and read_settings(run_dir).train.max_steps == n + k
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(n + k + 1))

    settings = pretrain_settings(cfg, str(tmp_path))
    straight = dataclasses.replace(settings, run_dir=str(tmp_path / "straight"),
                                   train=dataclasses.replace(settings.train, max_steps=n + k))
    pretrain(straight, progress=False, say=lambda message: None)
    a, b = load_model(run_dir).params, load_model(tmp_path / "straight").params
    assert all(np.array_equal(a[name], b[name]) for name in a)

    assert main(["sample", "--model", str(run_dir), "--prompt", "def", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")


def test_demo_config_names_the_bad_field():
    for field, value, message in [("pretrain_steps", 0, "DemoConfig.pretrain_steps must be a positive integer"),
                                  ("single_task", "poetry", "DemoConfig.single_task must be one of"),
                                  ("full_lr", 0.0, "DemoConfig.full_lr must be a positive number"),
                                  ("train_examples", np.int64(0), "DemoConfig.train_examples"),
                                  ("n_embd", 30, r"DemoConfig.n_embd \(30\) must be divisible by n_head")]:
        with pytest.raises(TinygenError, match=message):
            DemoConfig(**{field: value})
    assert DemoConfig(train_examples=np.int64(5)).train_examples == 5


def test_presets_are_valid_configs_and_tiny_conflicts_with_another(capsys):
    from tinygen.demo import LONG, PRESETS
    for values in PRESETS.values():
        DemoConfig(**values)
    long = DemoConfig(**LONG)
    assert long.n_layer > DemoConfig().n_layer and long.pretrain_steps > DemoConfig().pretrain_steps
    assert main(["demo", "--tiny", "--preset", "long"]) == 2
    assert "--tiny is --preset tiny" in capsys.readouterr().err
