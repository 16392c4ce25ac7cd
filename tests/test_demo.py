"""`tinygen demo` at tiny sizes: every stage runs and the report has the promised shape."""
import json
import os
import subprocess
import sys

from tinygen.demo import TINY, DemoConfig, pretraining_corpus, report_markdown
from tinygen.finetuning.tasks import heldout_modules

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
    for row in report["tasks"].values():
        assert set(row) == COLUMNS
        for scores in row.values():
            assert scores["val_loss"] > 0 and 0.0 <= scores["accuracy"] <= 1.0
    comparison = report["multi_task_vs_single"]["name"]
    assert set(comparison) >= {"multi_task", "single_task"}
    assert report["elapsed_s"] > 0 and set(report["pretrained_beats_scratch"]) == set(report["tasks"])
    text = (out / "report.md").read_text()
    assert text == report_markdown(report) and "## summarize" in text and "few_shot" in text
    for svg in ("finetune_loss.svg", "pretrain/loss.svg"):
        assert (out / svg).read_text().startswith("<svg")
    for run in ("pretrained_full", "pretrained_lora", "scratch_full", "single_name"):
        assert os.path.isfile(out / run / "eval.json")


def test_pretraining_corpus_leaves_out_held_out_modules():
    held = heldout_modules()
    docs = pretraining_corpus(DemoConfig(**{**TINY, "corpus_bytes": 2_000_000}))
    tops = {d.name.split("/")[1].removesuffix(".py") for d in docs if d.name.startswith("stdlib/")}
    assert tops and not tops & held
