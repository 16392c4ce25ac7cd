"""Atomic file writes, and JSON reading with errors that name the file.

A save that is interrupted (crash, SIGKILL, Ctrl-C, full disk) must never
leave a half-written checkpoint where a good one used to be. So every write
goes to a temporary file in the *same directory* as the target, named
`.{name}.tmp-XXXXXXXX`, and only when all bytes are written and fsync'ed is it
renamed over the target with `os.replace`:

    write .model.safetensors.tmp-1a2b3c4d -> flush -> fsync(file)
    -> os.replace(tmp, model.safetensors) -> fsync(directory)

`os.replace` is atomic on POSIX and Windows when both names are on one
filesystem (hence the same directory): a reader sees either the old file or
the new one, never a mixture. fsync before the rename makes sure the new
bytes are on disk before the name points at them; fsync of the directory
makes the rename itself durable. If the body of the write raises, the temp
file is removed and the old file is untouched. After SIGKILL or a power loss
a stray `.{name}.tmp-*` file may remain; it is never read and can be deleted.

A write the OS refuses (no space, no permission, a read-only filesystem, a
directory where a file should be, a file where a directory should be)
raises `WriteError`, an OSError naming the path, after the temp file is
removed; the command line prints it as one line and exits with code 74.

Reading: `parse_json` turns bytes into JSON values or a TinygenError that
names the file and says what is wrong, for every hostile input the tests
throw at it: invalid UTF-8, invalid JSON, nesting deep enough to exhaust the
stack, numbers too long to convert, and keys repeated within one object
(which Python's json would otherwise resolve silently to the last one).

>>> atomic_write_json("config.json", {"n_layer": 2})
>>> read_json("config.json", what="run config")
{'n_layer': 2}
"""
import contextlib
import json
import os
import secrets
import shutil
import sys

import numpy as np

from ..errors import TinygenError, WriteError


def _temp_path(path: str) -> str:
    """'/a/b/model.bin' -> '/a/b/.model.bin.tmp-1a2b3c4d' (random suffix)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{secrets.token_hex(4)}")


def _create_exclusive(path: str) -> tuple[str, int]:
    """Create a fresh temp file next to `path`; return (temp path, fd).

    O_EXCL guarantees we never reuse someone else's temp file; mode 0o666 lets
    the umask decide permissions, as a plain `open(path, "w")` would.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = _temp_path(path)
        try:
            return tmp, _open_for_writing(tmp, flags)
        except FileExistsError:  # 1 in 4 billion; try another name
            continue


def _open_for_writing(path: str, flags: int) -> int:
    """os.open(path, flags, 0o666): the one place where tinygen opens a file to write it.

    Every write of tinygen's (atomic replacements, appends) starts here, so
    the tests inject a failing disk at this one point (tests/test_errors.py).
    """
    return os.open(path, flags, 0o666)


def _fsync_directory(directory: str) -> None:
    """Make a rename in `directory` durable, where the OS supports it.

    Windows cannot open a directory for fsync and some filesystems refuse;
    the rename is still atomic there, just possibly not yet durable.
    """
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open `path` for writing so that it is replaced all at once or not at all.

    `mode` is "wb" (binary) or "w" (text, UTF-8). Yields a file object on a
    temp file in the same directory; on normal exit it is flushed, fsync'ed
    and renamed over `path`. On any exception (including KeyboardInterrupt)
    the temp file is deleted, `path` is left as it was, and the exception
    propagates.

    >>> with atomic_open("weights.bin") as f:
    ...     for chunk in [b"ab", b"cd"]:
    ...         n = f.write(chunk)               # an old weights.bin would still be intact here
    >>> open("weights.bin", "rb").read()
    b'abcd'
    """
    if mode not in ("wb", "w"):
        raise TinygenError(f"atomic_open mode {mode!r}: expected 'wb' or 'w'")
    path = os.fspath(path)
    try:
        tmp, fd = _create_exclusive(path)
    except OSError as e:  # no such directory, no permission, read-only filesystem, ...
        raise WriteError(path, e) from e
    try:
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # a temp file we cannot remove is left, never read
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from e
        raise
    _fsync_directory(os.path.dirname(path))


def atomic_write_bytes(path, data: bytes) -> None:
    """Replace `path` with `data` atomically.

    >>> atomic_write_bytes("ids.bin", b"\\x01\\x02")
    >>> open("ids.bin", "rb").read()
    b'\\x01\\x02'
    """
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    """Replace `path` with `text` (UTF-8, newlines written as given) atomically.

    >>> atomic_write_text("notes.txt", "loss 3.2\\n")
    >>> open("notes.txt", encoding="utf-8").read()
    'loss 3.2\\n'
    """
    with atomic_open(path, "w") as f:
        f.write(text)


def append_bytes(path, data: bytes) -> None:
    """Append `data` to `path` (created if missing) with one write; all of it or none of it.

    A write the OS refuses part-way (a full disk) is cut back off the file,
    so a log never ends in half a line; then WriteError. (A SIGKILL in the
    middle can still leave a torn last line, which readers skip.)

    >>> append_bytes("metrics.jsonl", b'{"step": 1}\\n')
    >>> append_bytes("metrics.jsonl", b'{"step": 2}\\n')
    >>> open("metrics.jsonl", "rb").read()
    b'{"step": 1}\\n{"step": 2}\\n'
    """
    path = os.fspath(path)
    try:
        fd = _open_for_writing(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        written = 0
        while written < len(data):  # os.write may write less than it was given
            written += os.write(fd, data[written:])
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)
        raise WriteError(path, e) from e
    finally:
        os.close(fd)


def atomic_copy(source, path) -> None:
    """Copy the file `source` to `path` atomically (a failed copy leaves no partial `path`).

    >>> atomic_write_text("tokenizer.json", "{}\\n")
    >>> atomic_copy("tokenizer.json", "copy.json")
    >>> open("copy.json", encoding="utf-8").read()
    '{}\\n'
    """
    with open(source, "rb") as src, atomic_open(path, "wb") as f:
        shutil.copyfileobj(src, f)


def make_dirs(path) -> None:
    """os.makedirs(path, exist_ok=True), failing with WriteError (a file in the way, no permission, ...).

    >>> make_dirs("runs/new")
    >>> os.path.isdir("runs/new")
    True
    >>> atomic_write_text("runs/file", "")
    >>> make_dirs("runs/file/sub")
    Traceback (most recent call last):
    tinygen.errors.WriteError: cannot write runs/file/sub: ...
    """
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e) from e


def atomic_write_json(path, obj, sort_keys: bool = False) -> None:
    """Replace `path` with `obj` as JSON: indent=2, UTF-8, one trailing newline.

    >>> atomic_write_json("config.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    >>> open("config.json", encoding="utf-8").read()
    '{\\n  "a": [\\n    1,\\n    2\\n  ],\\n  "b": 1\\n}\\n'
    """
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False, default=_numpy_scalar)
    atomic_write_text(path, text + "\n")


def _numpy_scalar(value):
    """JSON for a NumPy scalar, which a config may hold (configs accept np.int64(5)): its Python value."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def read_json(path, what: str = "JSON file"):
    """Parse the JSON file at `path`; anything but valid JSON -> TinygenError naming it.

    `what` says what the file is for, so the message reads e.g.
    "run config run/config.json: not valid JSON (line 3 column 1: Expecting value)".
    A missing file raises FileNotFoundError as usual.

    >>> atomic_write_text("config.json", '{"a": [1, 2], "b": 1}')
    >>> read_json("config.json", what="model config")
    {'a': [1, 2], 'b': 1}
    >>> atomic_write_text("config.json", '{"a": [1, 2],')
    >>> read_json("config.json", what="model config")
    Traceback (most recent call last):
    tinygen.errors.TinygenError: model config config.json: not valid JSON (column 14: ...); the text ends early (truncated?)
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    return parse_json(raw, f"{what} {path}")


def parse_json(raw, where: str):
    """JSON bytes (or str) -> value; any problem -> TinygenError "WHERE: what is wrong".

    Stricter than json.loads: a key repeated in one object is an error (not
    "the last one wins"), and the exceptions json.loads lets through for
    hostile input (RecursionError for deep nesting, ValueError for an integer
    of more than sys.get_int_max_str_digits() digits) become TinygenError.
    NaN and Infinity are accepted, as Python writes them; callers check values.

    >>> parse_json(b'{"a": [1, 2]}', "x.json")
    {'a': [1, 2]}
    >>> parse_json(b'{"a": 1, "a": 2}', "x.json")
    Traceback (most recent call last):
    ...
    tinygen.errors.TinygenError: x.json: the key 'a' appears twice in one object
    """
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TinygenError(f"{where}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                               f"({e.reason})") from None
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except _RepeatedKey as e:
        raise TinygenError(f"{where}: the key {e.key!r:.80} appears twice in one object") from None
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
        early = "; the text ends early (truncated?)" if e.pos >= len(e.doc.rstrip()) else ""
        raise TinygenError(f"{where}: not valid JSON ({at}: {e.msg}){early}") from None
    except RecursionError:
        raise TinygenError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as e:  # an integer of more digits than int() converts (sys.get_int_max_str_digits())
        limit = getattr(sys, "get_int_max_str_digits", lambda: None)()
        what = f"an integer of more than {limit} digits" if limit else f"a number Python cannot read ({e})"
        raise TinygenError(f"{where}: JSON holds {what}") from None


class _RepeatedKey(Exception):
    def __init__(self, key):
        self.key = key


def _unique_keys(pairs):
    """json's object_pairs_hook: [("a", 1), ("b", 2)] -> {"a": 1, "b": 2}; a repeated key raises."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return obj
