"""Fine-tuning data: prompt/completion pairs, a built-in multi-task set, masked batches.

A fine-tuning example is a prompt and a completion. The model reads
prompt + completion + <|endoftext|> and is trained to predict only the
completion and the end-of-text token:

    tokens   p0 p1 p2 c0 c1 EOT          (prompt p, completion c)
    idx      p0 p1 p2 c0 c1              (B, T) inputs
    targets  -1 -1 c0 c1 EOT             (B, T) -1 = IGNORE: no loss

Batches are padded on the right to the longest sequence of the batch, the
padding's inputs are EOT and its targets IGNORE, so padding changes nothing
(attention is causal: real positions never see the padding after them).

Files are JSONL, one object per line:
    {"prompt": "add: 2 3\\n=>", "completion": " 5", "task": "add", "metric": "exact_match"}
("task" is optional and only groups the evaluation; "metric", optional, a
name or a list of names of tinygen.finetuning.metrics.METRICS, says how the
task's completions are scored besides the loss and exact match; every line of
a task must name the same.) A malformed line is a TinygenError naming the
file and the line number.

The built-in set (`builtin_examples`) is derived with `ast` from the running
Python's standard library, real text nobody here wrote; three tasks:

    summarize   a function's code (signature + first body lines) -> first line of its docstring
    name        the first line of a function's docstring         -> the function's name
    args        a function's code with "def name(...)"            -> its parameter list

Every prompt starts with its task's name ("name:\\n..."), which is what makes
one model multi-task. Train / validation / test are split by top-level
module (a hash of its name), so the test functions come from modules that
fine-tuning never saw.

Shapes: B batch, T time (longest sequence of the batch, at most block_size).
"""
import ast
import json
import os
import sysconfig
import textwrap
import zlib
from typing import NamedTuple

import numpy as np

from ..errors import TinygenError
from ..fim import fim_ids, rearrange
from ..loss import IGNORE
from ..plumbing.fileio import atomic_open, parse_json
from .metrics import check_metric_names

TASKS = ("summarize", "name", "args")
SPLITS = ("train", "val", "test")
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo"}


class Example(NamedTuple):
    prompt: str
    completion: str
    task: str = "default"
    metrics: tuple = ()  # names in metrics.METRICS; () = the task's default (metrics.TASK_METRICS)


class Encoded(NamedTuple):
    ids: np.ndarray  # (n,) int64: prompt + completion + EOT
    n_prompt: int  # how many leading ids are the prompt
    task: str


# ------------------------------------------------------------------ JSONL
def read_jsonl(path) -> list:
    """Examples of a JSONL file; a malformed line raises TinygenError "FILE:LINE: why".

    Blank lines are skipped, and a UTF-8 byte-order mark at the start. Each
    line must be UTF-8 JSON (not nested too deeply, no key twice); "prompt"
    and "completion" must be strings (the completion non-empty); "task",
    when present, a non-empty string.
    """
    path = os.fspath(path)
    examples = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            examples.append(_example(parse_json(raw, f"{path}:{n}"), f"{path}:{n}"))
    if not examples:
        raise TinygenError(f"{path}: no examples (expected JSONL lines with \"prompt\" and \"completion\")")
    named = {}
    for n, e in enumerate(examples, 1):
        if named.setdefault(e.task, e.metrics) != e.metrics:
            raise TinygenError(f"{path}: task {e.task!r} is scored by {list(named[e.task]) or 'default'} on one "
                               f"line and {list(e.metrics) or 'default'} on another (example {n}); name one metric per task")
    return examples


def _example(obj, where) -> Example:
    if not isinstance(obj, dict):
        raise TinygenError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "completion"):
        if key not in obj:
            raise TinygenError(f"{where}: missing \"{key}\" (each line needs \"prompt\" and \"completion\")")
        if not isinstance(obj[key], str):
            raise TinygenError(f"{where}: \"{key}\" must be a string, got {type(obj[key]).__name__}")
    if not obj["completion"]:
        raise TinygenError(f"{where}: \"completion\" is empty; there would be nothing to learn")
    task = obj.get("task", "default")
    if not isinstance(task, str) or not task:
        raise TinygenError(f"{where}: \"task\" must be a non-empty string, got {task!r}")
    metrics = obj.get("metric", [])
    if not (isinstance(metrics, str) or (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics))):
        raise TinygenError(f"{where}: \"metric\" must be a metric name or a list of them, got {metrics!r}")
    return Example(obj["prompt"], obj["completion"], task, check_metric_names(metrics, where))


def write_jsonl(path, examples) -> None:
    """Write examples as JSONL (the format read_jsonl reads), atomically."""
    with atomic_open(path, "w") as f:
        for e in examples:
            metric = {"metric": list(e.metrics)} if e.metrics else {}
            f.write(json.dumps({"prompt": e.prompt, "completion": e.completion, "task": e.task, **metric}) + "\n")


def split_examples(examples, val_fraction=0.1, test_fraction=0.1, seed=0) -> dict:
    """A user's examples -> {"train", "val", "test"}, shuffled deterministically by `seed`.

    Tiny files keep at least one training example; val/test may be empty.
    """
    order = np.random.default_rng(seed).permutation(len(examples))
    n_test = int(len(examples) * test_fraction)
    n_val = int(len(examples) * val_fraction)
    picked = [examples[i] for i in order]
    return {"test": picked[:n_test], "val": picked[n_test:n_test + n_val], "train": picked[n_test + n_val:]}


# ------------------------------------------------------------------ built-in tasks
def format_prompt(task: str, text: str) -> str:
    """The built-in prompt: task name, input, an arrow; the completion follows after a space.

    >>> format_prompt("name", "Return the sum.")
    'name:\\nReturn the sum.\\n=>'
    """
    return f"{task}:\n{text}\n=>"


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def module_split(module: str) -> str:
    """"train", "val" or "test" for a top-level module name, by a stable hash (80/10/10).

    >>> module_split("json"), module_split("csv"), module_split("datetime")
    ('train', 'val', 'test')
    """
    r = zlib.crc32(module.encode()) % 10
    return "test" if r == 0 else "val" if r == 1 else "train"


def stdlib_files(root=None) -> list:
    """(top-level module, path) of every .py file of the standard library, sorted;
    test suites and site-packages are left out."""
    root = os.fspath(root or stdlib_dir())
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                top = rel.split(os.sep)[0]
                files.append((top[:-3] if top.endswith(".py") else top, path))
    return files


def function_examples(source: str, max_code_chars=200, max_lines=4) -> list:
    """Built-in examples of every documented function in one module's source.

    >>> [e.task for e in function_examples('def add(a, b):\\n    "Add two numbers."\\n    return a + b\\n')]
    ['summarize', 'name', 'args']
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in _functions(tree.body):
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2 or node.name.startswith("__"):
            continue
        summary = doc.strip().splitlines()[0].strip()
        if not 8 <= len(summary) <= 80 or len(node.name) > 30:
            continue
        args = ast.unparse(node.args)
        if len(args) > 60:
            continue
        body = _code_lines(lines, node.body[1].lineno, node.end_lineno, max_lines, max_code_chars)
        if not body:
            continue
        head = f"def {node.name}("
        out += [
            Example(format_prompt("summarize", f"{head}{args}):\n{body}"), " " + summary, "summarize"),
            Example(format_prompt("name", summary), " " + node.name, "name"),
            Example(format_prompt("args", f"{head}...):\n{body}"), " " + args, "args"),
        ]
    return out


def _functions(body):
    """Every function definition among these statements and the statements nested in
    them (classes, functions, if/try/with/loops), in source order. Expressions are
    never entered, which makes this several times faster than ast.walk."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                yield from _functions(children)


def _code_lines(lines, first, last, max_lines, max_chars) -> str:
    """Up to max_lines non-blank, non-comment lines first..last (1-based), dedented,
    cut at a line boundary to at most max_chars."""
    picked = [ln for ln in lines[first - 1:last] if ln.strip() and not ln.strip().startswith("#")][:max_lines]
    text = textwrap.dedent("\n".join(picked))
    kept = []
    for ln in text.splitlines():
        if sum(len(k) + 1 for k in kept) + len(ln) > max_chars:
            break
        kept.append("    " + ln.rstrip())
    return "\n".join(kept)


def builtin_examples(tasks=TASKS, root=None) -> dict:
    """{"train" | "val" | "test": [Example]} of the built-in tasks, split by module.

    Deterministic for a given Python version: files in sorted order, functions
    in source order. Validation/test examples whose prompt also occurs in
    the training split (copied code) are dropped, so held-out means unseen.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise TinygenError(f"unknown built-in task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    splits = {s: [] for s in SPLITS}
    for module, path in stdlib_files(root):
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        splits[module_split(module)] += [e for e in function_examples(source) if e.task in tasks]
    seen = {e.prompt for e in splits["train"]}
    for s in ("val", "test"):
        unique, kept = set(), []
        for e in splits[s]:
            if e.prompt not in seen and e.prompt not in unique:
                unique.add(e.prompt)
                kept.append(e)
        splits[s] = kept
    return splits


def heldout_modules(root=None) -> set:
    """Top-level modules in the val and test splits (pretraining leaves them out)."""
    return {m for m, _ in stdlib_files(root) if module_split(m) != "train"}


# ------------------------------------------------------------------ tokens and batches
def encode_examples(examples, tokenizer, block_size, eot_id=None) -> list:
    """Token ids of each example: prompt + completion + EOT, at most block_size + 1 ids.

    A longer example loses the start of its prompt (the completion is what
    is learned); one whose completion alone does not fit is dropped.
    """
    eot = tokenizer.eot_id if eot_id is None else eot_id
    if eot is None:
        raise TinygenError("the tokenizer has no <|endoftext|> token, which ends every completion")
    out = []
    for e in examples:
        p = tokenizer.encode(e.prompt)
        c = tokenizer.encode(e.completion) + [eot]
        if len(c) + 1 > block_size + 1:
            continue
        p = p[max(0, len(p) + len(c) - (block_size + 1)):]
        out.append(Encoded(np.array(p + c, dtype=np.int64), len(p), e.task))
    return out


FIM_STREAM = 3  # default_rng([seed, FIM_STREAM]): which examples fim_encode_examples rearranges, and where


def fim_encode_examples(examples, tokenizer, block_size, rate, seed=0) -> list:
    """encode_examples, with a share `rate` of the examples rearranged for fill-in-the-middle (tinygen.fim).

    A rearranged example is its whole text, prompt + completion, cut at two
    random characters and put in PSM or SPM order: the context up to
    <|fim_middle|> (and the prefix, in SPM) plays the prompt, the middle and
    an EOT the completion the loss counts. Which examples, and where they are
    cut, is fixed by `seed` for the whole run. One that would not fit in
    block_size + 1 ids stays a plain example.
    """
    fim_ids(tokenizer)
    rng = np.random.default_rng([seed, FIM_STREAM])
    out = []
    for e in examples:
        if rng.random() < rate:
            ids, n_context = rearrange(tokenizer, e.prompt + e.completion, rng)
            if len(ids) + 1 <= block_size + 1:
                out.append(Encoded(np.array(ids + [tokenizer.eot_id], dtype=np.int64), n_context, e.task))
                continue
        out += encode_examples([e], tokenizer, block_size)
    return out


def make_batch(encoded, pad_id) -> tuple:
    """Right-padded (idx, targets), each (B, T), T = longest sequence - 1.

    targets are the next tokens, IGNORE on prompt positions and padding:

    >>> make_batch([Encoded(np.array([5, 6, 7, 0]), 2, "t")], pad_id=0)
    (array([[5, 6, 7]]), array([[-1,  7,  0]]))
    """
    T = max(len(e.ids) for e in encoded) - 1
    idx = np.full((len(encoded), T), pad_id, dtype=np.int64)
    targets = np.full((len(encoded), T), IGNORE, dtype=np.int64)
    for b, e in enumerate(encoded):
        n = len(e.ids) - 1
        idx[b, :n] = e.ids[:-1]
        targets[b, e.n_prompt - 1:n] = e.ids[e.n_prompt:]  # predict completion + EOT
    return idx, targets


def batches(encoded, batch_size, pad_id, seed=0):
    """get_batch(step) -> (idx, targets): shuffled epochs, the same batch for the same step.

    Batch `step` is drawn from epoch step * batch_size // len(encoded)'s permutation,
    so a resumed run sees exactly the batches it would have seen.
    """
    if not encoded:
        raise TinygenError("no fine-tuning examples fit the model's block_size")
    n = len(encoded)
    orders = {}  # epoch -> permutation, the last two kept

    def get_batch(step):
        picked = []
        for k in range(step * batch_size, (step + 1) * batch_size):
            epoch, i = divmod(k, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
                orders.pop(epoch - 2, None)
            picked.append(encoded[orders[epoch][i]])
        return make_batch(picked, pad_id)

    return get_batch


def by_task(encoded) -> dict:
    """{task: [Encoded]}, tasks in first-seen order."""
    groups = {}
    for e in encoded:
        groups.setdefault(e.task, []).append(e)
    return groups
