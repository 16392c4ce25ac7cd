"""`tinygen gradcheck`: every row passes, a deliberately wrong backward fails its
row alone (exit 1, count on stderr), --threshold, and the table docs/gradcheck.md shows."""
import contextlib
import io
import re
from pathlib import Path

import pytest

import tinygen.gradient_check as gradient_check
from tinygen.cli import main
from tinygen.gradient_check import all_checks
from tinygen.layers import gelu_backward

GRADCHECK_DOC = Path(__file__).resolve().parent.parent / "docs" / "gradcheck.md"


def table_rows(out):
    """The result rows of the printed table: lines ending in pass or FAIL."""
    return [line for line in out.splitlines() if line.endswith((" pass", " FAIL"))]


def columns(row):
    """(layer, tensor, shape, result) of one row, as laid out by format_table: the error
    column (a rounding-dependent number) is left out."""
    return row[:28].strip(), row[29:57].strip(), row[58:70].strip(), row.split()[-1]


@pytest.fixture(scope="module")
def default_run():
    """(exit code, stdout) of `tinygen gradcheck` with its defaults, run once for the module."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["gradcheck"])
    return code, out.getvalue()


def test_cli_gradcheck_passes_every_row(default_run):
    code, out = default_run
    assert code == 0
    rows = table_rows(out)
    layers = {columns(row)[0] for row in rows}
    assert {"linear", "embedding", "layernorm", "gelu", "causal attention", "cross-entropy",
            "transformer block", "GPT (whole model)", "GPT + LoRA/adapters/prompt", "moe layer (top-2 of 4)",
            "moe layer (capacity 0.5)", "moe mlp part (training)", "transformer block (experts)",
            "GPT + experts (whole model)"} <= layers
    assert all(row.endswith(" pass") for row in rows)
    assert len(rows) == sum(len(tensors) for _, tensors in all_checks(max_coords=4))
    assert f"\n{len(rows)}/{len(rows)} passed (threshold 1e-06) in " in out


def test_the_output_shown_in_docs_is_the_commands(default_run):
    """docs/gradcheck.md shows an excerpt of `tinygen gradcheck`: its header, rows and
    count line are the command's (rows in order; columns compared except the error,
    which depends on rounding, and the time)."""
    _, out = default_run
    doc = GRADCHECK_DOC.read_text(encoding="utf-8")
    shown = re.search(r"```text\n\$ tinygen gradcheck\n(.*?)```", doc, re.DOTALL).group(1).splitlines()
    real = out.splitlines()
    assert shown[:2] == real[:2]  # header and rule
    rows = table_rows(out)
    shown_rows = [line for line in shown if line.endswith((" pass", " FAIL"))]
    assert len(shown_rows) >= 10
    positions = [[columns(r) for r in rows].index(columns(line)) for line in shown_rows]
    assert positions == sorted(positions), "rows in the command's order"
    others = [line for line in shown[2:] if line not in shown_rows]
    count_line = f"{len(rows)}/{len(rows)} passed (threshold 1e-06) in "
    assert all(line in ("...", "") or line.startswith(count_line) for line in others), others
    assert any(line.startswith(count_line) for line in others), "the count line, with the real count"
    for line in shown_rows:  # the error column is a number in the command's format
        assert re.fullmatch(r"\d\.\d\de-\d\d", line.split()[-2]), line


def test_cli_gradcheck_reports_a_wrong_backward(monkeypatch, capsys):
    def wrong_gelu_backward(dout, cache):
        (dx,) = gelu_backward(dout, cache)
        return (dx * 1.001,)  # 0.1% off: far above the threshold

    monkeypatch.setattr(gradient_check, "gelu_backward", wrong_gelu_backward)
    assert main(["gradcheck", "--max-coords", "8"]) == 1
    captured = capsys.readouterr()
    rows = table_rows(captured.out)
    failed = [row for row in rows if row.endswith(" FAIL")]
    assert len(failed) == 1 and failed[0].startswith("gelu ")
    assert f"{len(rows) - 1}/{len(rows)} passed" in captured.out
    assert "1 gradient(s) disagree" in captured.err


def test_cli_threshold_flag(capsys):
    assert main(["gradcheck", "--max-coords", "4", "--threshold", "1e-30"]) == 1
    assert "FAIL" in capsys.readouterr().out
