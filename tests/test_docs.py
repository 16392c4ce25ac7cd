"""The docs cannot drift from the code.

- Every ```python block in docs/*.md runs: each file's blocks in order, in one
  fresh namespace, with the working directory a fresh temporary directory.
  Use ```text for output and for snippets that are not meant to run.
- A ```text block right after a ```python block is that block's output: what the
  block prints must be exactly the text (trailing spaces aside); and a line
  `print(...)  # text` must print exactly that text.
- A fenced block right after `<!-- code: tinygen.module.function -->` quotes that
  function: every line of it must be a line of the function's source (trailing
  comments aside: the quote may leave them out or explain with its own).
- Every path (tinygen/..., tests/..., docs/..., benchmarks/...) and every dotted
  name (tinygen.x.y) that README.md, docs/*.md or tinygen's docstrings mention exists.
- README's tables: the module table covers every module of tinygen/, the command
  table says which commands take --seed exactly as the parser does.
- Every speed ratio quoted anywhere is one measured in docs/performance.md.
- Every docs page is on the learning path (docs/README.md): it says what it assumes and
  where it sits, and the path links it.
"""
import contextlib
import inspect
import io
import json
import re
import sys
from pathlib import Path

import pytest

from test_architecture import PENDING_MODULES, resolve
from tinygen.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
QUOTE = re.compile(r"<!-- code: ([\w.]+) -->\s*\n```\w*[ \t]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def fenced_blocks(text):
    """[(language, first line number of the body, body, adjacent)] of every fenced block,
    `adjacent` meaning that only blank lines separate it from the block before.

    >>> fenced_blocks("a\\n```python\\nx = 1\\n```\\n\\n```text\\n1\\n```\\n")
    [('python', 3, 'x = 1\\n', False), ('text', 7, '1\\n', True)]
    """
    blocks, previous_end = [], None
    for m in FENCE.finditer(text):
        adjacent = previous_end is not None and text[previous_end:m.start()].strip() == ""
        blocks.append((m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2), adjacent))
        previous_end = m.end()
    return blocks


def python_blocks(text):
    """[(line number, source)] of every ```python fenced block in a markdown text.

    >>> python_blocks("a\\n```python\\nx = 1\\n```\\n")
    [(3, 'x = 1\\n')]
    """
    return [(line, body) for lang, line, body, _ in fenced_blocks(text) if lang == "python"]


def test_python_blocks_extraction():
    text = "# t\n```python\nx = 1\n```\n\n```text\nnot run\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = x\n")]


def normalized(text):
    """Lines without trailing spaces, without trailing blank lines."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def shows(shown, printed):
    """True when the text block `shown` is what was `printed`; as in a doctest with
    ELLIPSIS, "..." in a line stands for any text on it (a measured number), and a
    line of just "..." for any number of lines.

    >>> shows("error ... > 1e-10", "error 1.8e-09 > 1e-10"), shows("a\\n...", "a\\nb\\nc"), shows("a\\nb", "a")
    (True, True, False)
    """
    lines = ["(?:[^\\n]*\\n)*[^\\n]*" if line == "..." else "[^\\n]*?".join(map(re.escape, line.split("...")))
             for line in normalized(shown).splitlines()]
    return re.fullmatch("\\n".join(lines), normalized(printed)) is not None


PRINT_WITH_OUTPUT = re.compile(r"^print\(.*\)[ \t]+# (.+)$")  # a top-level print(...) with its output as comment


def run_markdown(path):
    """Execute the python blocks of one markdown file, in order, in one fresh namespace;
    check each block's output against the ```text block right after it, if there is one,
    and each `print(...)  # output` line against its comment."""
    printed = {}  # line number in the .md file -> what print() called there printed

    def recording_print(*args, **kwargs):
        text = io.StringIO()
        builtins_print(*args, **{**kwargs, "file": text})
        printed[sys._getframe(1).f_lineno] = printed.get(sys._getframe(1).f_lineno, "") + text.getvalue()
        builtins_print(*args, **kwargs)

    builtins_print = print
    namespace = {"__name__": f"docs_{path.stem}", "print": recording_print}
    blocks = fenced_blocks(path.read_text(encoding="utf-8"))
    for i, (lang, line, source, _) in enumerate(blocks):
        if lang != "python":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            # padding with blank lines makes tracebacks point at the line in the .md file
            exec(compile("\n" * (line - 1) + source, str(path), "exec"), namespace)
        for number, code in enumerate(source.splitlines(), start=line):
            match = PRINT_WITH_OUTPUT.match(code)
            if match:
                assert printed.get(number, "").rstrip("\n") == match.group(1).rstrip(), (
                    f"{path.name}:{number}: prints {printed.get(number)!r}, the comment says {match.group(1)!r}")
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text" and blocks[i + 1][3]:
            shown = blocks[i + 1][2]
            assert shows(shown, out.getvalue()), (
                f"{path.name}:{blocks[i + 1][1] - 1}: the text block is not what the python block at line {line} "
                f"prints.\n--- printed:\n{out.getvalue()}--- shown:\n{shown}")
    return namespace


def test_failures_name_the_file_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# p\n```python\nx = 1\n```\ntext\n```python\ny = x\nz = y / 0\n```\n")
    with pytest.raises(ZeroDivisionError) as info:
        run_markdown(page)
    assert (info.traceback[-1].path, info.traceback[-1].lineno + 1) == (page, 8)


def test_print_comments_must_match(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 2\nprint(x + 1)      # 3\nprint('a', x)  # a 2\n```\n")
    run_markdown(page)
    page.write_text("```python\nx = 2\nprint(x + 1)      # 4\n```\n")
    with pytest.raises(AssertionError, match="page.md:3: prints '3\\\\n', the comment says '4'"):
        run_markdown(page)


def test_output_blocks_must_match(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nprint(1 + 1)\n```\n\n```text\n2\n```\n")
    run_markdown(page)
    page.write_text("```python\nprint(1 + 1)\n```\n\n```text\n3\n```\n")
    with pytest.raises(AssertionError, match="page.md:5: the text block is not what"):
        run_markdown(page)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_docs_code_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_markdown(path)


# ------------------------------------------------------------------ quoted code
def quotes():
    return [(path, name, body) for path in PAGES + [README]
            for name, body in QUOTE.findall(path.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("path, name, body", quotes(), ids=lambda v: getattr(v, "name", str(v))[:40])
def test_quoted_code_is_the_code(path, name, body):
    def code(line):
        return line.split("  #")[0].strip()  # a line without its trailing comment

    source = {code(line) for line in inspect.getsource(resolve(name)).splitlines()}
    missing = [line for line in body.splitlines() if code(line) and code(line) not in source]
    assert not missing, f"{path.name} quotes lines that are not in {name}: {missing}"


def test_some_code_is_quoted():
    assert {name for _, name, _ in quotes()} >= {"tinygen.layers.layernorm_backward",
                                                 "tinygen.attention.attend_backward"}


# ------------------------------------------------------------------ paths and names
PATH = re.compile(r"(?<![\w/.])((?:tinygen|tests|docs|benchmarks)/[\w/.-]*\w)")
DOTTED = re.compile(r"(?<![\w/.])(tinygen(?:\.[A-Za-z_]\w*)+)")


def mentions(pattern):
    """(file, mention) for README.md, docs/*.md, and the docstrings and comments of tinygen/."""
    files = PAGES + [README] + sorted((ROOT / "tinygen").rglob("*.py"))
    return sorted({(str(path.relative_to(ROOT)), m) for path in files
                   for m in pattern.findall(path.read_text(encoding="utf-8"))})


def pending(module_path):
    """True for a tinygen path another branch adds (tests/test_architecture.PENDING_MODULES)."""
    dotted = module_path.removesuffix(".py").replace("/", ".")
    return any(dotted == p or dotted.startswith(p + ".") for p in PENDING_MODULES)


@pytest.mark.parametrize("page, mentioned", mentions(PATH))
def test_every_path_mentioned_exists(page, mentioned):
    if pending(mentioned):
        pytest.skip(f"{mentioned} is added by another branch (PENDING_MODULES)")
    assert (ROOT / mentioned).exists(), f"{page} mentions {mentioned}, which does not exist"


@pytest.mark.parametrize("page, mentioned", mentions(DOTTED))
def test_every_dotted_name_mentioned_exists(page, mentioned):
    if pending(mentioned):
        pytest.skip(f"{mentioned} is added by another branch (PENDING_MODULES)")
    resolve(mentioned)


LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text):
    """Markdown without its fenced blocks and inline code, where `x[i](T)` is code, not a link."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE))


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page, link", sorted({(path, link) for path in PAGES + [README]
                                              for link in LINK.findall(prose(path.read_text(encoding="utf-8")))
                                              if not link.startswith(("http://", "https://"))}),
                         ids=str)
def test_every_link_and_anchor_exists(page, link):
    target, _, anchor = link.partition("#")
    path = (page.parent / target).resolve() if target else page
    assert path.exists(), f"{page.name} links to {link}"
    if anchor:
        headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
        assert anchor in {slug(h) for h in headings}, f"{page.name} links to {link}: no such heading"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "README.md"], ids=lambda p: p.name)
def test_every_page_is_on_the_learning_path(page):
    """docs/README.md is the learning path: every page opens with what it assumes and where it
    sits in the path (its second line), and the path links every page."""
    second = page.read_text(encoding="utf-8").splitlines()[1]
    assert second.startswith("> Assumes:") and "[learning path](README.md)" in second, (page.name, second)
    assert f"]({page.name})" in (DOCS / "README.md").read_text(encoding="utf-8"), f"docs/README.md never links {page.name}"


# ------------------------------------------------------------------ README's tables
def readme_table(first_header):
    """Rows (lists of cells) of README's markdown table whose first header cell is `first_header`."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_readme_module_table_follows_the_layout():
    """Every module of tinygen/ is in README's module table, in a row of its own directory;
    the table names nothing else."""
    named = set()
    for cells in readme_table("module"):
        directory = ""
        for name in re.findall(r"`([\w/.]+)`", cells[0]):
            if name.startswith("tinygen/"):
                name = name.removeprefix("tinygen/")
                directory = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
                named.add(name)
            else:
                named.add(directory + name)
    actual = {str(p.relative_to(ROOT / "tinygen")) for p in (ROOT / "tinygen").rglob("*.py")
              if p.name not in ("__init__.py", "__main__.py")}
    actual |= {m.removeprefix("tinygen.").replace(".", "/") + ".py" for m in PENDING_MODULES}
    assert named == actual, (sorted(named - actual), sorted(actual - named))


def test_readme_command_table_says_which_commands_take_seed():
    parser = build_parser()
    commands = {}

    def walk(p, path):
        subs = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            commands[path] = "--seed" in [o for a in p._actions for o in a.option_strings]
        for sub in subs:
            for name, child in sub.choices.items():
                walk(child, f"{path} {name}")

    walk(parser, "tinygen")
    table = {cells[0].strip("`"): cells[2] for cells in readme_table("command")}
    assert set(table) == set(commands)
    assert {c: table[c] == "yes" for c in table} == commands
    assert all(table[c] in ("yes", "no") for c in table)


def test_measured_ratios_live_in_performance_md():
    """docs/performance.md is the one place measurements live: every speed ratio ("4.66x")
    quoted in README.md or another page is one measured there."""
    performance = (DOCS / "performance.md").read_text(encoding="utf-8")
    quoted = [(path.name, r) for path in PAGES + [README] if path.name != "performance.md"
              for r in re.findall(r"(?<![\w.])(\d[\d,]*\.?\d*)x\b", path.read_text(encoding="utf-8"))]
    assert len([r for page, r in quoted if page == "README.md"]) >= 8
    for page, ratio in quoted:
        assert re.search(rf"(?<![\d.,]){re.escape(ratio)}(?![\d])", performance), f"{page} quotes {ratio}x"


# ------------------------------------------------------------------ outputs of long runs
# Pages show outputs of runs too long for the test suite (a pretraining run, its log and
# progress line, a failing command). Their numbers are the run's; their shape is checked
# against what the code prints, numbers replaced by N.
def shape(text):
    return re.sub(r"\d+(\.\d+)?", "N", text)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(stdout, metrics rows, run directory) of a 4-step training run."""
    import numpy as np

    from tinygen import GPT
    from tinygen.data import RandomBatches, fixed_batches
    from tinygen.plumbing.metrics import read_metrics
    from tinygen.train import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("run")
    config = TrainConfig(vocab_size=32, block_size=8, n_layer=1, n_head=1, n_embd=8, batch_size=2,
                         max_steps=4, warmup_steps=1, eval_interval=2, eval_batches=1, checkpoint_interval=4)
    ids = np.random.default_rng(0).integers(0, 32, 500).astype(np.uint16)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(GPT(config.model_config(32)), RandomBatches(ids, 2, 8, 0), config, run_dir,
              val_batches=fixed_batches(ids, 1, 2, 8, 0), progress=False)
    return out.getvalue(), read_metrics(run_dir / "metrics.jsonl"), run_dir


def test_training_md_metrics_row_has_the_loops_keys(tiny_run):
    text = (DOCS / "training.md").read_text(encoding="utf-8")
    shown = json.loads(re.search(r"```text\n(\{\"step\".*?\})\n```", text, re.DOTALL).group(1).replace("\n", " "))
    _, rows, _ = tiny_run
    assert all(list(row) == list(shown) for row in rows)


def test_training_md_evaluation_line_is_the_loops(tiny_run):
    text = (DOCS / "training.md").read_text(encoding="utf-8")
    shown = re.search(r"Evaluations print `(step [^`]*)`", text).group(1)
    printed, _, _ = tiny_run
    evaluations = [line for line in printed.splitlines() if "train loss" in line]  # step 0 has no train loss yet
    assert evaluations and all(shape(line) == shape(shown) for line in evaluations), (shown, evaluations)


def test_training_md_run_directory_is_what_checkpoint_names(tiny_run):
    from tinygen import checkpoint
    from tinygen.plumbing.rundir import LOCK_FILE

    text = (DOCS / "training.md").read_text(encoding="utf-8")
    listing = re.search(r"```text\nRUN_DIR/\n(.*?)```", text, re.DOTALL).group(1)
    shown = {line.split()[0].rstrip("/") for line in listing.splitlines() if line.strip()}
    names = {checkpoint.CONFIG, checkpoint.MODEL, checkpoint.TOKENIZER, checkpoint.TRAIN_CONFIG,
             checkpoint.TRAIN_STATE, checkpoint.METRICS, checkpoint.LOSS_SVG, checkpoint.DATA_DIR, LOCK_FILE}
    assert shown == names
    _, _, run_dir = tiny_run  # the loop alone writes the model, train state, metrics and curve
    written = {p.name for p in run_dir.iterdir()}
    assert {checkpoint.CONFIG, checkpoint.MODEL, checkpoint.TRAIN_STATE, checkpoint.METRICS,
            checkpoint.LOSS_SVG} <= written <= shown


def test_training_md_progress_line_is_progress_lines():
    import time

    from tinygen.plumbing.progress import Progress

    text = (DOCS / "training.md").read_text(encoding="utf-8")
    shown = re.search(r"one line redraws in place:\n\n```text\n(.*?)\n```", text).group(1)
    progress = Progress(total=600, desc="step", unit="step", stream=io.StringIO())  # as the loop makes it
    progress.t0 = time.perf_counter() - 115.0  # 1m55s ago
    progress.done = 312
    progress.fields = {"loss": 3.284, "tok/s": "5.6k"}
    assert progress.line() == shown


def test_training_md_encoding_error_is_the_commands(tmp_path, capsys):
    text = (DOCS / "training.md").read_text(encoding="utf-8")
    shown = re.search(r"```text\n(tinygen pretrain: error: .*?)\n```", text).group(1)
    bad = tmp_path / "data" / "notes.txt"
    bad.parent.mkdir()
    bad.write_bytes(b"a" * 5120 + b"\xff")
    from tinygen.cli import main

    assert main(["pretrain", "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().replace(str(bad), "data/notes.txt") == shown
