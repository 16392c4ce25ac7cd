"""The gradient checker (its claims: the stencil, the floor, restoring inputs, float64 only)
and its table of cases: every layer pair of the table passes over hypothesis-drawn shapes.
The command that prints the table is tests/test_cli_gradcheck.py."""
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from tinygen.gradient_check import (
    EPS, FLOOR, THRESHOLD, block_check, check_layer, finetuning_model_check, gradcheck, layer_cases,
    numerical_gradient, pick_coords, relative_errors,
)
from tinygen.layers import gelu_backward, gelu_forward, layernorm_backward, layernorm_forward

CASES = [case.name for case in layer_cases(np.random.default_rng(0))]
dims = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 8))  # B, T, C: T=1, B=1 included


# ------------------------------------------------------------ the table of cases
@pytest.mark.parametrize("name", CASES)
@given(dims=dims, seed=st.integers(0, 2**16))
@example(dims=(1, 1, 1), seed=0).via("T=1, B=1, C=1")
@example(dims=(1, 1, 4), seed=1).via("T=1, B=1, one head of width 2")
@example(dims=(3, 5, 8), seed=2).via("largest")
def test_every_case_of_the_table_matches_finite_differences(name, dims, seed):
    B, T, C = dims
    (case,) = [c for c in layer_cases(np.random.default_rng(seed), B, T, C) if c.name == name]
    errors = check_layer(case.forward, case.backward, case.args, case.kwargs, case.names, max_coords=24, seed=seed)
    assert list(errors) == case.names and max(errors.values()) < THRESHOLD, errors


def test_every_float_argument_of_a_case_is_named_and_checked():
    for case in layer_cases(np.random.default_rng(0), 2, 3, 4):
        floats = [a for a in case.args if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
        assert len(floats) == len(case.names), case.name
        assert len(case.backward(np.ones_like(case.forward(*case.args, **case.kwargs)[0]), case.forward(
            *case.args, **case.kwargs)[1])) == len(case.names), case.name


@pytest.mark.parametrize("B, T, C, n_head", [(2, 5, 8, 2), (1, 1, 4, 1), (2, 3, 6, 3)])
def test_block_check_covers_x_and_all_twelve_parameters(B, T, C, n_head):
    errors = block_check(np.random.default_rng(0), B, T, C, n_head, max_coords=16)
    assert len(errors) == 13 and errors["x"] < THRESHOLD and max(errors.values()) < THRESHOLD, errors


def test_finetuning_model_check_covers_every_method():
    errors = finetuning_model_check(max_coords=4)
    assert any(".lora_" in k for k in errors) and any(".adapter_" in k for k in errors) and "prompt.weight" in errors
    assert max(e for _, e in errors.values()) < THRESHOLD




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
