"""The package as users get it: `tinygen --version`, and a wheel built from the checkout that
works in a fresh virtual environment, far from the checkout.

The wheel test builds, installs and runs (about a minute), so it runs in CI (CI=true) or
when TINYGEN_TEST_WHEEL=1; .ci/run runs it under every declared Python version.
"""
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import tinygen
from tinygen.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
RUN_WHEEL_TEST = os.environ.get("CI") == "true" or os.environ.get("TINYGEN_TEST_WHEEL") == "1"


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"tinygen {tinygen.__version__}\n"


def _run(args, cwd, env):
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


@pytest.mark.skipif(not RUN_WHEEL_TEST, reason="builds and installs a wheel (~1 min): CI=true or TINYGEN_TEST_WHEEL=1")
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ROOT], tmp_path, env)
    (wheel,) = dist.glob("tinygen-*.whl")
    assert wheel.name.startswith(f"tinygen-{tinygen.__version__}-py3-none-any")

    # every module of the package is in the wheel, and nothing from the checkout's tests
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"tinygen-{tinygen.__version__}.dist-info/METADATA").decode()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tinygen").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert not any(n.startswith("tests/") for n in names)
    assert "Requires-Dist: numpy" in metadata and "Requires-Dist: regex" in metadata

    # a fresh environment, used from a directory that has no tinygen in it
    env_dir, work = tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    _run([python, "-m", "pip", "install", "-q", wheel], work, env)
    location = _run([python, "-c", "import tinygen; print(tinygen.__file__)"], work, env).strip()
    assert Path(location).resolve().is_relative_to(env_dir.resolve()), location
    assert _run([bin_dir / "tinygen", "--version"], work, env) == f"tinygen {tinygen.__version__}\n"
    assert "usage: tinygen demo" in _run([bin_dir / "tinygen", "demo", "--help"], work, env)
    report = _run([bin_dir / "tinygen", "gradcheck"], work, env)  # exit status 0: every check passed
    assert "passed" in report, report
