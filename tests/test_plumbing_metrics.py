"""The metrics log (metrics.jsonl): append and read back, torn and corrupt lines, truncation on resume."""
import json
import os

import numpy as np
import pytest

from tinygen.errors import TinygenError
from tinygen.plumbing.metrics import MetricsLog, read_metrics, truncate_after


def row(step):
    return {"step": step, "tokens": 512 * step, "train_loss": 10.0 / (step + 1),
            "val_loss": None, "lr": 6e-4, "grad_norm": 1.0, "tokens_per_sec": 1000.0, "elapsed_s": 0.5 * step}


# -- metrics.jsonl ------------------------------------------------------------


def test_append_and_read_roundtrip_with_rounding_nan_and_numpy(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.append({"step": np.int64(0), "train_loss": np.float32(10.987654321), "val_loss": float("nan"),
                "lr": 6.0000000001e-4, "grad_norm": float("inf"), "note": "warm-up"})
    log.append(row(1))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
    rows = read_metrics(path)
    assert rows[0] == {"step": 0, "train_loss": 10.9877, "val_loss": None, "lr": 0.0006,
                       "grad_norm": None, "note": "warm-up"}
    assert rows[1] == {**row(1), "train_loss": 5.0}
    with pytest.raises(TinygenError, match="not a number or string"):
        log.append({"step": 2, "weights": np.zeros(3)})


def test_read_skips_a_torn_last_line_and_appending_repairs_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(3):
        log.append(row(step))
    with open(path, "a") as f:
        f.write('{"step": 3, "train_lo')  # the crash
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    MetricsLog(path).append(row(3))  # the resumed run
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]
    assert path.read_text().count("\n") == 4


def test_a_corrupt_middle_line_or_missing_file_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(TinygenError, match="line 2"):
        read_metrics(path)
    with pytest.raises(TinygenError, match="no metrics log"):
        read_metrics(tmp_path / "missing.jsonl")


def test_truncate_after_makes_a_resumed_log_equal_the_uninterrupted_one(tmp_path):
    straight, resumed = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for step in range(10):
        MetricsLog(straight).append(row(step))
    for step in range(8):  # ran past the step-5 checkpoint, then crashed mid-line
        MetricsLog(resumed).append(row(step))
    with open(resumed, "a") as f:
        f.write('{"step": 8, ')
    truncate_after(resumed, 5)
    assert [r["step"] for r in read_metrics(resumed)] == [0, 1, 2, 3, 4, 5]
    log = MetricsLog(resumed)
    for step in range(6, 10):
        log.append(row(step))
    assert resumed.read_bytes() == straight.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl"]  # no temp file left
    truncate_after(tmp_path / "missing.jsonl", 3)  # nothing to do
    assert not (tmp_path / "missing.jsonl").exists()
