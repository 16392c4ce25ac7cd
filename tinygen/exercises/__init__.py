"""Exercises that tinygen grades: write each layer yourself, check it against tinygen.

    tinygen exercises start my-gpt        # one stub file per exercise, in learning-path order
    tinygen exercises check my-gpt        # a table: exercise, status, first failing tensor, error, hint
    tinygen exercises check my-gpt gelu   # one exercise

Each stub (tinygen/exercises/stubs/) has the signatures, docstrings with
shapes and hints, and bodies that raise NotImplementedError; it imports
nothing from tinygen. `check` runs each exercise whose functions are no
longer stubs against tinygen in float64 (tinygen/exercises/checks.py):
forward values, the backward against tinygen's and against finite
differences, and properties where they apply (causality, roundtrips). An
exercise is "not started" (no error), "passes", "fails" (with the first
tensor that disagrees and a hint) or a "bad file" (a syntax error, a
changed signature, an import that raises: one line, never a traceback).
"""
import os
import shutil
from pathlib import Path

from ..errors import TinygenError
from .checks import CHECKS, HINTS
from .grading import BadFile, Mismatch, Result, describe, inspect_file, leave_folder, load_module, quiet, stub_signatures

STUBS = Path(__file__).resolve().parent / "stubs"
FILES = sorted(p.name for p in STUBS.glob("ex[0-9][0-9]_*.py"))  # in learning-path order
EXERCISES = {f[5:-3]: f for f in FILES}  # "linear" -> "ex01_linear.py"
assert list(EXERCISES) == list(CHECKS), "every stub has a check, in the same order"


def start(directory) -> list:
    """Copy the stubs into `directory` (created if needed); existing files are kept. Returns [(file, written)]."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise TinygenError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    done = []
    for name in FILES:
        target = directory / name
        written = not target.exists()
        if written:
            shutil.copyfile(STUBS / name, target)
        done.append((name, written))
    return done


def resolve(name) -> str:
    """'gelu', 'ex04_gelu', 'ex04_gelu.py' or '4' -> 'gelu'."""
    text = str(name).removesuffix(".py")
    for short, file in EXERCISES.items():
        if text in (short, file[:-3], file[2:4], file[2:4].lstrip("0")):
            return short
    raise TinygenError(f"no exercise {name!r}; they are: {', '.join(EXERCISES)}")


def grade(directory, name) -> Result:
    """Grade one exercise of `directory`."""
    path = os.path.join(os.fspath(directory), EXERCISES[name])
    if not os.path.isfile(path):
        return Result(name, "not started", hint=f"no {EXERCISES[name]}: tinygen exercises start {directory}")
    try:
        if inspect_file(path, stub_signatures(STUBS / EXERCISES[name])):
            return Result(name, "not started")
        module = load_module(path, name)
    except BadFile as e:
        leave_folder(path)
        return Result(name, "bad file", str(e), hint=f"{EXERCISES[name]}: fix it, or copy the stub again")
    try:
        with quiet():
            CHECKS[name](module)
        return Result(name, "passes")
    except Mismatch as e:
        return Result(name, "fails", e.tensor, e.error, e.hint)
    except NotImplementedError as e:
        what = describe(e).replace("NotImplementedError", "a function still raises NotImplementedError")
        return Result(name, "fails", what, hint="finish every function of the file (and the exercises it imports)")
    except Exception as e:  # the learner's code: report it on one line
        return Result(name, "fails", f"raised {describe(e)}", hint=f"read {HINTS[name]}")
    finally:
        leave_folder(path)


def check(directory, name=None) -> tuple:
    """Grade every exercise (or one). Returns ([Result], ok): ok when everything started passes."""
    if not os.path.isdir(os.fspath(directory)):
        raise TinygenError(f"{directory} is not a directory; create the exercises with: tinygen exercises start {directory}")
    names = [resolve(name)] if name is not None else list(EXERCISES)
    results = [grade(directory, n) for n in names]
    return results, all(r.status in ("passes", "not started") for r in results)


def format_results(results) -> str:
    """The table `tinygen exercises check` prints."""
    rows = [("exercise", "status", "first failing tensor", "max rel err", "hint")]
    for r in results:
        err = "" if r.error is None else f"{r.error:.1e}"
        rows.append((r.exercise, r.status, r.tensor, err, r.hint))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.insert(1, "-" * min(120, max(map(len, lines))))
    counts = {s: sum(r.status == s for r in results) for s in ("passes", "fails", "bad file", "not started")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return "\n".join(line.rstrip() for line in lines) + f"\n\n{summary}"
