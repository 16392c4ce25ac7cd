"""safetensors with NumPy alone: roundtrips, known bytes, validation, fuzzing, saves that
crash or are killed leave the old file (atomic writes themselves: tests/test_plumbing_fileio.py)."""
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinygen
from tinygen.plumbing.safetensors import (
    DTYPES, SafetensorsError, TensorInfo, load_file, load_metadata, read_header, save_file,
)

NUMPY_DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
                np.uint64, np.uint32, np.uint16, np.uint8, np.bool_]
SHAPES = [(), (0,), (3,), (2, 0, 3), (2, 3, 4)]


def sample(dtype, shape, seed=0):
    """Deterministic values that exercise the dtype's range (negatives, fractions)."""
    values = np.asarray(np.random.default_rng(seed).standard_normal(shape) * 50)
    return np.asarray(values > 0) if dtype is np.bool_ else values.astype(dtype)


def file_bytes(header: bytes, data: bytes = b"", length=None) -> bytes:
    """A safetensors file by hand: 8-byte LE length, header, data."""
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def load_bytes(raw: bytes):
    """Write `raw` to a temp file and load it: (header, tensors)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        Path(path).write_bytes(raw)
        return read_header(path), load_file(path)


def sample_file_bytes() -> bytes:
    tensors = {"w": sample(np.float32, (3, 4)), "b": sample(np.float16, (5,)),
               "s": sample(np.int64, ()), "z": np.zeros((0, 2), np.uint8)}
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, os.path.join(d, "s.st"), metadata={"format": "np"})
        return Path(d, "s.st").read_bytes()


# ---------------------------------------------------------------- roundtrips


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_roundtrip_every_dtype_and_shape(tmp_path, dtype):
    tensors = {f"t{i}": sample(dtype, shape, seed=i) for i, shape in enumerate(SHAPES)}
    save_file(tensors, tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        got = back[name]
        assert got.dtype == array.dtype and got.shape == array.shape
        assert np.array_equal(got, array)
        assert got.flags.writeable and got.dtype.isnative


def test_roundtrip_non_contiguous_big_endian_and_scalar(tmp_path):
    t = np.arange(12, dtype=">f4").reshape(3, 4).T  # Fortran-ordered view, big-endian
    save_file({"t": t, "s": np.float64(2.5)}, tmp_path / "m.st")
    back = load_file(tmp_path / "m.st")
    assert back["t"].dtype == np.float32 and np.array_equal(back["t"], t)
    assert back["s"].shape == () and back["s"] == 2.5


def test_metadata_roundtrip(tmp_path):
    meta = {"format": "np", "step": "100", "ünï\n\"": "quoted \"value\""}
    save_file({"a": np.ones(2)}, tmp_path / "m.st", metadata=meta)
    assert load_metadata(tmp_path / "m.st") == meta
    save_file({"a": np.ones(2)}, tmp_path / "n.st")
    assert load_metadata(tmp_path / "n.st") == {}


def test_empty_file_of_tensors(tmp_path):
    save_file({}, tmp_path / "e.st")
    assert (tmp_path / "e.st").read_bytes() == b"\x08" + b"\x00" * 7 + b"{}      "
    assert load_file(tmp_path / "e.st") == {}


def test_layout_widest_dtype_first_then_name(tmp_path):
    tensors = {"b": np.zeros(3, np.uint8), "a": np.zeros(1, np.uint8), "c": np.zeros(1, np.float64),
               "d": np.zeros(2, np.float32), "e": np.zeros(1, np.int16), "f": np.zeros(1, np.int64)}
    save_file(tensors, tmp_path / "m.st")
    header = read_header(tmp_path / "m.st")
    assert list(header.tensors) == ["f", "c", "d", "e", "a", "b"]
    assert header.data_start % 8 == 0
    for info in header.tensors.values():  # every tensor starts aligned to its own itemsize
        assert info.data_offsets[0] % np.dtype(DTYPES[info.dtype]).itemsize == 0


# ---------------------------------------------------------------- known bytes

KNOWN_HEADER = (b'{"__metadata__":{"format":"np"},'
                b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                b'"b":{"dtype":"U8","shape":[1,1],"data_offsets":[8,9]}}' + b" " * 5)  # 139 + 5 = 144
KNOWN_FILE = (b"\x90\x00\x00\x00\x00\x00\x00\x00" + KNOWN_HEADER
              + b"\x00\x00\x80\x3f" + b"\x00\x00\x00\xc0"  # float32 1.0, -2.0 little-endian
              + b"\x07")                                   # uint8 7


def test_writer_produces_exact_bytes(tmp_path):
    save_file({"b": np.array([[7]], np.uint8), "a": np.array([1.0, -2.0], np.float32)},
              tmp_path / "k.st", metadata={"format": "np"})
    assert (tmp_path / "k.st").read_bytes() == KNOWN_FILE


def test_reader_on_hand_built_file():
    header, tensors = load_bytes(KNOWN_FILE)
    assert header.metadata == {"format": "np"} and header.data_start == 152
    assert header.tensors["b"] == TensorInfo("U8", (1, 1), (8, 9))
    assert tensors["a"].tolist() == [1.0, -2.0] and tensors["b"].tolist() == [[7]]


def test_bf16_loads_as_float32():
    bits = struct.pack("<4H", 0x3F80, 0xC000, 0x7F80, 0x3EAA)  # 1, -2, inf, 0.33203125
    header = json.dumps({"x": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    _, tensors = load_bytes(file_bytes(header, bits))
    assert tensors["x"].dtype == np.float32
    assert tensors["x"].ravel().tolist() == [1.0, -2.0, np.inf, 0.33203125]
    scalar = b'{"s":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}}'
    _, tensors = load_bytes(file_bytes(scalar, bits[:2]))
    assert isinstance(tensors["s"], np.ndarray) and tensors["s"].shape == () and tensors["s"] == 1.0


def test_bool_bytes_other_than_one_are_true():
    header = b'{"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}}'
    _, tensors = load_bytes(file_bytes(header, b"\x00\x01\x02"))
    assert tensors["m"].tolist() == [False, True, True]


# ---------------------------------------------------------------- validation

def entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def header_of(**entries) -> bytes:
    return json.dumps(entries).encode()


BAD_FILES = {
    "shorter than the 8-byte": b"\x01\x00",
    "runs past the end": file_bytes(b"{}", length=2**63),
    "should start with": file_bytes(b' {"a":1}'),
    "not valid UTF-8 JSON": file_bytes(b'{"a": '),
    "not valid UTF-8": file_bytes(b'{"\xff": 1}'),
    "duplicate keys": file_bytes(b'{"a":' + json.dumps(entry()).encode() + b',"a":1}', b"\0" * 4),
    "not JSON": file_bytes(b'{"a": NaN}'),
    "unknown or unsupported dtype": file_bytes(header_of(a=entry(dtype="F8_E4M3", offsets=(0, 1))), b"\0"),
    "unsupported dtype ['F32']": file_bytes(header_of(a=entry(dtype=["F32"])), b"\0" * 4),
    "list of non-negative ints": file_bytes(header_of(a=entry(shape=(-1,))), b"\0" * 4),
    "should be [begin, end]": file_bytes(header_of(a=entry(offsets=(4, 0))), b"\0" * 4),
    "needs 8 bytes": file_bytes(header_of(a=entry(shape=(2,))), b"\0" * 4),
    "expected exactly the fields": file_bytes(header_of(a={**entry(), "extra": 1}), b"\0" * 4),
    "leaves a gap": file_bytes(header_of(a=entry(offsets=(4, 8))), b"\0" * 8),
    "overlaps tensor": file_bytes(header_of(a=entry(), b=entry(offsets=(2, 6))), b"\0" * 6),
    "trailing bytes": file_bytes(header_of(a=entry()), b"\0" * 5),
    "holds only": file_bytes(header_of(a=entry()), b"\0" * 3),
    "metadata must map str to str": file_bytes(b'{"__metadata__":{"a":1}}'),
    "2**64 or more elements": file_bytes(header_of(a=entry(shape=(2**40, 2**40), offsets=(0, 0)))),
    "NumPy cannot hold shape": file_bytes(header_of(a=entry(shape=(0, 2**62), offsets=(0, 0)))),
}


@pytest.mark.parametrize("message", list(BAD_FILES))
def test_malformed_files_raise_named_errors(tmp_path, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(BAD_FILES[message])
    with pytest.raises(SafetensorsError, match=r"bad\.safetensors") as info:
        load_file(path)
    assert message in str(info.value)


@pytest.mark.parametrize("tensors, metadata, message", [
    ([np.zeros(1)], None, "must be a dict"),
    ({1: np.zeros(1)}, None, "tensor name 1"),
    ({"__metadata__": np.zeros(1)}, None, "other than '__metadata__'"),
    ({"a": [1.0]}, None, "expected a numpy ndarray"),
    ({"a": np.zeros(1, np.complex64)}, None, "cannot store"),
    ({"a": np.array([None])}, None, "cannot store"),
    ({"a": np.zeros(1)}, {"step": 3}, "metadata must map str to str"),
])
def test_save_rejects_bad_input_and_writes_nothing(tmp_path, tensors, metadata, message):
    with pytest.raises(SafetensorsError, match=message):
        save_file(tensors, tmp_path / "m.st", metadata=metadata)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- fuzzing


def loads_or_clean_error(raw: bytes) -> None:
    """The reader's whole contract under fuzzing: a result or SafetensorsError, nothing else."""
    try:
        load_bytes(raw)
    except SafetensorsError:
        pass


SAMPLE = sample_file_bytes()


@given(st.integers(0, len(SAMPLE) - 1))
def test_fuzz_truncation_always_rejected(cut):
    with pytest.raises(SafetensorsError):
        load_bytes(SAMPLE[:cut])


@given(st.lists(st.integers(0, 8 * len(SAMPLE) - 1), min_size=1, max_size=4))
def test_fuzz_bit_flips(bits):
    raw = bytearray(SAMPLE)
    for bit in bits:
        raw[bit // 8] ^= 1 << (bit % 8)
    loads_or_clean_error(bytes(raw))


@given(st.integers(0, 2**64 - 1))
def test_fuzz_absurd_header_length_allocates_nothing(length):
    true_length = struct.unpack("<Q", SAMPLE[:8])[0]
    raw = struct.pack("<Q", length) + SAMPLE[8:]
    tracemalloc.start()
    try:
        if length == true_length:
            load_bytes(raw)
        else:
            with pytest.raises(SafetensorsError):
                load_bytes(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * len(SAMPLE) + 100_000


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
plausible_entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "U8", "BOOL", "I64", "X9"]) | json_values,
     "shape": st.lists(st.integers(-1, 4), max_size=3) | json_values,
     "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2) | json_values},
    optional={"extra": json_values},
)


@given(st.dictionaries(st.text(max_size=4), plausible_entries | json_values, max_size=4),
       st.binary(max_size=48))
def test_fuzz_garbage_json_headers(header, data):
    raw_header = json.dumps(header).encode()
    loads_or_clean_error(file_bytes(raw_header, data))


@given(st.binary(max_size=64), st.binary(max_size=32))
def test_fuzz_garbage_header_bytes(header, data):
    loads_or_clean_error(file_bytes(b"{" + header, data))


def test_deeply_nested_json_header():
    loads_or_clean_error(file_bytes(b"{" + b'"a":[' * 100_000))


# ---------------------------------------------------------------- crashes during a save


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_file({"w": np.ones(1000, np.float32)}, path)
    before = path.read_bytes()
    import tinygen.plumbing.safetensors as module
    real_write = module._write_tensor

    def write_then_crash(f, array, dtype):
        real_write(f, array[: len(array) // 2], dtype)  # half the bytes reach the temp file
        raise OSError("disk full")

    monkeypatch.setattr(module, "_write_tensor", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_file({"w": np.zeros(1000, np.float32)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


CHILD = """
import sys, numpy as np
from tinygen.plumbing.safetensors import save_file
for version in range(1, 10**6):
    save_file({"w": np.full(1_000_000, version, np.float32)}, sys.argv[1])
    print(version, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(tinygen.__file__).parent.parent)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "1"  # one complete save on disk
        assert child.stdout.readline().strip() == "2"  # the next save is under way now
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    w = load_file(path)["w"]  # either version, complete: never a torn file
    assert w.shape == (1_000_000,) and w.min() == w.max() >= 2


# ---------------------------------------------------------------- the reference implementation


def test_cross_check_with_reference_safetensors(tmp_path):
    reference = pytest.importorskip("safetensors.numpy")
    tensors = {f"{np.dtype(d).name}{i}": sample(d, s, seed=i)
               for d in NUMPY_DTYPES for i, s in enumerate(SHAPES)}
    save_file(tensors, tmp_path / "ours.st", metadata={"format": "np"})
    theirs = reference.load_file(str(tmp_path / "ours.st"))
    assert all(np.array_equal(theirs[k], v) and theirs[k].dtype == v.dtype for k, v in tensors.items())
    reference.save_file(tensors, str(tmp_path / "theirs.st"), metadata={"format": "np"})
    ours = load_file(tmp_path / "theirs.st")
    assert all(np.array_equal(ours[k], v) and ours[k].dtype == v.dtype for k, v in tensors.items())
    # Byte for byte the same file (with at most one metadata key, whose order cannot differ).
    assert (tmp_path / "ours.st").read_bytes() == (tmp_path / "theirs.st").read_bytes()
