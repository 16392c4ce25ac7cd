"""Golden fixtures (tinygen.fixtures, `tinygen fixtures`) and the checker of docs/fixtures.md.

The checker is taken from the doc as it is printed there (under 40 lines, json and NumPy
only) and run on freshly written fixtures, float64 and float32, with tinygen's own layers,
block, model, processors and tokenizer as the implementation: every case passes. Then a
deliberately broken layer fails, and only where it is broken.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import tinygen.layers as layers
from tinygen import GPT, GPTConfig
from tinygen.cli.main import main
from tinygen.errors import TinygenError
from tinygen.fixtures import TEXTS, write_fixtures
from tinygen.gradient_check import LayerCase, layer_cases
from tinygen.model import block_backward, block_forward
from tinygen.parts import make_context
from tinygen.plumbing.safetensors import load_file
from tinygen.sampling import min_p_filter, penalize_repeats, process_logits, temperature_scale, top_k_filter, top_p_filter
from tinygen.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "fixtures.md"


def checker_source() -> str:
    """The python block right after `<!-- checker -->` in docs/fixtures.md."""
    m = re.search(r"<!-- checker -->\s*\n```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M)
    return m.group(1)


def checker() -> dict:
    namespace = {}
    exec(checker_source(), namespace)
    return namespace


def test_the_checker_is_under_40_lines_of_json_and_numpy():
    source = checker_source()
    assert len(source.splitlines()) < 40
    imports = set(re.findall(r"^(?:import|from) (\w+)", source, re.M))
    assert imports == {"json", "numpy"}


# ------------------------------------------------------------------ tinygen as the implementation
def scalar(a):
    return a.item() if isinstance(a, np.ndarray) and a.ndim == 0 else a


def as_float(up):
    """Cast floating inputs to `up` (None: keep them): float64 arithmetic on float32 fixtures."""
    return lambda a: a.astype(up) if up is not None and isinstance(a, np.ndarray) and a.dtype.kind == "f" else a


def layer(case: LayerCase, up=None):
    """A LayerCase as an implementation: inputs in the manifest's order are forward's positional
    arguments, then its options, then dout."""
    cast = as_float(up)

    def implementation(inputs):
        names = [n for n in inputs if n != "dout"]
        args = [cast(inputs[n]) for n in names[:len(case.args)]]
        out, cache = case.forward(*args, **{k: scalar(cast(inputs[k])) for k in names[len(case.args):]})
        dout = cast(inputs["dout"])
        grads = case.backward(dout if np.ndim(out) else float(dout), cache)
        return {"out": out, **{f"grad.{n}": g for n, g in zip(case.names, grads)}}

    return implementation


def block(up=None):
    cast = as_float(up)

    def implementation(inputs):
        x, dout = cast(inputs["x"]), cast(inputs["dout"])
        params = {k: cast(v) for k, v in inputs.items() if k.startswith("h.")}
        config = GPTConfig(vocab_size=7, block_size=x.shape[1], n_layer=1, n_head=int(inputs["n_head"]),
                           n_embd=x.shape[2], dtype=x.dtype.name)
        out, cache = block_forward(x, params, 0, make_context(config))
        dx, grads = block_backward(dout, cache)
        return {"out": out, "grad.x": dx, **{"grad." + k: g for k, g in grads.items()}}

    return implementation


def model(up=None):
    cast = as_float(up)

    def implementation(inputs):
        params = {k: cast(v) for k, v in inputs.items() if k not in ("idx", "targets", "n_head")}
        (V, C), T = params["wte.weight"].shape, params["wpe.weight"].shape[0]
        L = sum(k.endswith("ln_1.weight") for k in params)
        gpt = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=int(inputs["n_head"]), n_embd=C,
                            dtype=params["wte.weight"].dtype.name), params=params)
        loss, grads = gpt.loss_and_grads(inputs["idx"], inputs["targets"])
        return {"logits": gpt.forward(inputs["idx"]), "loss": loss, **{"grad." + k: g for k, g in grads.items()}}

    return implementation


def processors():
    """Each sampler case: tinygen's processor on the inputs it is given."""
    def one(name, f):
        return lambda i: {"out." + name: f(i["logits"], *[scalar(v) for k, v in i.items() if k != "logits"])}

    def all_of(i):
        options = {k: scalar(v) for k, v in i.items() if k not in ("logits", "ids")}
        return {"out.all_processors_transformers_order": process_logits(i["logits"], i["ids"], **options)}

    return {"repetition penalty": one("repetition_penalty", penalize_repeats),
            "temperature": one("temperature", temperature_scale), "top-k": one("top_k", top_k_filter),
            "top-p": one("top_p", top_p_filter), "min-p": one("min_p", min_p_filter),
            "all processors (transformers' order)": all_of}


def tokenizer(tmp_path):
    """GPT-2's files from the case's vocabulary and merges, read by Tokenizer.from_gpt2."""
    def implementation(i):
        (tmp_path / "vocab.json").write_text(json.dumps(i["vocab"]), encoding="utf-8")
        (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(i["merges"]) + "\n", encoding="utf-8")
        tok = Tokenizer.from_gpt2(tmp_path / "vocab.json", tmp_path / "merges.txt", pattern=i["pattern"])
        assert tok.special_tokens == i["special_tokens"]
        special = re.compile("(" + "|".join(map(re.escape, i["special_tokens"])) + ")")
        chunks = [[c for k, p in enumerate(special.split(t)) for c in ([p] if k % 2 else tok.split(p))]
                  for t in i["texts"]]
        return {"chunks": chunks, "ids": [tok.encode(t, allowed_special="all") for t in i["texts"]]}

    return implementation


def tinygen_implementations(tmp_path, up=None):
    impls = {case.name: layer(case, up) for case in layer_cases(np.random.default_rng(0))}
    return {**impls, "block": block(up), "model": model(up), **processors(), "tokenizer": tokenizer(tmp_path)}


@pytest.fixture(scope="module", params=["float64", "float32"])
def fixtures(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fixtures-" + request.param)
    manifest = write_fixtures(directory, seed=0, dtype=request.param)
    return directory, manifest


def test_tinygen_passes_its_own_fixtures_with_the_doc_checker(fixtures, tmp_path):
    directory, manifest = fixtures
    impls = tinygen_implementations(tmp_path)
    assert {case["name"] for case in manifest["cases"]} == set(impls)  # every case is exercised
    assert checker()["check"](str(directory), impls) == []


def test_every_layer_pair_of_the_gradient_check_table_is_a_fixture(fixtures):
    directory, manifest = fixtures
    names = [case["name"] for case in manifest["cases"]]
    assert [c.name for c in layer_cases(np.random.default_rng(0))] == names[:len(layer_cases(np.random.default_rng(0)))]
    assert {"block", "model", "top-p", "tokenizer"} <= set(names)
    layer_files = [c for c in manifest["cases"] if c["file"].startswith("layers/")]
    for case in layer_files:  # every gradient a backward returns, and a dropout mask where there is dropout
        grads = [k for k in case["expected"] if k.startswith("grad.")]
        assert grads and "out" in case["expected"] and "dout" in case["inputs"], case["name"]
        assert ("mask" in case["inputs"]) == ("dropout" in case["name"]), case["name"]


def test_a_broken_layer_fails_where_it_is_broken(fixtures, tmp_path):
    """layer norm's backward without the xhat term of dx: only layernorm's grad.x disagrees."""
    directory, _ = fixtures

    def broken_backward(dout, cache):
        dx, dw, db = layers.layernorm_backward(dout, cache)
        g = dout * cache.w
        return cache.rstd * (g - g.mean(axis=-1, keepdims=True)), dw, db

    impls = tinygen_implementations(tmp_path)
    case = next(c for c in layer_cases(np.random.default_rng(0)) if c.name == "layernorm")
    impls["layernorm"] = layer(case._replace(backward=broken_backward))
    assert checker()["check"](str(directory), impls) == ["layernorm: grad.x"]
    impls = tinygen_implementations(tmp_path)  # a forward off by 1e-3 of its scale: GELU's exact (erf) form
    impls["gelu"] = lambda i: {"out": 0.5 * i["x"] * (1 + np.vectorize(__import__("math").erf)(i["x"] / np.sqrt(2))),
                               "grad.x": layer(next(c for c in layer_cases(np.random.default_rng(0))
                                                    if c.name == "gelu"))(i)["grad.x"]}
    assert checker()["check"](str(directory), impls) == ["gelu: out"]
    impls = tinygen_implementations(tmp_path)  # layer norm with epsilon 1e-6: 1.4e-6 of the output's scale
    forward = lambda x, w, b: layers.layernorm_forward(x, w, b, eps=1e-6)  # noqa: E731
    impls["layernorm"] = layer(case._replace(forward=forward))
    found = checker()["check"](str(directory), impls)
    assert found == (["layernorm: out", "layernorm: grad.x", "layernorm: grad.w"] if fixtures[1]["dtype"] == "float64"
                     else [])


def test_the_checker_rejects_shapes_nans_and_misplaced_infinities():
    agrees = checker()["agrees"]
    want = np.array([[1.0, -np.inf], [2.0, 3.0]])
    assert agrees(want.copy(), want, 0.0) and agrees(want + [[1e-9, 0], [0, 0]], want, 1e-9)
    assert not agrees(want[:1], want, 1.0)
    assert not agrees(np.array([[1.0, 5.0], [2.0, 3.0]]), want, 1.0)  # finite where -inf is expected
    assert not agrees(np.array([[np.nan, -np.inf], [2.0, 3.0]]), want, 1.0)
    assert not agrees(want + [[1e-3, 0], [0, 0]], want, 1e-4)
    assert agrees([[1, 2]], [[1, 2]], 0.0) and not agrees([[1, 2]], [[2, 1]], 0.0)


def test_float32_fixtures_are_within_2e_6_of_float64_arithmetic(fixtures, tmp_path):
    """The measurement behind the tolerances (docs/fixtures.md): tinygen's float32 results against
    float64 arithmetic on the same float32 inputs, relative to each value's largest entry."""
    directory, manifest = fixtures
    if manifest["dtype"] != "float32":
        pytest.skip("float32 fixtures only")
    read = checker()["read_safetensors"]
    impls = tinygen_implementations(tmp_path, up=np.float64)
    worst = 0.0
    for case in manifest["cases"]:
        if case["file"].endswith(".safetensors") and "out.temperature" not in case["expected"] and case["tolerance"] > 1e-9:
            values = read(os.path.join(directory, case["file"]))
            got = impls[case["name"]]({k: values[k] for k in case["inputs"]})
            for k in case["expected"]:
                want = values[k].astype(np.float64)
                worst = max(worst, np.abs(np.asarray(got[k]) - want).max() / np.abs(want).max())
    assert 1e-8 < worst < 2e-6


def test_the_manifest_describes_the_files(fixtures):
    directory, manifest = fixtures
    assert manifest["format"] == "tinygen-fixtures" and manifest["dtype"] in ("float32", "float64")
    dtype = {"float64": "F64", "float32": "F32"}[manifest["dtype"]]
    for case in manifest["cases"]:
        path = directory / case["file"]
        doc, _, anchor = case["doc"].partition("#")
        headings = re.findall(r"^#+ (.+)$", (ROOT / doc).read_text(encoding="utf-8"), re.M)
        assert not anchor or anchor in {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
        if case["file"].endswith(".json"):
            values = json.load(open(path, encoding="utf-8"))
            assert set(case["inputs"]) | set(case["expected"]) <= set(values)
            continue
        tensors = load_file(path)
        for name, spec in {**case["inputs"], **case["expected"]}.items():
            assert list(tensors[name].shape) == spec["shape"] and spec["holds"], (case["name"], name)
            kind = {"f": dtype if "sampling" not in case["file"] else "F64", "i": "I64"}[tensors[name].dtype.kind]
            assert spec["dtype"] == kind, (case["name"], name)


def test_tokenizer_fixture_is_gpt2_files_and_tricky_strings(fixtures):
    directory, _ = fixtures
    tok = Tokenizer.from_gpt2(directory / "tokenizer" / "vocab.json", directory / "tokenizer" / "merges.txt")
    cases = json.load(open(directory / "tokenizer" / "cases.json", encoding="utf-8"))
    assert cases["texts"] == TEXTS and cases["ids"] == [tok.encode(t, allowed_special="all") for t in TEXTS]
    assert all(tok.decode(ids) == t for ids, t in zip(cases["ids"], TEXTS))
    assert ["<|endoftext|>", "after", " the", " end"] == cases["chunks"][TEXTS.index("<|endoftext|>after the end")]
    assert any(len(c) > 1 for chunks in cases["chunks"] for c in chunks if len(c.encode()) > len(c))  # non-ASCII
    assert max(i for ids in cases["ids"] for i in ids) == tok.eot_id  # the special token is used


def test_fixtures_are_deterministic_and_follow_the_seed(tmp_path):
    a, b, c = (write_fixtures(tmp_path / n, seed=s) for n, s in (("a", 5), ("b", 5), ("c", 6)))
    assert a == b
    for name in ("model.safetensors", "layers/gelu.safetensors", "tokenizer/cases.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_command_line(tmp_path, capsys):
    assert main(["fixtures", "--out", str(tmp_path / "f"), "--seed", "2", "--dtype", "float32"]) == 0
    assert "wrote 23 cases (float32, seed 2)" in capsys.readouterr().out
    manifest = json.load(open(tmp_path / "f" / "manifest.json"))
    assert (manifest["seed"], manifest["dtype"]) == (2, "float32")
    with pytest.raises(SystemExit):
        main(["fixtures", "--out", str(tmp_path / "g"), "--dtype", "float16"])
    with pytest.raises(TinygenError, match="seed must be an integer >= 0"):
        write_fixtures(tmp_path / "h", seed=-1)
    assert main(["fixtures", "--out", str(tmp_path / "i"), "--seed", "-1"]) == 2
