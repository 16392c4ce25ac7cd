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

>>> atomic_write_json("config.json", {"n_layer": 2})
>>> read_json("config.json", what="run config")
{'n_layer': 2}
"""
import contextlib
import json
import os
import secrets

import numpy as np

from ..errors import TinygenError


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
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:  # 1 in 4 billion; try another name
            continue


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
    tmp, fd = _create_exclusive(path)
    try:
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
    """Parse the JSON file at `path`; malformed JSON -> TinygenError naming it.

    `what` says what the file is for, so the message reads e.g.
    "run config run/config.json is not valid JSON: line 3 column 1: ...".
    A missing file raises FileNotFoundError as usual.

    >>> atomic_write_text("config.json", '{"a": [1, 2], "b": 1}')
    >>> read_json("config.json", what="model config")
    {'a': [1, 2], 'b': 1}
    >>> atomic_write_text("config.json", '{"a": [1, 2],')
    >>> read_json("config.json", what="model config")
    Traceback (most recent call last):
    tinygen.errors.TinygenError: model config config.json is not valid JSON: line 1 column 14: ...
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TinygenError(f"{what} {path} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise TinygenError(
            f"{what} {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        raise TinygenError(f"{what} {path} is nested too deeply to parse") from None
