"""Hypothesis strategies and gradient checks for using tinygen as a test oracle.

If you write your own attention, layer norm or whole GPT-2, tinygen's
float64 forward and backward passes are a reference to test it against:

>>> from hypothesis import given, settings, strategies as st
>>> from tinygen import GPT
>>> from tinygen.testing import configs, token_batches
>>> @settings(max_examples=5, deadline=None)
... @given(configs(), st.data())
... def test_my_model(config, data):
...     idx = data.draw(token_batches(config))                     # (B, T) int64
...     logits = GPT(config).forward(idx)                           # compare yours with this
...     assert logits.shape == (*idx.shape, config.vocab_size)
>>> test_my_model()                                                 # pytest would call it

Strategies: `configs` -> GPTConfig, `token_batches` -> (B, T) int64 ids,
`arrays` -> finite arrays of moderate magnitude. Re-exported checks:
`gradcheck`, `check_layer`, `check_model`, `THRESHOLD` (see
tinygen.gradient_check and docs/gradcheck.md). docs/testing.md has a worked
example.

Mutation testing: `inject_bug(name)` is a context manager that puts one of
the classic bugs of `BUGS` (tinygen.bugs, docs/bugs.md) into tinygen, so you
can see your own tests against tinygen fail under it:

    with inject_bug("causal-mask-off"):
        my_causality_test()          # should now fail

hypothesis is a test extra, not a run-time dependency of tinygen.
"""
try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("tinygen.testing needs hypothesis: pip install 'tinygen[test]'") from e

import numpy as np

from .bugs import BUGS, inject as inject_bug
from .config import GPTConfig
from .gradient_check import THRESHOLD, check_layer, check_model, gradcheck

__all__ = ["configs", "token_batches", "arrays", "float_arrays", "gradcheck", "check_layer", "check_model", "THRESHOLD",
           "BUGS", "inject_bug"]


@st.composite
def configs(draw, max_layers=2, max_heads=3, max_head_size=8, max_vocab=32, max_block=16,
            dtype="float64", dropout=0.0):
    """A small GPTConfig: 1..max_layers layers, 1..max_heads heads of width
    1..max_head_size (n_embd = heads * head width), vocabulary 1..max_vocab,
    context 1..max_block.

    dtype: "float64" (the default: what gradient checks need), "float32", or
    None to draw either. dropout is fixed (default 0.0: a deterministic oracle).

        configs(max_layers=1).example()
        # GPTConfig(vocab_size=5, block_size=3, n_layer=1, n_head=2, n_embd=8, ...)
    """
    n_head = draw(st.integers(1, max_heads))
    head_size = draw(st.integers(1, max_head_size))
    return GPTConfig(
        vocab_size=draw(st.integers(1, max_vocab)),
        block_size=draw(st.integers(1, max_block)),
        n_layer=draw(st.integers(1, max_layers)),
        n_head=n_head,
        n_embd=n_head * head_size,
        dropout=dropout,
        dtype=draw(st.sampled_from(["float32", "float64"])) if dtype is None else dtype,
    )


@st.composite
def token_batches(draw, config: GPTConfig, max_batch=3):
    """A (B, T) int64 array of ids in [0, vocab_size), 1 <= B <= max_batch,
    1 <= T <= block_size: always a valid `idx` (or `targets`) for `config`."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(1, config.block_size))
    return draw(hnp.arrays(np.int64, (B, T), elements=st.integers(0, config.vocab_size - 1)))


def arrays(shape, dtype=np.float64, elements=None):
    """Arrays of `shape` (a tuple, or a strategy of tuples) and `dtype`, with
    finite elements of moderate magnitude: by default floats in [-4, 4],
    where GELU, tanh and exp are neither flat nor overflowing.

        arrays((2, 3)).example()   # array([[ 0.5, -3.9,  0. ], ...])
    """
    dtype = np.dtype(dtype)
    if elements is None:
        width = 32 if dtype == np.float32 else 64
        elements = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=width)
    return hnp.arrays(dtype, shape, elements=elements)


def float_arrays(obj):
    """Every floating ndarray inside obj (nested tuples / NamedTuples / lists):
    check that a float32 forward, its caches and its gradients stay float32.

    >>> [a.dtype.name for a in float_arrays((np.zeros(2, np.float32), (np.arange(3), np.ones(1))))]
    ['float32', 'float64']
    """
    if isinstance(obj, np.ndarray):
        return [obj] if obj.dtype.kind == "f" else []
    if isinstance(obj, (tuple, list)):
        return [a for item in obj for a in float_arrays(item)]
    return []
