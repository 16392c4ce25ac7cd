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
from .errors import TinygenError
from .gradient_check import THRESHOLD, check_layer, check_model, gradcheck
from .model import param_shapes

__all__ = ["configs", "token_batches", "token_sequences", "gpt_params", "param_shapes", "to_nested", "from_nested",
           "to_torch_state_dict", "from_torch_state_dict", "FORWARD_TOLERANCE", "forward_error",
           "assert_forward_close", "arrays", "float_arrays", "gradcheck", "check_layer", "check_model", "THRESHOLD",
           "BUGS", "inject_bug"]


@st.composite
def configs(draw, max_layers=2, max_heads=3, max_head_size=8, max_vocab=32, max_block=16,
            dtype="float64", dropout=0.0, *, min_layers=1, min_heads=1, min_head_size=1, min_vocab=1,
            min_block=1):
    """A small GPTConfig: min_layers..max_layers layers, min_heads..max_heads heads
    of width min_head_size..max_head_size (n_embd = heads * head width),
    vocabulary min_vocab..max_vocab, context min_block..max_block.

    The minimums default to 1, the smallest valid model. Raise them when a
    property needs room: a causal mask is only visible with block_size >= 2,
    a variance with n_embd >= 2 (min_head_size=2).

    dtype: "float64" (the default: what gradient checks need), "float32", or
    None to draw either. dropout is fixed (default 0.0: a deterministic oracle).

        configs(max_layers=1).example()
        # GPTConfig(vocab_size=5, block_size=3, n_layer=1, n_head=2, n_embd=8, ...)
    """
    n_head = draw(st.integers(min_heads, max_heads))
    head_size = draw(st.integers(min_head_size, max_head_size))
    return GPTConfig(
        vocab_size=draw(st.integers(min_vocab, max_vocab)),
        block_size=draw(st.integers(min_block, max_block)),
        n_layer=draw(st.integers(min_layers, max_layers)),
        n_head=n_head,
        n_embd=n_head * head_size,
        dropout=dropout,
        dtype=draw(st.sampled_from(["float32", "float64"])) if dtype is None else dtype,
    )


@st.composite
def token_batches(draw, config: GPTConfig, max_batch=3, *, min_batch=1, min_len=1):
    """A (B, T) int64 array of ids in [0, vocab_size), min_batch <= B <= max_batch,
    min_len <= T <= block_size: always a valid `idx` (or `targets`) for `config`."""
    B = draw(st.integers(min_batch, max_batch))
    T = draw(st.integers(min_len, config.block_size))
    return draw(hnp.arrays(np.int64, (B, T), elements=st.integers(0, config.vocab_size - 1)))


def token_sequences(config: GPTConfig, min_len=1, max_len=None):
    """One sequence: a (T,) int64 array of ids in [0, vocab_size), min_len <= T <=
    max_len (default block_size), for implementations without a batch dimension
    (picoGPT's `gpt2(inputs, ...)`; `.tolist()` gives a list of ints).

        token_sequences(config).example()   # array([3, 0, 4])
    """
    max_len = config.block_size if max_len is None else max_len
    if not 1 <= min_len <= max_len <= config.block_size:
        raise TinygenError(f"token_sequences: need 1 <= min_len ({min_len}) <= max_len ({max_len}) "
                           f"<= block_size ({config.block_size})")
    lengths = st.integers(min_len, max_len)
    return lengths.flatmap(lambda T: hnp.arrays(np.int64, (T,), elements=st.integers(0, config.vocab_size - 1)))


# ---- parameters, and other layouts of them ----------------------------------------------
@st.composite
def gpt_params(draw, config: GPTConfig, weight_std=(0.02, 0.5), bias_std=(0.02, 0.5), gain=(0.5, 1.5)):
    """A full parameter dict for `config`, every tensor random: {Hugging Face name: array}.

    `GPT(config, seed)` starts with zero biases and unit layer-norm gains, so a
    test built on it cannot tell an implementation that ignores every bias or
    gain from a correct one. Here nothing is neutral: weights and embeddings
    ~ N(0, w^2) and biases (linear and layer norm) ~ N(0, b^2), with w drawn
    from `weight_std` and b from `bias_std` (both ranges exclude 0), and
    layer-norm gains uniform in `gain`, one draw per element. Names, shapes and the (in, out) layout are `param_shapes`'s;
    the dtype is config's; `GPT(config, params=params)` takes the result.

    hypothesis draws the seed and the three scales, NumPy draws the numbers:
    shrinking then moves to small seeds and scales, not to thousands of single
    floats, and an example costs the same for any model size.

        gpt_params(config).example()["h.0.attn.c_attn.bias"]   # (3C,) nonzero
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = draw(st.floats(*weight_std))
    b = draw(st.floats(*bias_std))
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p = rng.uniform(*gain, size=shape)
        elif name.endswith(".bias"):
            p = rng.normal(0.0, b, size=shape)
        else:
            p = rng.normal(0.0, w, size=shape)
        params[name] = p.astype(config.np_dtype)
    return params


# Conv1D weights: stored (in, out) by Hugging Face GPT-2 and tinygen, (out, in) by torch.nn.Linear (nanoGPT).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_LN = ("ln_1", "ln_2")


def to_nested(params) -> dict:
    """tinygen's flat dict -> picoGPT's nested layout (same arrays, not copies).

        {"wte": (V, C), "wpe": (T, C), "ln_f": {"g": (C,), "b": (C,)},
         "blocks": [{"ln_1": {"g", "b"}, "attn": {"c_attn": {"w": (C, 3C), "b"}, "c_proj": {"w": (C, C), "b"}},
                     "ln_2": {"g", "b"}, "mlp": {"c_fc": {"w": (C, 4C), "b"}, "c_proj": {"w": (4C, C), "b"}}}, ...]}

    Layer norms' weight/bias are g/b, linear layers' w/b (OpenAI's TensorFlow
    names); weights stay (in, out), so picoGPT's `x @ w + b` reads them as is.
    """
    n_layer = _n_layer(params)
    nested = {"wte": params["wte.weight"], "wpe": params["wpe.weight"],
              "ln_f": {"g": params["ln_f.weight"], "b": params["ln_f.bias"]}, "blocks": []}
    for i in range(n_layer):
        h = f"h.{i}."
        block = {ln: {"g": params[h + ln + ".weight"], "b": params[h + ln + ".bias"]} for ln in _LN}
        block["attn"] = {c: {"w": params[f"{h}attn.{c}.weight"], "b": params[f"{h}attn.{c}.bias"]}
                         for c in ("c_attn", "c_proj")}
        block["mlp"] = {c: {"w": params[f"{h}mlp.{c}.weight"], "b": params[f"{h}mlp.{c}.bias"]}
                        for c in ("c_fc", "c_proj")}
        nested["blocks"].append(block)
    return nested


def from_nested(nested) -> dict:
    """picoGPT's nested layout -> tinygen's flat dict (the inverse of `to_nested`)."""
    params = {"wte.weight": nested["wte"], "wpe.weight": nested["wpe"]}
    for i, block in enumerate(nested["blocks"]):
        h = f"h.{i}."
        for ln, part, layers in (("ln_1", "attn", ("c_attn", "c_proj")), ("ln_2", "mlp", ("c_fc", "c_proj"))):
            params[h + ln + ".weight"], params[h + ln + ".bias"] = block[ln]["g"], block[ln]["b"]
            for c in layers:  # in param_shapes' order: ln_1, attn, ln_2, mlp
                params[f"{h}{part}.{c}.weight"] = block[part][c]["w"]
                params[f"{h}{part}.{c}.bias"] = block[part][c]["b"]
    params["ln_f.weight"], params["ln_f.bias"] = nested["ln_f"]["g"], nested["ln_f"]["b"]
    return params


def to_torch_state_dict(params, prefix="transformer.", lm_head=True) -> dict:
    """tinygen's flat dict -> a PyTorch-style state dict of NumPy arrays (no torch needed).

    nanoGPT's layout: every name gets `prefix` ("transformer.h.0.attn.c_attn.weight"),
    the four Conv1D weights are transposed to torch.nn.Linear's (out, in)
    ("attn.c_attn.weight" (C, 3C) -> (3C, C)), and the tied head appears as
    "lm_head.weight" (V, C) too (lm_head=False leaves it out). Every array is a
    fresh C-contiguous copy: `torch.from_numpy` takes each as it is.
    """
    state = {}
    for name, p in params.items():
        state[prefix + name] = np.array(p.T if name.endswith(_TRANSPOSED) else p, order="C", copy=True)
    if lm_head:
        state["lm_head.weight"] = np.array(params["wte.weight"], order="C", copy=True)
    return state


def from_torch_state_dict(state, prefix="transformer.") -> dict:
    """A PyTorch-style state dict (nanoGPT's layout; NumPy arrays, or CPU tensors,
    read with np.asarray) -> tinygen's flat dict with (in, out) weights.

    Attention-mask buffers (names ending in ".attn.bias" or ".attn.masked_bias")
    are skipped; "lm_head.weight" must equal the embedding, since GPT-2 ties them.
    """
    params = {}
    for name, p in state.items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if not name.startswith(prefix):
            raise TinygenError(f"state dict key {name!r} does not start with {prefix!r}")
        key = name[len(prefix):]
        params[key] = np.ascontiguousarray(np.asarray(p).T if key.endswith(_TRANSPOSED) else np.asarray(p))
    if "lm_head.weight" in state and not np.array_equal(np.asarray(state["lm_head.weight"]), params["wte.weight"]):
        raise TinygenError("lm_head.weight differs from the token embedding; GPT-2 (and tinygen) tie them")
    return params


def _n_layer(params):
    """The number of blocks in a flat parameter dict: 1 + the largest i of "h.{i}."."""
    return 1 + max((int(k.split(".")[1]) for k in params if k.startswith("h.")), default=-1)


# ---- tolerances for comparing forward passes -----------------------------------------------
FORWARD_TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


def forward_error(actual, expected) -> float:
    """max |actual - expected| / max(1, max |expected|): the error measured against
    the size of the output (logits of 50 and of 0.01 get the same absolute floor)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {actual.shape} vs {expected.shape}")
    if not np.isfinite(actual).all():
        return float("inf")
    return float(np.max(np.abs(actual - expected), initial=0.0) / max(1.0, np.max(np.abs(expected), initial=0.0)))


def assert_forward_close(actual, expected, dtype="float64", tolerance=None):
    """Assert that two forward passes (logits, activations) agree within
    FORWARD_TOLERANCE[dtype] (docs/testing.md says where the numbers come from)."""
    tolerance = FORWARD_TOLERANCE[str(np.dtype(dtype))] if tolerance is None else tolerance
    error = forward_error(actual, expected)
    assert error <= tolerance, f"forward passes differ: error {error:.3g} > tolerance {tolerance:.3g} ({dtype})"


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
