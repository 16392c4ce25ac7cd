"""A loss curve as a standalone SVG string: no plotting library needed.

`loss_svg({"train": [(step, loss), ...], "val": [...]}, title)` draws a
framed plot with gridlines at "nice" ticks (1, 2 or 5 times a power of ten),
one polyline per series, a legend, and axis labels. A point whose y is None
or NaN breaks its line into separate segments; a lone point is drawn as a
dot; a plot with no finite points says "no data". `write_loss_svg` draws
train_loss and val_loss from the rows of a metrics log and writes
RUN_DIR/loss.svg atomically; `write_expert_load_svg` draws each expert's
share of the routed tokens, one panel per block with experts (RUN_DIR/expert_load.svg).

Coordinates: data (x, y) maps to pixels (px, py) with py growing downwards:

    px = left + (x - x_lo) / (x_hi - x_lo) * plot_width
    py = top  + (y_hi - y) / (y_hi - y_lo) * plot_height
"""
import math
import numbers
from xml.sax.saxutils import escape

from ..config import POSITIVE, require
from ..errors import TinygenError
from .fileio import atomic_write_text

WIDTH, HEIGHT = 720, 440
LEFT, RIGHT, TOP, BOTTOM = 72, 24, 46, 58  # margins around the plot area, pixels
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'
MARKERS_UP_TO = 40  # series with at most this many points also get a dot per point


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About `target` ticks inside [lo, hi], spaced 1, 2 or 5 times a power of ten.

    >>> nice_ticks(0, 1000)
    [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]
    >>> nice_ticks(2.8, 11.2)
    [4.0, 6.0, 8.0, 10.0]
    """
    require("nice_ticks target", target, POSITIVE)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise TinygenError(f"nice_ticks needs finite bounds lo < hi, got ({lo}, {hi})")
    step = _nice_step((hi - lo) / target)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    digits = max(0, 3 - math.floor(math.log10(step)))  # rounds 0.30000000000000004 to 0.3
    return [round(i * step, digits) for i in range(first, last + 1)]


def _domain(values: list[float], pad: float = 0.03) -> tuple[float, float]:
    """The axis range: the data's range widened by `pad` of it on each side,
    so no point sits on the frame; a single value v gets v +- max(|v|/10, 1).

    >>> _domain([0, 100])
    (-3.0, 103.0)
    """
    lo, hi = min(values), max(values)
    if lo == hi:
        half = max(abs(lo) * 0.1, 1.0)
        return lo - half, hi + half
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def _nice_step(raw: float) -> float:
    """The smallest 1, 2 or 5 times 10**k that is >= raw: 0.13 -> 0.2, 700 -> 1000."""
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * magnitude >= raw * (1 - 1e-9):
            return m * magnitude
    raise AssertionError(raw)


def _tick_label(value: float, step: float) -> str:
    """20000 -> '20k' (when ticks are >= 1000 apart), 0.25 with step 0.05 -> '0.25'."""
    if step >= 1000 and abs(value) >= 10000:
        return f"{value / 1000:g}k"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text


def _finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _segments(points) -> list[list[tuple[float, float]]]:
    """[(0, 1), (1, nan), (2, 3), (3, 2)] -> [[(0, 1)], [(2, 3), (3, 2)]]: runs of finite points."""
    runs, run = [], []
    for x, y in points:
        if _finite(x) and _finite(y):
            run.append((float(x), float(y)))
        elif run:
            runs.append(run)
            run = []
    return runs + [run] if run else runs


def loss_svg(series: dict, title: str, xlabel: str = "step", ylabel: str = "loss") -> str:
    """An SVG document (a string) plotting each named series of (x, y) points."""
    if not isinstance(series, dict):
        raise TinygenError(
            f"loss_svg series must be a dict of name -> [(x, y), ...], got {type(series).__name__}"
        )
    runs = {name: _segments(points) for name, points in series.items()}
    xs = [x for segs in runs.values() for seg in segs for x, _ in seg]
    ys = [y for segs in runs.values() for seg in segs for _, y in seg]
    area = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM)  # x0, x1, y0, y1 of the plot, pixels
    out = _labels(title, xlabel, ylabel, area)
    if not xs:
        return _document(out + _no_data(area))

    (xlo, xhi), (ylo, yhi) = _domain(xs, pad=0.02), _domain(ys, pad=0.04)
    xticks = nice_ticks(xlo, xhi, target=3 if min(xs) == max(xs) else 6)
    yticks = nice_ticks(ylo, yhi, target=3 if min(ys) == max(ys) else 5)
    x0, x1, y0, y1 = area

    def px(x):
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y):
        return y0 + (yhi - y) / (yhi - ylo) * (y1 - y0)

    out += _grid_and_ticks(xticks, yticks, px, py, area)
    out += _lines(runs, px, py, area)
    out.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#444"/>')
    dotted = [_dotted(segs) or any(len(seg) == 1 for seg in segs) for segs in runs.values()]
    return _document(out + _legend(list(series), dotted, x1, y0))


def _dotted(segs) -> bool:
    """Short series (e.g. val loss, measured now and then) get a dot on every point."""
    return sum(map(len, segs)) <= MARKERS_UP_TO


def _document(elements: list[str]) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}">')
    return "\n".join([head, *elements, "</svg>"]) + "\n"


def _labels(title: str, xlabel: str, ylabel: str, area) -> list[str]:
    """White background, the title on top, the x label below, the y label turned on its side."""
    x0, x1, y0, y1 = area
    xmid, ymid = (x0 + x1) / 2, (y0 + y1) / 2
    return [
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="28" text-anchor="middle" font-size="16" font-weight="bold" '
        f'{FONT} fill="#222">{escape(title)}</text>',
        f'<text x="{xmid}" y="{HEIGHT - 14}" text-anchor="middle" font-size="13" '
        f'{FONT} fill="#333">{escape(xlabel)}</text>',
        f'<text x="18" y="{ymid}" text-anchor="middle" font-size="13" {FONT} fill="#333" '
        f'transform="rotate(-90 18 {ymid})">{escape(ylabel)}</text>',
    ]


def _no_data(area) -> list[str]:
    x0, x1, y0, y1 = area
    return [
        f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#888"/>',
        f'<text x="{(x0 + x1) / 2}" y="{(y0 + y1) / 2}" text-anchor="middle" '
        f'dominant-baseline="middle" font-size="14" {FONT} fill="#888">no data</text>',
    ]


def _lines(runs: dict, px, py, area) -> list[str]:
    """A polyline per segment, plus a dot per point for short series and lone points."""
    x0, x1, y0, y1 = area
    out = [f'<clipPath id="plot-area"><rect x="{x0}" y="{y0}" width="{x1 - x0}" '
           f'height="{y1 - y0}"/></clipPath>',
           '<g clip-path="url(#plot-area)" fill="none" stroke-width="1.8" '
           'stroke-linejoin="round" stroke-linecap="round">']
    for i, segs in enumerate(runs.values()):
        color, dotted = COLORS[i % len(COLORS)], _dotted(segs)
        for seg in segs:
            pts = " ".join(f"{px(x):.2f},{py(y):.2f}" for x, y in seg)
            if len(seg) > 1:
                out.append(f'<polyline points="{pts}" stroke="{color}"/>')
            if dotted or len(seg) == 1:
                out += [f'<circle cx="{px(x):.2f}" cy="{py(y):.2f}" r="3" fill="{color}" stroke="none"/>'
                        for x, y in seg]
    out.append("</g>")
    return out


def _grid_and_ticks(xticks, yticks, px, py, area) -> list[str]:
    x0, x1, y0, y1 = area
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    out = ['<g stroke="#e6e6e6" stroke-width="1">']
    out += [f'<line x1="{px(t):.2f}" y1="{y0}" x2="{px(t):.2f}" y2="{y1}"/>' for t in xticks]
    out += [f'<line x1="{x0}" y1="{py(t):.2f}" x2="{x1}" y2="{py(t):.2f}"/>' for t in yticks]
    out.append("</g>")
    out.append(f'<g font-size="11" {FONT} fill="#444">')
    out += [f'<text x="{px(t):.2f}" y="{y1 + 17}" text-anchor="middle">{_tick_label(t, xstep)}</text>'
            for t in xticks]
    out += [f'<text x="{x0 - 7}" y="{py(t) + 4:.2f}" text-anchor="end">{_tick_label(t, ystep)}</text>'
            for t in yticks]
    out.append("</g>")
    out.append('<g stroke="#444" stroke-width="1">')
    out += [f'<line x1="{px(t):.2f}" y1="{y1}" x2="{px(t):.2f}" y2="{y1 + 5}"/>' for t in xticks]
    out += [f'<line x1="{x0 - 5}" y1="{py(t):.2f}" x2="{x0}" y2="{py(t):.2f}"/>' for t in yticks]
    out.append("</g>")
    return out


def _legend(names: list[str], dotted: list[bool], right: float, top: float) -> list[str]:
    """A boxed legend in the top-right corner of the plot area (loss curves fall, so it is free)."""
    if not names:
        return []
    width = 44 + 7.2 * max(len(str(n)) for n in names)  # ~7.2 px per character at 12 px
    height, x, y = 10 + 20 * len(names), right - 10, top + 10
    out = [f'<rect x="{x - width:.1f}" y="{y}" width="{width:.1f}" height="{height}" rx="3" '
           f'fill="white" fill-opacity="0.9" stroke="#bbb"/>']
    for i, name in enumerate(names):
        color, cy = COLORS[i % len(COLORS)], y + 15 + 20 * i
        out.append(f'<line x1="{x - width + 10:.1f}" y1="{cy}" x2="{x - width + 32:.1f}" y2="{cy}" '
                   f'stroke="{color}" stroke-width="2.5"/>')
        if dotted[i]:
            out.append(f'<circle cx="{x - width + 21:.1f}" cy="{cy}" r="3" fill="{color}"/>')
        out.append(f'<text x="{x - width + 38:.1f}" y="{cy + 4}" font-size="12" {FONT} '
                   f'fill="#222">{escape(str(name))}</text>')
    return out


def write_loss_svg(path, metrics_rows: list[dict], title: str = "loss") -> None:
    """Plot train_loss and val_loss against step from metrics rows; write atomically.

    Rows without a value (missing key or null) are skipped, so a val_loss
    measured every few hundred steps is one connected line.
    """
    series = {}
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        series[label] = [(row["step"], row[key]) for row in metrics_rows
                         if row.get(key) is not None and row.get("step") is not None]
    atomic_write_text(path, loss_svg(series, title))


def stacked_svg(documents: list[str]) -> str:
    """SVG documents (each WIDTH x HEIGHT, as loss_svg draws them) one above the other, as one
    document: each becomes a nested <svg> element placed `y` pixels down."""
    inner = []
    for i, doc in enumerate(documents):
        body = doc[doc.index(">") + 1:doc.rindex("</svg>")]  # drop the outer <svg ...> and </svg>
        body = body.replace("plot-area", f"plot-area-{i}")  # ids are unique per document
        inner.append(f'<svg x="0" y="{i * HEIGHT}" width="{WIDTH}" height="{HEIGHT}">{body}</svg>')
    height = HEIGHT * max(1, len(documents))
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}">')
    return "\n".join([head, *inner, "</svg>"]) + "\n"


def running_mean(values: list, window: int) -> list:
    """Mean of each value and the window - 1 before it (fewer at the start).

    >>> running_mean([1, 3, 5, 7], 2)
    [1.0, 2.0, 4.0, 6.0]
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


LOAD_WINDOW = 25  # steps averaged in the expert-load plot: one step's shares are noisy


def write_expert_load_svg(path, metrics_rows: list[dict], window: int = LOAD_WINDOW) -> None:
    """Plot each expert's share of the routed tokens against step, one panel per block
    with experts, from the rows' "expert_load" ({block: [share of expert 0, 1, ...]}); write atomically.

    Each line is the running mean over `window` steps. A reference series "1/E" marks
    perfect balance. Rows without the key are skipped.
    """
    rows = [r for r in metrics_rows if isinstance(r.get("expert_load"), dict) and r.get("step") is not None]
    blocks = list(rows[-1]["expert_load"]) if rows else []
    panels = []
    for block in blocks:
        n_expert = len(rows[-1]["expert_load"][block])
        have = [r for r in rows if block in r["expert_load"]]
        steps = [r["step"] for r in have]
        series = {f"expert {e}": list(zip(steps, running_mean([r["expert_load"][block][e] for r in have], window)))
                  for e in range(n_expert)}
        series["1/E"] = [(steps[0], 1 / n_expert), (steps[-1], 1 / n_expert)]
        title = f"expert load, {block}" + (f" (mean over {window} steps)" if window > 1 else "")
        panels.append(loss_svg(series, title, ylabel="share of routed tokens"))
    atomic_write_text(path, stacked_svg(panels or [loss_svg({}, "expert load")]))
