"""The grader's tools: load a learner's file safely, compare tensors, check gradients, run properties.

A check function (tinygen/exercises/checks.py) raises `Mismatch(tensor,
error, hint)` at the first tensor that disagrees with tinygen; everything
else a learner's code may raise is caught by `grade` and turned into one
line. Nothing here prints a traceback.
"""
import ast
import importlib.util
import math
import os
import re
import sys
import warnings
from typing import NamedTuple, Optional

import numpy as np

from ..gradient_check import THRESHOLD, check_layer

TOLERANCE = 1e-7  # forward values and gradients against tinygen's, float64: independent code agrees to ~1e-14
STUB = re.compile(r"^ex\d\d_\w+$")  # module names of exercise files: their sibling imports are purged between loads


class Mismatch(Exception):
    """The first tensor that disagrees: its name, the max relative error (None: not a number), a hint."""

    def __init__(self, tensor, error=None, hint=""):
        super().__init__(tensor)
        self.tensor, self.error, self.hint = tensor, error, hint


class Result(NamedTuple):
    exercise: str  # the short name: "linear"
    status: str  # "not started", "passes", "fails", "bad file"
    tensor: str = ""  # the first failing tensor ("dx", "dw (finite differences)"), or what went wrong
    error: Optional[float] = None  # its max relative error
    hint: str = ""


# ---------------------------------------------------------------- comparing
def max_rel_error(got, want) -> float:
    """max |got - want| / max |want| over a tensor (infinite entries must match exactly)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    inf = np.isinf(want)
    if np.any(inf):
        if not np.array_equal(np.isinf(got) & (np.sign(got) == np.sign(want)), inf):
            return math.inf
        got, want = got[~inf], want[~inf]
    if got.size == 0:
        return 0.0
    if not np.all(np.isfinite(got)):
        return math.inf
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))


def expect(tensor, got, want, hint=""):
    """Raise Mismatch unless `got` has `want`'s shape and values (to TOLERANCE)."""
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        raise Mismatch(tensor, None, f"expected an array of shape {np.shape(want)}, got {type(got).__name__}") from None
    if got.shape != np.shape(want):
        raise Mismatch(tensor, None, f"shape {got.shape}, expected {np.shape(want)}")
    err = max_rel_error(got, want)
    if not err < TOLERANCE:
        raise Mismatch(tensor, err, hint)


def expect_equal(tensor, got, want, hint=""):
    """Raise Mismatch unless got == want (ids, pairs, dicts)."""
    if got != want:
        raise Mismatch(tensor, None, hint or f"got {_short(got)}, expected {_short(want)}")


def _short(value, n=60):
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def grads_tuple(value, n, function):
    """A backward's return value as an n-tuple (a lone array counts as a 1-tuple)."""
    if isinstance(value, np.ndarray) and n == 1:
        return (value,)
    if not isinstance(value, (tuple, list)) or len(value) != n:
        got = type(value).__name__ + (f" of {len(value)}" if isinstance(value, (tuple, list)) else "")
        raise Mismatch(f"{function}'s return value", None, f"expected a tuple of {n} arrays, got a {got}")
    return tuple(value)


def finite_differences(forward, backward, args, names, kwargs=None, hint=""):
    """Your backward against central differences of your own forward (tinygen.gradient_check)."""
    errors = check_layer(forward, backward, args, kwargs, names.split(), max_coords=32)
    for name, err in errors.items():
        if not err < THRESHOLD:
            raise Mismatch(f"d{name} (finite differences)", err,
                           hint or "your backward is not the derivative of your forward")


# ---------------------------------------------------------------- properties
def property_holds(test, hint, examples=20, **ranges):
    """Run test(rng, **sizes) on drawn sizes: with hypothesis when it is installed (it shrinks a
    failure to the smallest sizes), else on `examples` seeded draws. `ranges`: name -> (low, high).
    test raises Mismatch; its tensor name gets the failing sizes."""
    def run(seed, **sizes):
        try:
            test(np.random.default_rng(seed), **sizes)
        except Mismatch as e:
            where = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise Mismatch(f"{e.tensor} [{where}]" if where else e.tensor, e.error, e.hint or hint) from None

    try:
        from hypothesis import HealthCheck, given, settings, strategies as st
    except ImportError:
        rng = np.random.default_rng(0)
        for _ in range(examples):
            run(int(rng.integers(2**31)), **{k: int(rng.integers(lo, hi + 1)) for k, (lo, hi) in ranges.items()})
        return
    strategies = {k: st.integers(lo, hi) for k, (lo, hi) in ranges.items()}
    runner = settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=False,
                      suppress_health_check=list(HealthCheck))(given(seed=st.integers(0, 2**31 - 1), **strategies)(run))
    runner()


# ---------------------------------------------------------------- files
def stub_signatures(path) -> dict:
    """{function name: [parameter names]} of the functions in a stub file whose body raises NotImplementedError."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    return {f.name: [a.arg for a in f.args.args] for f in tree.body
            if isinstance(f, ast.FunctionDef) and _is_stub_body(f)}


def _is_stub_body(function) -> bool:
    """True when the body is an optional docstring and `raise NotImplementedError`."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc
    exc = exc.func if isinstance(exc, ast.Call) else exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


class BadFile(Exception):
    """A learner's file that cannot be graded: the message is the one line shown."""


def inspect_file(path, expected: dict):
    """Parse a learner's file: BadFile on a syntax error or a missing / re-shaped function.

    Returns True when every function to write is still the stub (not started)."""
    try:
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    except SyntaxError as e:
        raise BadFile(f"syntax error, line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadFile(f"cannot read it: {e}") from None
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    for name, params in expected.items():
        if name not in functions:
            raise BadFile(f"no function {name}({', '.join(params)}) at the top level")
        got = [a.arg for a in functions[name].args.args]
        if got != params:
            raise BadFile(f"{name}({', '.join(got)}) should be {name}({', '.join(params)}), as in the stub")
    return all(_is_stub_body(functions[name]) for name in expected)


def load_module(path, name):
    """Import a learner's file as a fresh module, its folder on sys.path for sibling imports
    (ex08_block imports ex01_linear ...). BadFile when importing it raises."""
    folder = os.path.dirname(os.path.abspath(path))
    purge_siblings()
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"tinygen_exercise_{name}", path)
        module = importlib.util.module_from_spec(spec)
        with quiet():
            spec.loader.exec_module(module)
        return module
    except Exception as e:  # the learner's module-level code: anything can happen
        raise BadFile(f"importing it raised {describe(e)}") from None


def purge_siblings():
    """Forget imported exercise files, so that the next load reads them again."""
    for name in [n for n in sys.modules if STUB.match(n)]:
        del sys.modules[name]


def leave_folder(path):
    folder = os.path.dirname(os.path.abspath(path))
    while folder in sys.path:
        sys.path.remove(folder)
    purge_siblings()


def describe(e: BaseException) -> str:
    """'ValueError: operands could not be broadcast ...' on one line, with the learner's file and line."""
    tb, where = e.__traceback__, ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if STUB.match(os.path.splitext(os.path.basename(filename))[0]):
            where = f" at {os.path.basename(filename)}:{tb.tb_lineno}"
        tb = tb.tb_next
    text = " ".join(str(e).split())
    text = text if len(text) <= 100 else text[:97] + "..."
    return f"{type(e).__name__}{': ' + text if text else ''}{where}"


class quiet:
    """No NumPy floating-point warnings and no Python warnings while a learner's code runs."""

    def __enter__(self):
        self.err = np.seterr(all="ignore")
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self.warnings.__exit__(*exc)
        np.seterr(**self.err)
        return False
