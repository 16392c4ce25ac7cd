"""The gradient checker itself and the `tinygen gradcheck` command: pass path,
failure path (a deliberately wrong backward), and the checker's own claims."""
import numpy as np
import pytest

import tinygen.cli.gradcheck as gradcheck_command
from tinygen.cli import main
from tinygen.layers import gelu_backward, gelu_forward, layernorm_backward, layernorm_forward
from tinygen.gradient_check import (
    EPS, FLOOR, THRESHOLD, check_layer, gradcheck, numerical_gradient, pick_coords, relative_errors,
)


def table_rows(out):
    """The result rows of the printed table: lines ending in pass or FAIL."""
    return [line for line in out.splitlines() if line.endswith((" pass", " FAIL"))]


def test_cli_gradcheck_passes_every_row(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    layers = {row.split("  ")[0].strip() for row in rows}
    assert {"linear", "embedding", "layernorm", "gelu", "causal attention", "cross-entropy",
            "transformer block", "GPT (whole model)", "moe layer (top-2 of 4)", "moe layer (capacity 0.5)",
            "transformer block (experts)", "GPT + experts (whole model)"} <= layers
    assert len(rows) > 40 and all(row.endswith(" pass") for row in rows)
    assert f"{len(rows)}/{len(rows)} passed" in out


def test_cli_gradcheck_reports_a_wrong_backward(monkeypatch, capsys):
    def wrong_gelu_backward(dout, cache):
        (dx,) = gelu_backward(dout, cache)
        return (dx * 1.001,)  # 0.1% off: far above the threshold

    monkeypatch.setattr(gradcheck_command, "gelu_backward", wrong_gelu_backward)
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


# ------------------------------------------------------------ the checker itself
def test_gradcheck_docstring_example():
    x = np.array([1.0, 2.0])
    errors = gradcheck(lambda: float(np.sum(x**3)), {"x": x}, {"x": 3 * x**2})
    assert errors["x"] < 1e-9


def test_gradcheck_catches_a_wrong_gradient_and_restores_inputs():
    x = np.random.default_rng(0).standard_normal((3, 4))
    before = x.copy()
    f = lambda: float(np.sum(np.sin(x)))  # noqa: E731
    assert gradcheck(f, {"x": x}, {"x": np.cos(x)})["x"] < THRESHOLD
    wrong = np.cos(x)
    wrong[1, 2] += 1e-4
    assert gradcheck(f, {"x": x}, {"x": wrong})["x"] > THRESHOLD
    np.testing.assert_array_equal(x, before)  # perturbed in place, restored exactly


def test_gradcheck_rejects_float32_and_wrong_shapes():
    x32 = np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda: 0.0, {"x": x32}, {"x": x32})
    x = np.ones(3)
    with pytest.raises(ValueError, match="shape"):
        gradcheck(lambda: 0.0, {"x": x}, {"x": np.ones(4)})
    with pytest.raises(ValueError, match="gradients"):
        check_layer(lambda x: (x, None), lambda dout, cache: (dout, dout), [x])


def test_pick_coords_subsets_large_tensors():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(pick_coords((2, 3), 64, rng), np.arange(6))
    coords = pick_coords((100, 100), 16, rng)
    assert len(coords) == 16 and len(set(coords.tolist())) == 16 and coords.max() < 10_000


def test_five_point_stencil_beats_two_point_at_gpt2_init_scale():
    """Layer norm of 0.02-scale inputs at the same step h = EPS: the two-point
    formula misses the threshold, the five-point one passes (docs/gradcheck.md)."""
    rng = np.random.default_rng(0)
    x = 0.02 * rng.standard_normal((4, 8))
    w, b = np.ones(8), np.zeros(8)
    dout = rng.standard_normal((4, 8))
    f = lambda: float(np.sum(layernorm_forward(x, w, b)[0] * dout))  # noqa: E731
    (dx, _, _) = layernorm_backward(dout, layernorm_forward(x, w, b)[1])
    coords = np.arange(x.size)
    five = numerical_gradient(f, x, coords)
    two = np.empty(x.size)
    for i in coords:
        old = x.flat[i]
        x.flat[i] = old + EPS
        up = f()
        x.flat[i] = old - EPS
        down = f()
        x.flat[i] = old
        two[i] = (up - down) / (2 * EPS)
    analytic = {"x": dx.ravel()}
    assert relative_errors(analytic, {"x": five})["x"] < THRESHOLD  # ~1e-9
    assert relative_errors(analytic, {"x": two})["x"] > 10 * THRESHOLD  # ~1e-5 at the same step


def test_relative_error_floor_ignores_noise_on_tiny_gradients():
    """A gradient of exactly 0 next to large ones is judged against 1% of the largest."""
    x = np.array([1.0, 2.0])
    f = lambda: float(x[0] ** 2)  # noqa: E731  d/dx1 is exactly 0
    nearly_zero = np.array([2.0, 1e-9 * FLOOR])
    assert gradcheck(f, {"x": x}, {"x": nearly_zero})["x"] < THRESHOLD


def test_check_layer_example_from_docstring():
    errors = check_layer(gelu_forward, gelu_backward, [np.random.default_rng(0).standard_normal((3, 4))])
    assert list(errors) == ["arg0"] and errors["arg0"] < 1e-8
