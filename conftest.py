"""The docstring examples of tinygen/ (`--doctest-modules`, see setup.cfg) run in a fresh
temporary directory, so the examples that write files (atomic writes, safetensors) write there."""
import pytest

# The exercise stubs are templates a learner copies into a folder of their own, where ex08 and
# ex09 import their siblings (`from ex01_linear import ...`); they hold no docstring examples and
# cannot be imported as tinygen.exercises.stubs.* (tinygen never imports them).
collect_ignore_glob = ["tinygen/exercises/stubs/*.py"]


@pytest.fixture(autouse=True)
def _doctests_run_in_a_temporary_directory(request):
    if type(request.node).__name__ == "DoctestItem":
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))
