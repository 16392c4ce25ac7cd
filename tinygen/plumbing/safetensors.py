"""safetensors files, read and written with NumPy alone.

A safetensors file is three parts, with nothing executable anywhere:

    bytes 0..8        N, the header length: unsigned 64-bit little-endian
    bytes 8..8+N      the header: UTF-8 JSON, padded with spaces to N bytes
    bytes 8+N..end    the data region: every tensor's raw bytes, back to back

The header maps each tensor name to {"dtype": "F32", "shape": [2, 3],
"data_offsets": [begin, end]}, offsets counted from the start of the data
region; the optional key "__metadata__" holds a {str: str} map. Tensors are
little-endian and C-ordered. See docs/safetensors.md for a byte-level walk.

The reader trusts nothing in the file: the header length is checked against
the file size before anything is read (so an absurd length allocates
nothing), and every entry is validated (dtype, shape, offsets, byte counts,
exact contiguous coverage of the data region) before any tensor is read.
Every problem raises `SafetensorsError`, naming the file and what is wrong.

dtypes: BOOL U8 I8 I16 U16 F16 BF16 I32 U32 F32 F64 I64 U64. NumPy has no
bfloat16, so BF16 tensors load as float32 (exactly: a bfloat16 is the top
half of a float32) and cannot be written.

>>> save_file({"wte": np.zeros((4, 2), np.float32)}, "m.safetensors")
>>> load_file("m.safetensors")["wte"].shape
(4, 2)
"""
import collections
import json
import os
import struct
from typing import NamedTuple

import numpy as np

from ..errors import TinygenError
from .fileio import atomic_open

# safetensors dtype -> NumPy dtype of the bytes on disk. The order is the
# reference implementation's `Dtype` enum (increasing alignment); the writer
# lays tensors out in the reverse order, as the reference does.
DTYPES = {
    "BOOL": "|b1", "U8": "|u1", "I8": "|i1",
    "I16": "<i2", "U16": "<u2", "F16": "<f2", "BF16": "<u2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4",
    "F64": "<f8", "I64": "<i8", "U64": "<u8",
}
# NumPy kind+size ('f4', 'b1', ...) -> safetensors dtype, for the writer.
NUMPY_TO_DTYPE = {np.dtype(code).str[1:]: name for name, code in DTYPES.items() if name != "BF16"}
METADATA_KEY = "__metadata__"
HEADER_FIELDS = ("dtype", "shape", "data_offsets")
MAX_HEADER_BYTES = 100_000_000  # the reference refuses larger headers too


class SafetensorsError(TinygenError):
    """A safetensors file (or tensors to be saved) is malformed; the message says where and how."""


class TensorInfo(NamedTuple):
    """One header entry, validated. data_offsets are relative to the data region."""

    dtype: str               # e.g. "F32"
    shape: tuple             # e.g. (768, 2304); () for a scalar
    data_offsets: tuple      # (begin, end), end - begin == prod(shape) * itemsize


class Header(NamedTuple):
    """A validated header: entries in file order, metadata, where data starts."""

    tensors: dict            # name -> TensorInfo
    metadata: dict           # str -> str; {} when the file has none
    data_start: int          # byte offset of the data region in the file: 8 + N


# ---------------------------------------------------------------- writing


def _dtype_name(name: str, array) -> str:
    """np.float32 array (or NumPy scalar) -> 'F32'; bool -> 'BOOL'; object, complex -> error."""
    if not isinstance(array, (np.ndarray, np.generic)):
        raise SafetensorsError(
            f"tensor {name!r} is a {type(array).__name__}; expected a numpy ndarray (use np.asarray)"
        )
    dtype = NUMPY_TO_DTYPE.get(array.dtype.str[1:])
    if dtype is None:
        raise SafetensorsError(
            f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store; "
            f"expected one of {sorted(NUMPY_TO_DTYPE.values())}"
        )
    return dtype


def _check_metadata(metadata, where: str) -> None:
    """A {str: str} dict passes; anything else -> error naming `where`."""
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsError(f"{where}: metadata must map str to str, got {metadata!r:.200}")


def _layout(tensors: dict) -> dict:
    """Names -> TensorInfo in write order: widest dtype first, then by name.

    This is the reference's order (sort by dtype alignment descending, then
    name), so 8-byte tensors come first and every tensor starts at an offset
    that is a multiple of its own itemsize.

    >>> _layout({"b": np.zeros(2, np.uint8), "a": np.zeros(1, np.float64)})
    {'a': TensorInfo(dtype='F64', shape=(1,), data_offsets=(0, 8)), \
'b': TensorInfo(dtype='U8', shape=(2,), data_offsets=(8, 10))}
    """
    if not isinstance(tensors, dict):
        raise SafetensorsError(f"tensors must be a dict of name -> ndarray, got {type(tensors).__name__}")
    rank = {name: i for i, name in enumerate(DTYPES)}
    named = []
    for name, array in tensors.items():
        if not isinstance(name, str) or name == METADATA_KEY:
            raise SafetensorsError(f"tensor name {name!r}: expected a str other than {METADATA_KEY!r}")
        named.append((name, _dtype_name(name, array), array))
    named.sort(key=lambda t: (-rank[t[1]], t[0]))
    layout, offset = {}, 0
    for name, dtype, array in named:
        layout[name] = TensorInfo(dtype, tuple(array.shape), (offset, offset + array.nbytes))
        offset += array.nbytes
    return layout


def _header_bytes(layout: dict, metadata) -> bytes:
    """The 8-byte length plus the JSON header, space-padded to a multiple of 8.

    Compact JSON (no spaces) and raw UTF-8, "__metadata__" first, as the
    reference writes it; the padding makes the data region start 8-aligned.
    Metadata keys are sorted so equal inputs give equal bytes (the reference
    keeps them in a hash map, in no fixed order).

    >>> _header_bytes({}, None)
    b'\\x08\\x00\\x00\\x00\\x00\\x00\\x00\\x00{}      '
    """
    header = {} if metadata is None else {METADATA_KEY: dict(sorted(metadata.items()))}
    for name, info in layout.items():
        header[name] = {"dtype": info.dtype, "shape": list(info.shape),
                        "data_offsets": list(info.data_offsets)}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write `tensors` (name -> ndarray or NumPy scalar) to `path` as safetensors, atomically.

    Arrays are written little-endian and C-ordered, one tensor at a time (a
    tensor that is not already C-contiguous little-endian is copied, alone),
    so the whole model is never duplicated in memory. `metadata` is an
    optional {str: str} map stored under "__metadata__". The file appears at
    `path` only once complete (see tinygen.plumbing.fileio).

    >>> save_file({"h.0.ln_1.weight": np.ones(768, np.float32)}, "ckpt.safetensors",
    ...           metadata={"format": "np"})
    >>> load_metadata("ckpt.safetensors")
    {'format': 'np'}
    """
    path = os.fspath(path)
    layout = _layout(tensors)
    if metadata is not None:
        _check_metadata(metadata, f"saving {path}")
    with atomic_open(path, "wb") as f:
        f.write(_header_bytes(layout, metadata))
        for name, info in layout.items():
            _write_tensor(f, tensors[name], info.dtype)


def _write_tensor(f, array: np.ndarray, dtype: str) -> None:
    """Write `array`'s bytes little-endian, C order; copies only if needed."""
    array = np.asarray(array).astype(DTYPES[dtype], order="C", copy=False)
    f.write(array.reshape(-1).view(np.uint8).data)


# ---------------------------------------------------------------- reading


def _error(path, what: str) -> SafetensorsError:
    """The error for file `path`: 'safetensors file m.st: <what is wrong>'."""
    return SafetensorsError(f"safetensors file {path}: {what}")


def _parse_json(raw: bytes, path) -> dict:
    """Header bytes -> dict; rejects non-UTF-8, non-JSON, duplicate keys, NaN."""

    def no_duplicates(pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):  # JSON allows repeats; Python would keep the last silently
            dupes = sorted(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
            raise _error(path, f"header has duplicate keys {dupes!r:.200}")
        return obj

    def no_constants(word):
        raise _error(path, f"header contains {word}, which is not JSON")

    if not raw.startswith(b"{"):
        raise _error(path, f"header should start with '{{' but starts with {raw[:16]!r}; not a safetensors file?")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates,
                         parse_constant=no_constants)
    except SafetensorsError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError are ValueErrors
        raise _error(path, f"header is not valid UTF-8 JSON ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(obj, dict):
        raise _error(path, f"header should be a JSON object, got {type(obj).__name__}")
    return obj


def _is_count(x) -> bool:
    """A JSON non-negative integer (True/False are ints in Python, but not here)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _element_count(shape: list, name: str, path) -> int:
    """[2, 3] -> 6, [] -> 1, [0, 10**30] -> 0; a count of 2**64 or more -> error.

    Like the reference's checked multiplication: an absurd shape is refused
    before anyone computes or prints a number with thousands of digits.
    """
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:
        count *= dim
        if count >= 2**64:
            raise _error(path, f"tensor {name!r:.100}: shape {shape!r:.100} has 2**64 or more elements")
    return count


def _check_entry(name: str, entry, path) -> TensorInfo:
    """One header entry -> TensorInfo, or an error saying which field is wrong."""
    if not isinstance(entry, dict) or sorted(entry) != sorted(HEADER_FIELDS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise _error(path, f"tensor {name!r:.100}: expected exactly the fields {list(HEADER_FIELDS)}, got {got}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _error(path, f"tensor {name!r:.100}: unknown or unsupported dtype {dtype!r:.50}; expected one of {list(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _error(path, f"tensor {name!r:.100}: shape {shape!r:.100} should be a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise _error(path, f"tensor {name!r:.100}: data_offsets {offsets!r:.100} should be [begin, end], 0 <= begin <= end")
    nbytes = _element_count(shape, name, path) * np.dtype(DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _error(path, f"tensor {name!r:.100}: {dtype} shape {shape!r:.100} needs {nbytes} bytes "
                           f"but data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return TensorInfo(dtype, tuple(shape), tuple(offsets))


def _check_coverage(tensors: dict, data_len: int, path) -> None:
    """The tensors must tile the data region [0, data_len) exactly: no gap, no overlap."""
    expected, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].data_offsets):
        begin, end = info.data_offsets
        if end > data_len:
            raise _error(path, f"tensor {name!r:.100} ends at byte {end} of the data region, which holds only "
                               f"{data_len} bytes; the file is truncated or corrupt")
        if begin != expected:
            problem = f"overlaps tensor {previous!r:.100}" if begin < expected else "leaves a gap before it"
            raise _error(path, f"tensor {name!r:.100} starts at byte {begin}, expected {expected}: it {problem}")
        expected, previous = end, name
    if expected != data_len:
        raise _error(path, f"tensors cover {expected} bytes but the data region holds {data_len}; "
                           f"trailing bytes belong to no tensor")


def _read_exact(f, n: int, path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _error(path, f"file ended inside the {what} ({len(data)} of {n} bytes)")
    return data


def _read_header(f, path) -> Header:
    """Validate and return the header of the open file `f`, leaving data unread."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise _error(path, f"file is {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", _read_exact(f, 8, path, "header length"))
    if n > size - 8:  # checked before reading, so an absurd N allocates nothing
        raise _error(path, f"header length {n} bytes runs past the end of the {size}-byte file; "
                           f"the file is truncated or not safetensors")
    if n > MAX_HEADER_BYTES:
        raise _error(path, f"header length {n} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    obj = _parse_json(_read_exact(f, n, path, "header"), path)
    metadata = obj.pop(METADATA_KEY, None)
    if metadata is not None:  # null is allowed, as in the reference
        _check_metadata(metadata, f"safetensors file {path}: {METADATA_KEY}")
    tensors = {name: _check_entry(name, entry, path) for name, entry in obj.items()}
    _check_coverage(tensors, size - 8 - n, path)
    return Header(tensors, metadata or {}, 8 + n)


def read_header(path) -> Header:
    """The validated header of the safetensors file at `path`; no tensor data is read.

    >>> save_file({"wte": np.zeros((4, 2), np.float32)}, "m.safetensors")
    >>> read_header("m.safetensors").tensors["wte"]
    TensorInfo(dtype='F32', shape=(4, 2), data_offsets=(0, 32))
    """
    with open(path, "rb") as f:
        return _read_header(f, path)


def load_metadata(path) -> dict:
    """The "__metadata__" map of the file at `path` ({} if it has none)."""
    return read_header(path).metadata


def _read_tensor(f, name: str, info: TensorInfo, data_start: int, path) -> np.ndarray:
    """Read one validated tensor into a fresh, writable, native-endian array."""
    disk = np.dtype("|u1" if info.dtype == "BOOL" else DTYPES[info.dtype])
    try:
        array = np.empty(info.shape, disk)
    except (ValueError, OverflowError) as e:  # e.g. more dims than NumPy allows, or (0, 2**62)
        raise _error(path, f"tensor {name!r:.100}: NumPy cannot hold shape {info.shape!r:.100}: {e}")
    if array.nbytes:
        f.seek(data_start + info.data_offsets[0])
        got = f.readinto(array.reshape(-1).view(np.uint8))
        if got != array.nbytes:
            raise _error(path, f"tensor {name!r:.100}: file ended after {got} of {array.nbytes} bytes")
    if info.dtype == "BOOL":
        return array.astype(bool)  # any nonzero byte is True
    if info.dtype == "BF16":  # bfloat16 bits are the top 16 bits of a float32
        wide = array.astype(np.uint32)
        wide <<= 16  # in place: `wide << 16` would turn a 0-d array into a scalar
        return wide.view(np.float32)
    return array.astype(disk.newbyteorder("="), copy=False)  # no copy on little-endian hosts


def load_file(path) -> dict:
    """All tensors of the safetensors file at `path`, as name -> ndarray, in file order.

    Arrays are fresh, writable and native-endian; F16 loads as float16, BF16
    as float32, BOOL as bool. Memory used is the tensors' own size, never
    more than the file holds.

    >>> save_file({"wte": np.zeros((4, 2), np.float32)}, "m.safetensors")
    >>> load_file("m.safetensors")
    {'wte': array([[0., 0.], ...], dtype=float32)}
    """
    with open(path, "rb") as f:
        header = _read_header(f, path)
        order = sorted(header.tensors.items(), key=lambda kv: kv[1].data_offsets)
        return {name: _read_tensor(f, name, info, header.data_start, path) for name, info in order}
