"""The docstring examples of tinygen/ (`--doctest-modules`, see setup.cfg) run in a fresh
temporary directory, so the examples that write files (atomic writes, safetensors) write there."""
import pytest


@pytest.fixture(autouse=True)
def _doctests_run_in_a_temporary_directory(request):
    if type(request.node).__name__ == "DoctestItem":
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))
