"""Atomic file writes and JSON reading (tinygen.plumbing.fileio): the format written, a
Ctrl-C mid-write leaves the old file and no temp file, clear errors for bad JSON and modes."""
import pytest

from tinygen.errors import TinygenError
from tinygen.plumbing.fileio import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json


def test_ctrl_c_during_atomic_open(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path, "w") as f:
            f.write("new, half written")
            temps = [p.name for p in tmp_path.iterdir() if p.name.startswith(".state.json.tmp-")]
            assert len(temps) == 1  # the temp file sits next to its target
            raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_json_format_and_read_json(tmp_path):
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2], "é": "ü"}, sort_keys=True)
    assert (tmp_path / "c.json").read_text("utf-8") == (
        '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1,\n  "é": "ü"\n}\n')
    assert read_json(tmp_path / "c.json") == {"a": [1, 2], "b": 1, "é": "ü"}
    atomic_write_bytes(tmp_path / "c.json", b'{"a": 1,\n')
    with pytest.raises(TinygenError, match=r"run config .*c\.json is not valid JSON: line 2"):
        read_json(tmp_path / "c.json", what="run config")


def test_atomic_open_rejects_other_modes(tmp_path):
    with pytest.raises(TinygenError, match="expected 'wb' or 'w'"):
        with atomic_open(tmp_path / "x", "ab"):
            pass
