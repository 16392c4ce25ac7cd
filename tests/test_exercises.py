"""The grader of `tinygen exercises`, proved on tinygen's own math and on every bug of the catalogue.

tests/exercise_solutions/ holds tinygen's math pasted into the stubs: every
exercise passes. Each bug of tinygen.bugs, pasted into the solution of the
exercise it belongs to, fails that exercise and names the tensor. The stubs
themselves are "not started", and files that cannot be graded give one line.
"""
import re
import shutil
from pathlib import Path

import pytest

from tinygen.bugs import BUGS
from tinygen.cli import main
from tinygen.exercises import EXERCISES, STUBS, check, format_results, grade, resolve, start

SOLUTIONS = Path(__file__).resolve().parent / "exercise_solutions"

# bug name -> [(old, new)] edits of its exercise's reference solution: the bug as a learner writes it
MUTATIONS = {
    "linear-bias-mean": [("db = d2.sum(axis=0)", "db = d2.mean(axis=0)")],
    "embedding-buffered": [("np.add.at(dw, ids.reshape(-1), dout.reshape(-1, C))", "dw[ids.reshape(-1)] += dout.reshape(-1, C)")],
    "layernorm-no-projection": [(" - xhat * np.mean(g * xhat, axis=-1, keepdims=True))", ")")],
    "gelu-erf": [("return 0.5 * x * (1.0 + np.tanh(K * (x + A * x**3))), GeluCache(x)",
                  "return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))), GeluCache(x)")],
    "dropout-no-rescale": [("mask = keep.astype(x.dtype) / (1.0 - p)", "mask = keep.astype(x.dtype)")],
    "attention-no-scale": [("scores = q @ k.swapaxes(-1, -2) / math.sqrt(D)", "scores = q @ k.swapaxes(-1, -2)")],
    "softmax-no-max": [("e = np.exp(x - x.max(axis=-1, keepdims=True))", "e = np.exp(x)")],
    "causal-mask-off": [("    scores = scores + np.where(np.triu(np.ones((T, T), dtype=bool), 1), -np.inf, 0.0)\n", "")],
    "cross-entropy-no-mean": [("dlogits = dlogits * dloss / n", "dlogits = dlogits * dloss")],
    "wpe-grad-mean": [("dwpe[:T] = dx.sum(axis=0)", "dwpe[:T] = dx.mean(axis=0)")],
    "tied-head-missing": [("dwte = dlogits.reshape(-1, V).T @ h.reshape(-1, C)  # the head", "dwte = np.zeros((V, C))")],
    "adam-no-bias-correction": [("mhat = m / (1 - beta1**t)", "mhat = m"), ("vhat = v / (1 - beta2**t)", "vhat = v")],
}


@pytest.fixture()
def solved(tmp_path):
    """A copy of the reference solutions, to break."""
    for name in EXERCISES.values():
        shutil.copyfile(SOLUTIONS / name, tmp_path / name)
    return tmp_path


def test_reference_solutions_pass_every_exercise():
    results, ok = check(SOLUTIONS)
    assert ok and [r.status for r in results] == ["passes"] * len(EXERCISES), format_results(results)


def test_every_bug_has_a_mutation():
    assert set(MUTATIONS) == {b.name for b in BUGS}


@pytest.mark.parametrize("bug", BUGS, ids=lambda b: b.name)
def test_each_bug_fails_its_exercise_naming_the_tensor(bug, solved):
    path = solved / EXERCISES[bug.exercise]
    text = path.read_text()
    for old, new in MUTATIONS[bug.name]:
        assert old in text, (bug.name, old)
        text = text.replace(old, new)
    path.write_text(text)
    result = grade(solved, bug.exercise)
    assert result.status == "fails", result
    assert result.tensor.split(" ")[0] == bug.tensor, result
    assert result.hint
    others = [r for r in check(solved)[0] if r.exercise != bug.exercise and r.status != "passes"]
    dependent = {"layernorm-no-projection": {"block", "embed_and_head"}, "linear-bias-mean": {"block"},
                 "gelu-erf": {"block"}, "attention-no-scale": {"block"}, "causal-mask-off": {"block"}}
    assert {r.exercise for r in others} <= dependent.get(bug.name, set()), others


def test_stubs_are_not_started_and_exit_0(tmp_path, capsys):
    assert main(["exercises", "start", str(tmp_path / "ex")]) == 0
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == sorted(EXERCISES.values())
    assert main(["exercises", "check", str(tmp_path / "ex")]) == 0
    out = capsys.readouterr().out
    assert f"{len(EXERCISES)} not started" in out and "Traceback" not in out


def test_start_keeps_existing_files(tmp_path):
    (tmp_path / "ex01_linear.py").write_text("# mine\n")
    done = dict(start(tmp_path))
    assert done["ex01_linear.py"] is False and done["ex02_embedding.py"] is True
    assert (tmp_path / "ex01_linear.py").read_text() == "# mine\n"


def test_stubs_import_nothing_from_tinygen_and_raise_not_implemented():
    for name in EXERCISES.values():
        text = (STUBS / name).read_text()
        assert "tinygen" not in text.replace("tinygen exercises check", ""), name
        assert "raise NotImplementedError" in text


def test_first_exercise_from_the_path_passes_once_written(tmp_path, capsys):
    """A newcomer's first exercise: the stub, then the two functions written in."""
    start(tmp_path)
    text = (tmp_path / "ex01_linear.py").read_text()
    forward, backward = text.split("def linear_backward")
    forward = forward.replace("    raise NotImplementedError\n", "    return x @ w + b, LinearCache(x, w)\n")
    backward = backward.replace("    raise NotImplementedError\n", (
        "    x, w = cache\n"
        "    x2, d2 = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])\n"
        "    return (d2 @ w.T).reshape(x.shape), x2.T @ d2, d2.sum(axis=0)\n"))
    (tmp_path / "ex01_linear.py").write_text(forward + "def linear_backward" + backward)
    assert main(["exercises", "check", str(tmp_path), "linear"]) == 0
    assert re.search(r"^linear +passes$", capsys.readouterr().out, re.M)


@pytest.mark.parametrize("source, expected", [
    ("def linear_forward(x, w, b):\n    return x @ w +\n", "syntax error, line 2"),
    ("def linear_forward(x, w):\n    return x @ w, None\n\ndef linear_backward(dout, cache):\n    pass\n",
     "linear_forward(x, w) should be linear_forward(x, w, b)"),
    ("def linear_forward(x, w, b):\n    return x @ w + b, None\n", "no function linear_backward(dout, cache)"),
    ("import nonexistent_module_xyz\ndef linear_forward(x, w, b):\n    pass\ndef linear_backward(dout, cache):\n    pass\n",
     "importing it raised ModuleNotFoundError"),
])
def test_bad_files_give_one_line(tmp_path, capsys, source, expected):
    start(tmp_path)
    (tmp_path / "ex01_linear.py").write_text(source)
    assert main(["exercises", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("linear ")]
    assert "bad file" in row and expected in row and "Traceback" not in out


def test_an_exception_in_the_learners_code_is_one_line(tmp_path, capsys):
    start(tmp_path)
    (tmp_path / "ex04_gelu.py").write_text(
        "def gelu_forward(x):\n    return x[..., None] @ x, None\n\ndef gelu_backward(dout, cache):\n    return dout\n")
    assert main(["exercises", "check", str(tmp_path), "gelu"]) == 1
    out = capsys.readouterr().out
    assert "fails" in out and "raised ValueError" in out and "ex04_gelu.py:2" in out and "Traceback" not in out


def test_half_written_exercise_fails_and_says_what_is_missing(tmp_path):
    start(tmp_path)
    path = tmp_path / "ex04_gelu.py"
    path.write_text(path.read_text().replace(
        '    """x (...) -> (out (...), cache)."""\n    raise NotImplementedError',
        '    """x (...) -> (out (...), cache)."""\n'
        '    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))), GeluCache(x)'))
    result = grade(tmp_path, "gelu")
    assert result.status == "fails" and "NotImplementedError" in result.tensor


def test_names_resolve():
    assert resolve("gelu") == resolve("ex04_gelu") == resolve("ex04_gelu.py") == resolve("4") == "gelu"
    assert main(["exercises", "check", str(SOLUTIONS), "nope"]) == 2
    assert main(["exercises", "check", "/nonexistent/dir"]) == 2


def test_properties_run_without_hypothesis(monkeypatch):
    """hypothesis is a test extra: without it the grader draws seeded examples instead."""
    import sys

    from tinygen.exercises.grading import Mismatch, property_holds

    monkeypatch.setitem(sys.modules, "hypothesis", None)  # `import hypothesis` now raises ImportError
    assert check(SOLUTIONS)[1]
    seen = []

    def fails_for_large_T(rng, T):
        seen.append(T)
        if T > 3:
            raise Mismatch("y (causality)", None, "")

    with pytest.raises(Mismatch) as info:
        property_holds(fails_for_large_T, "a hint", T=(1, 6))
    assert info.value.tensor.startswith("y (causality) [T=") and info.value.hint == "a hint" and seen[-1] > 3
    seen.clear()
    property_holds(lambda rng, T: seen.append(T), "", examples=20, T=(1, 6))
    assert len(seen) == 20 and len(set(seen)) > 1
