"""The SVG loss curve (tinygen.plumbing.plot): well-formed XML, both series, gaps at NaN and None,
empty input, and nice axis ticks."""
import math
import os
import xml.etree.ElementTree as ET

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tinygen.errors import TinygenError
from tinygen.plumbing.plot import loss_svg, nice_ticks, write_loss_svg

SVG = "{http://www.w3.org/2000/svg}"


def row(step):
    return {"step": step, "tokens": 512 * step, "train_loss": 10.0 / (step + 1),
            "val_loss": None, "lr": 6e-4, "grad_norm": 1.0, "tokens_per_sec": 1000.0, "elapsed_s": 0.5 * step}


def parse(svg: str):
    root = ET.fromstring(svg)
    assert root.tag == SVG + "svg"
    return root


def texts(root):
    return [t.text for t in root.iter(SVG + "text")]


def test_svg_is_well_formed_and_has_both_series(tmp_path):
    rows = [{**row(s), "val_loss": 9.0 / (s + 1) if s % 5 == 0 else None} for s in range(0, 50)]
    path = tmp_path / "loss.svg"
    write_loss_svg(path, rows, title="run <1> & co")
    root = parse(path.read_text())
    assert {"train", "val", "step", "loss", "run <1> & co"} <= set(texts(root))
    polylines = list(root.iter(SVG + "polyline"))
    assert len(polylines) == 2
    assert len(polylines[0].get("points").split()) == 50  # every train point
    assert len(polylines[1].get("points").split()) == 10  # val points, nulls skipped
    assert os.listdir(tmp_path) == ["loss.svg"]


def test_svg_breaks_lines_at_nan_and_none_and_draws_lone_points():
    series = {"train": [(0, 5.0), (1, 4.0), (2, math.nan), (3, 3.5), (4, None), (5, 3.0), (6, 2.9)],
              "val": [(3, 3.7)]}
    root = parse(loss_svg(series, "gaps"))
    polylines = list(root.iter(SVG + "polyline"))
    assert [len(p.get("points").split()) for p in polylines] == [2, 2]
    circles = {(c.get("cx"), c.get("cy")) for c in root.iter(SVG + "circle")}
    assert len(circles) >= 6  # every point of both short series, the lone (3, 3.5) and (3, 3.7) included
    assert "nan" not in loss_svg(series, "gaps").lower()


def test_svg_empty_and_single_point():
    for series in ({}, {"train": []}, {"train": [(0, None), (1, math.nan)]}):
        root = parse(loss_svg(series, "empty"))
        assert "no data" in texts(root)
        assert not list(root.iter(SVG + "polyline"))
    root = parse(loss_svg({"train": [(0, 10.9)]}, "one"))
    assert len(list(root.iter(SVG + "circle"))) >= 1 and "no data" not in texts(root)
    with pytest.raises(TinygenError, match="dict"):
        loss_svg([(0, 1.0)], "not a dict")


@given(lo=st.floats(-1e6, 1e6), span=st.floats(1e-6, 1e6))
def test_nice_ticks_follow_the_1_2_5_rule(lo, span):
    assume(span >= 1e-6 * abs(lo))  # a range of at least a millionth of its magnitude
    hi = lo + span
    ticks = nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 6
    tolerance = 1e-9 * max(1.0, abs(lo), abs(hi))
    assert lo - tolerance <= ticks[0] and ticks[-1] <= hi + tolerance
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6
