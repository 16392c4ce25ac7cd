"""Every ```python block in docs/*.md runs: each file's blocks in order, in one
fresh namespace, with the working directory a fresh temporary directory.
Use ```text for output and for snippets that are not meant to run."""
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(text):
    """[(line number, source)] of every ```python fenced block in a markdown text.

    >>> python_blocks("a\\n```python\\nx = 1\\n```\\n")
    [(3, 'x = 1\\n')]
    """
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_python_blocks_extraction():
    text = "# t\n```python\nx = 1\n```\n\n```text\nnot run\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = x\n")]


def run_markdown(path):
    """Execute the python blocks of one markdown file, in order, in one fresh namespace."""
    namespace = {"__name__": f"docs_{path.stem}"}
    for line, source in python_blocks(path.read_text(encoding="utf-8")):
        # padding with blank lines makes tracebacks point at the line in the .md file
        exec(compile("\n" * (line - 1) + source, str(path), "exec"), namespace)
    return namespace


def test_failures_name_the_file_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# p\n```python\nx = 1\n```\ntext\n```python\ny = x\nz = y / 0\n```\n")
    with pytest.raises(ZeroDivisionError) as info:
        run_markdown(page)
    assert (info.traceback[-1].path, info.traceback[-1].lineno + 1) == (page, 8)


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_code_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_markdown(path)
