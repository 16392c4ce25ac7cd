"""The bug catalogue: injection and restoration, which check catches each bug, the command,
tinygen.testing's mutation-testing context manager, and docs/bugs.md (produced by these reports)."""
import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pytest

import tinygen.attention
import tinygen.layers
import tinygen.model
import tinygen.parts
from tinygen import GPT
from tinygen.bug_checks import CONFIG, bug_report, run_checks
from tinygen.bugs import BUGS, get, inject
from tinygen.cli import main
from tinygen.errors import TinygenError
from tinygen.finetuning.adapters import ADAPTER, init_adapters
from tinygen.finetuning.lora import LoraSpec, init_lora, lora_linear
from tinygen.finetuning.prompt_tuning import init_prompt, prompt_embed
from tinygen.model import init_params
from tinygen.parts import GPT2
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
              tinygen.layers.gelu_forward, tinygen.parts.gelu_forward, tinygen.attention.causal_mask)
    with pytest.raises(RuntimeError):
        with inject("softmax-no-max", "gelu-erf", "causal-mask-off", "wpe-grad-mean"):
            assert tinygen.attention.softmax is tinygen.layers.softmax is not before[0]
            assert tinygen.parts.gelu_forward is tinygen.layers.gelu_forward is not before[3]
            raise RuntimeError("boom")
    assert (tinygen.layers.softmax, tinygen.attention.softmax, tinygen.model.gpt_backward,
            tinygen.layers.gelu_forward, tinygen.parts.gelu_forward, tinygen.attention.causal_mask) == before
    with pytest.raises(TinygenError, match="no bug called 'nope'"):
        get("nope")


def finetuned(config):
    """A model carrying LoRA, adapters and prompt tuning at once, their zero halves made nonzero."""
    rng = np.random.default_rng(1)
    params = init_params(config, rng)
    spec = LoraSpec(rank=2, alpha=4.0, targets=("c_attn", "c_proj", "c_fc"))
    params.update(init_lora(params, spec, rng))
    params.update(init_adapters(config.n_layer, config.n_embd, 3, rng, np.float64))
    params.update(init_prompt(params["wte.weight"], 2, rng))
    for k in params:
        if k.endswith(("lora_B", "up.weight", "up.bias")):
            params[k] = params[k] + rng.normal(0, 0.3, params[k].shape)
    parts = GPT2._replace(linear=lora_linear(spec, GPT2.linear), branch=ADAPTER, embed=prompt_embed(GPT2.embed))
    return GPT(config, params=params, parts=parts)


# every bug in the model's forward or backward (softmax-no-max changes float64 results by rounding
# only, adam-no-bias-correction lives in the optimizer)
MODEL_PATH_BUGS = [b.name for b in BUGS if b.name not in ("softmax-no-max", "adam-no-bias-correction")]


@pytest.mark.parametrize("which", ["plain", "LoRA + adapters + prompt"])
def test_every_model_path_bug_reaches_the_parts_the_model_calls(which):
    """The parts (tinygen.parts, the fine-tuning methods' parts) call what the bug replaced: under
    each bug, loss_and_grads (with dropout) of the plain model and of a model with every method differ."""
    config = dataclasses.replace(CONFIG, n_layer=1, dropout=0.2)
    model = GPT(config, seed=0) if which == "plain" else finetuned(config)
    idx = np.random.default_rng(0).integers(0, config.vocab_size, (2, 6))
    idx[0, :3] = idx[1, 0]  # repeated ids

    def run():
        # one stream: shards of one row each would hide the bugs that confuse a sum over the batch with a mean
        loss, grads = model.loss_and_grads(idx, np.roll(idx, -1, 1), rng=np.random.default_rng(5), workers=1)
        return np.concatenate([[loss]] + [grads[k].ravel() for k in sorted(grads)])

    clean = run()
    for name in MODEL_PATH_BUGS:
        with inject(name):
            buggy = run()
        assert np.max(np.abs(buggy - clean)) > 1e-8, f"{name} does not reach the {which} model"
    np.testing.assert_array_equal(run(), clean)


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
    assert re.search(r"gradcheck +\d+ rows \(layers, block, whole model\) +misses", out)
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
