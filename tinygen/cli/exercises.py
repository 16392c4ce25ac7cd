"""`tinygen exercises start DIR` / `tinygen exercises check DIR [NAME]`: exercises that tinygen grades.

    tinygen exercises start my-gpt       # the stub files, in learning-path order (docs/README.md)
    tinygen exercises check my-gpt       # every started exercise against tinygen, as a table

`check` exits 0 when every started exercise passes (not started is not an
error), 1 when one fails or a file cannot be graded.
"""
from ..exercises import check, format_results, start


def add_parser(sub):
    p = sub.add_parser(
        "exercises",
        help="write GPT-2's layers yourself and have tinygen grade them",
        description="Exercises in learning-path order (docs/README.md): `start` writes one stub file per "
        "exercise, `check` grades your functions against tinygen in float64 (values, gradients, properties).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", help="start: write the stubs; check: grade them")
    actions.required = True
    s = actions.add_parser("start", help="write the exercise stubs into DIR",
                           description="Copy one stub file per exercise into DIR; files already there are kept.")
    s.add_argument("directory", metavar="DIR", help="where to put the exercise files (created if needed)")
    s.set_defaults(run=run_start)
    c = actions.add_parser("check", help="grade the exercises in DIR against tinygen",
                           description="Grade every exercise of DIR (or only NAME) against tinygen and print a "
                           "table; exit 1 if a started exercise fails or a file cannot be graded.")
    c.add_argument("directory", metavar="DIR", help="the folder `tinygen exercises start` wrote")
    c.add_argument("name", nargs="?", default=None, metavar="NAME",
                   help="only this exercise: its name (gelu), file (ex04_gelu.py) or number (4)")
    c.set_defaults(run=run_check)


def run_start(args) -> int:
    done = start(args.directory)
    for name, written in done:
        print(f"  {name}{'' if written else '   (kept: it was already there)'}")
    print(f"\n{sum(w for _, w in done)} files written to {args.directory}. Open {done[0][0]}, fill in the "
          f"functions, then run:\n  tinygen exercises check {args.directory}")
    return 0


def run_check(args) -> int:
    results, ok = check(args.directory, args.name)
    print(format_results(results))
    return 0 if ok else 1
