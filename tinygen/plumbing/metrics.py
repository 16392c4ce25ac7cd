"""The training metrics log: one JSON object per line in RUN_DIR/metrics.jsonl.

A row is whatever the training loop measured at a step, e.g.

    {"step": 100, "tokens": 409600, "train_loss": 3.21, "val_loss": null,
     "lr": 0.0006, "grad_norm": 0.84, "tokens_per_sec": 12500.0, "elapsed_s": 32.8}

Contract:
- Appending writes one whole line with a single write, so a crash loses at
  most the line being written; a write the OS refuses (a full disk) is cut
  back off the file and raised as WriteError. Floats are rounded to
  `SIGNIFICANT_DIGITS` significant digits; NaN and infinities become null
  (JSON has no NaN); NumPy scalars become plain numbers.
- `read_metrics` skips a last line that does not parse (a crash mid-write);
  a bad line anywhere else (not JSON, not an object, nested too deeply, a
  key twice) is a TinygenError naming the file and the line.
- `truncate_after(path, step)` keeps rows with step <= `step`, byte for byte,
  so that a run resumed from the checkpoint of that step appends to a log
  that matches the uninterrupted run's. The rewrite is atomic.
"""
import json
import math
import os

import numpy as np

from ..errors import TinygenError, WriteError
from .fileio import append_bytes, atomic_write_text, parse_json

SIGNIFICANT_DIGITS = 6


def _clean(value):
    """A JSON-ready value: 0.123456789 -> 0.123457, nan -> None, np.int64(3) -> 3."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    raise TinygenError(f"metrics value {value!r} of type {type(value).__name__} is not a number or string")


def _split_lines(text: str) -> tuple[list[str], str]:
    """'a\\nb\\nc' -> (['a', 'b'], 'c'): complete lines and the unterminated tail."""
    *lines, tail = text.split("\n")
    return lines, tail


def _parse(line: str):
    """One line -> its row (a dict), or None if it is not a JSON object (torn, corrupt, hostile)."""
    try:
        row = parse_json(line, "metrics line")
    except TinygenError:
        return None
    return row if isinstance(row, dict) else None


class MetricsLog:
    """Append-only JSONL log. `MetricsLog(path).append({"step": 1, "train_loss": 4.2})`.

    Creating it on an existing file keeps the file (a resumed run appends);
    an unterminated last line left by a crash is completed if it parses and
    cut off otherwise, so the next row starts on a line of its own.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            self._repair_tail()

    def _repair_tail(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1  # start of the unterminated tail
        tail = data[cut:].decode("utf-8", errors="replace")
        try:
            with open(self.path, "r+b") as f:
                if _parse(tail) is not None:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    f.truncate(cut)
        except OSError as e:
            raise WriteError(self.path, e) from e

    def append(self, row: dict) -> dict:
        """Write `row` as one line; returns the cleaned row that was written."""
        if not isinstance(row, dict):
            raise TinygenError(f"a metrics row must be a dict, got {type(row).__name__}")
        clean = _clean(row)
        append_bytes(self.path, (json.dumps(clean, allow_nan=False) + "\n").encode("utf-8"))
        return clean


def read_metrics(path) -> list[dict]:
    """All rows of a metrics.jsonl, oldest first; a torn last line is skipped."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        raise TinygenError(f"no metrics log at {path!r}; expected RUN_DIR/metrics.jsonl") from None
    lines, tail = _split_lines(text)
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse(line)
        if row is None:
            if number == len(lines) and not tail.strip():
                break  # the last line is torn: a crash mid-write
            raise TinygenError(f"{path} line {number} is not a JSON object: {line[:80]!r}")
        rows.append(row)
    if tail.strip() and _parse(tail) is not None:
        rows.append(_parse(tail))
    return rows


def truncate_after(path, step: int) -> None:
    """Drop rows whose "step" is greater than `step` (and a torn last line).

    Kept lines are copied verbatim; rows without a "step" stay. A missing
    file is left missing: there is nothing to truncate.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return
    rows = read_metrics(path)  # raises on a corrupt middle line before we rewrite anything
    with open(path, encoding="utf-8", errors="replace") as f:
        lines, tail = _split_lines(f.read())
    if tail.strip() and _parse(tail) is not None:
        lines.append(tail)
    kept = []
    for line in lines:
        row = _parse(line)
        if row is not None and not (isinstance(row.get("step"), (int, float)) and row["step"] > step):
            kept.append(line + "\n")
    assert len(kept) <= len(rows)
    atomic_write_text(path, "".join(kept))
