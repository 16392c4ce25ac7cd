"""The bug catalogue: injection and restoration, which check catches each bug, the command,
tinygen.testing's mutation-testing context manager, and docs/bugs.md (produced by these reports)."""
import os
import re
from pathlib import Path

import numpy as np
import pytest

import tinygen.attention
import tinygen.layers
import tinygen.model
from tinygen import GPT
from tinygen.bug_checks import CONFIG, bug_report, run_checks
from tinygen.bugs import BUGS, get, inject
from tinygen.cli import main
from tinygen.errors import TinygenError
from tinygen.testing import inject_bug

DOC = Path(__file__).resolve().parent.parent / "docs" / "bugs.md"

# bug -> the kinds of check that catch it (the others must miss it): the point of the catalogue
CAUGHT_BY = {
    "linear-bias-mean": {"gradcheck", "property"},
    "embedding-buffered": {"gradcheck", "property"},
    "layernorm-no-projection": {"gradcheck"},
    "gelu-erf": {"oracle"},
    "dropout-no-rescale": {"property"},
    "attention-no-scale": {"oracle"},
    "softmax-no-max": {"property"},
    "causal-mask-off": {"oracle", "property"},
    "cross-entropy-no-mean": {"gradcheck", "property"},
    "wpe-grad-mean": {"gradcheck", "property"},
    "tied-head-missing": {"gradcheck"},
    "adam-no-bias-correction": {"oracle", "property"},
}


@pytest.fixture(scope="module")
def reports():
    return {b.name: bug_report(b.name) for b in BUGS}


def test_catalogue_has_at_least_ten_bugs_and_expectations_for_each():
    assert len(BUGS) >= 10 and set(CAUGHT_BY) == {b.name for b in BUGS}
    assert len({b.name for b in BUGS}) == len(BUGS)


def test_no_check_fails_without_a_bug():
    assert not [o for o in run_checks() if o.caught]


@pytest.mark.parametrize("name", list(CAUGHT_BY))
def test_which_checks_catch_each_bug(reports, name):
    _, outcomes = reports[name]
    caught = {o.kind for o in outcomes if o.caught}
    assert caught == CAUGHT_BY[name], (name, [o for o in outcomes if o.caught])


def test_named_rows(reports):
    """The rows a learner should see: the layer's own gradcheck row, the causality property, the oracle."""
    def caught(name):
        return [o.name for o in reports[name][1] if o.caught]

    assert caught("embedding-buffered")[0] == "embedding: w"
    assert caught("layernorm-no-projection")[0] == "layernorm: x"
    assert caught("linear-bias-mean")[0] == "linear: b"
    assert caught("cross-entropy-no-mean")[0] == "cross-entropy: logits"
    assert "GPT (whole model): wpe.weight" in caught("wpe-grad-mean")
    assert caught("tied-head-missing") == ["GPT (whole model): wte.weight"]
    assert "causality of the logits" in caught("causal-mask-off")
    assert caught("gelu-erf")[0] == "logits vs the reference forward"


def test_injection_is_undone_even_on_error():
    before = (tinygen.layers.softmax, tinygen.attention.softmax, tinygen.model.gpt_backward,
              tinygen.layers.gelu_forward, tinygen.model.gelu_forward, tinygen.attention.causal_mask)
    with pytest.raises(RuntimeError):
        with inject("softmax-no-max", "gelu-erf", "causal-mask-off", "wpe-grad-mean"):
            assert tinygen.attention.softmax is tinygen.layers.softmax is not before[0]
            assert tinygen.model.gelu_forward is tinygen.layers.gelu_forward is not before[3]
            raise RuntimeError("boom")
    assert (tinygen.layers.softmax, tinygen.attention.softmax, tinygen.model.gpt_backward,
            tinygen.layers.gelu_forward, tinygen.model.gelu_forward, tinygen.attention.causal_mask) == before
    with pytest.raises(TinygenError, match="no bug called 'nope'"):
        get("nope")


def test_mutation_testing_with_tinygen_testing():
    """A user's own property test against tinygen passes, and fails under the bug it is about."""
    model = GPT(CONFIG, seed=0)
    idx = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, CONFIG.block_size))

    def my_causality_test():
        later = idx.copy()
        later[0, 4:] = (later[0, 4:] + 1) % CONFIG.vocab_size
        np.testing.assert_allclose(model.forward(later)[0, :4], model.forward(idx)[0, :4], atol=1e-12)

    my_causality_test()
    with inject_bug("causal-mask-off"):
        with pytest.raises(AssertionError):
            my_causality_test()
    my_causality_test()


def test_cli_break_list_and_one_bug(capsys):
    assert main(["gradcheck", "--break", "list"]) == 0
    out = capsys.readouterr().out
    assert all(b.name in out for b in BUGS)
    assert main(["gradcheck", "--break", "dropout-no-rescale"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"property +dropout keeps the mean +CATCHES", out)
    assert re.search(r"gradcheck +\d+ rows \(layers, whole model\) +misses", out)
    assert main(["gradcheck", "--break", "nope"]) == 2


def doc_blocks(text):
    """{bug name: the text block under its '## `name`' heading}."""
    return dict(re.findall(r"^## `([\w-]+)`.*?^```text\n(.*?)^```$", text, re.M | re.S))


def overview(reports):
    """The markdown table of docs/bugs.md: bug, the checks that catch it, the ones that miss it."""
    rows = ["| bug | caught by | missed by | exercise (tensor) |", "| --- | --- | --- | --- |"]
    for b in BUGS:
        outcomes = reports[b.name][1]
        kinds = list(dict.fromkeys(o.kind for o in outcomes))
        caught = [k for k in kinds if any(o.caught for o in outcomes if o.kind == k)]
        first = {k: next(o.name for o in outcomes if o.kind == k and o.caught) for k in caught}
        rows.append(f"| `{b.name}`: {b.title} | " + "; ".join(f"{k}: {first[k]}" for k in caught)
                    + f" | {', '.join(k for k in kinds if k not in caught)} | {b.exercise} ({b.tensor}) |")
    return "\n".join(rows)


def test_docs_bugs_md_shows_every_report_as_produced(reports):
    """docs/bugs.md holds each bug's report exactly; TINYGEN_WRITE_DOCS=1 rewrites the blocks."""
    text = DOC.read_text(encoding="utf-8")
    table = "<!-- overview -->\n" + overview(reports) + "\n<!-- /overview -->"
    if os.environ.get("TINYGEN_WRITE_DOCS"):
        text = re.sub(r"<!-- overview -->.*?<!-- /overview -->", lambda m: table, text, flags=re.S)
        for name, (report, _) in reports.items():
            text = re.sub(rf"(^## `{re.escape(name)}`.*?^```text\n)(.*?)(^```$)",
                          lambda m: m.group(1) + report + "\n" + m.group(3), text, count=1, flags=re.M | re.S)
        DOC.write_text(text, encoding="utf-8")
    assert table in text, "docs/bugs.md's overview is out of date: TINYGEN_WRITE_DOCS=1 pytest tests/test_bugs.py"
    blocks = doc_blocks(text)
    assert list(blocks) == [b.name for b in BUGS]
    for name, (report, _) in reports.items():
        assert blocks[name] == report + "\n", f"docs/bugs.md is out of date for {name}: TINYGEN_WRITE_DOCS=1 pytest tests/test_bugs.py"
