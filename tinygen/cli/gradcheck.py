"""`tinygen gradcheck`: every backward pass against finite differences, as a table.

One row per input of each layer pair, then the transformer block, a whole
small float64 model and a model carrying every fine-tuning method. The
checks and their inputs are the library's table (tinygen.gradient_check.
all_checks), the same one the test suite runs. Exit status 1 if any row
fails. Learners run this first. `--break NAME` injects a classic backprop
bug instead and shows which checks catch it (tinygen.bug_checks, docs/bugs.md).
"""
import sys
import time

from ..bug_checks import run_break
from ..gradient_check import THRESHOLD, all_checks


def format_table(results, threshold=THRESHOLD):
    """Rows of `layer  tensor  shape  max rel error  pass/FAIL`; returns (text, n_failed).

    >>> print(format_table([("gelu", {"x": ((2, 5), 3.1e-11)})])[0])   # doctest: +NORMALIZE_WHITESPACE
    layer                        tensor                       shape        max rel err  result
    ------------------------------------------------------------------------------------------
    gelu                         x                            2x5             3.10e-11  pass
    """
    lines = [f"{'layer':<28} {'tensor':<28} {'shape':<12} {'max rel err':>11}  result", "-" * 90]
    failed = 0
    for layer, tensors in results:
        for name, (shape, err) in tensors.items():
            ok = err < threshold
            failed += not ok
            shape_text = "x".join(map(str, shape)) if shape is not None else ""
            lines.append(f"{layer:<28} {name:<28} {shape_text:<12} {err:>11.2e}  {'pass' if ok else 'FAIL'}")
    return "\n".join(lines), failed


def add_parser(sub):
    p = sub.add_parser(
        "gradcheck",
        help="check every backward pass against finite differences",
        description="Compare every layer's hand-written backward pass, and the whole model's "
        "gradient, with five-point central finite differences in float64. Prints one row per "
        "tensor; exits 1 if any relative error reaches the threshold.",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs and checked coordinates (default: 0)")
    p.add_argument("--max-coords", type=int, default=64, help="entries checked per tensor; larger tensors get a random subset (default: 64)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help=f"largest relative error that passes (default: {THRESHOLD:g})")
    p.add_argument("--break", dest="bug", metavar="NAME", default=None,
                   help="inject a classic backprop bug and show which checks catch it; 'list' lists them (docs/bugs.md)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.bug is not None:  # the bug catalogue: tinygen/bug_checks.py
        return run_break(args.bug, args.seed)
    t0 = time.perf_counter()
    results = all_checks(args.seed, args.max_coords)
    text, failed = format_table(results, args.threshold)
    print(text)
    rows = sum(len(t) for _, t in results)
    print(f"\n{rows - failed}/{rows} passed (threshold {args.threshold:g}) in {time.perf_counter() - t0:.1f}s")
    if failed:
        print(f"{failed} gradient(s) disagree with finite differences", file=sys.stderr)
    return 1 if failed else 0
