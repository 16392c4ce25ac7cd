"""`tinygen tokenizer train` and `encode`: the files it writes equal the library's, ids and
--show, special tokens, clear errors; the --show lines docs/tokenizer.md shows have the command's columns."""
import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

from tinygen.cli import tokenizer as command
from tinygen.errors import TinygenError
from tinygen.tokenizer import ENDOFTEXT, Tokenizer
from shared import TEXT

TOKENIZER_DOC = Path(__file__).resolve().parent.parent / "docs" / "tokenizer.md"
SHOW_LINE = re.compile(r"""^( *)(\d+)  (b?'.*'|b?".*")$""")  # an id right-aligned in 7 columns, two spaces, the token


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="tinygen")
    command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.run(args)
    return code, out.getvalue(), err.getvalue()


def test_cli_train_and_encode(tmp_path):
    a, b, tok_path = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "tokenizer.json"
    a.write_text(TEXT, encoding="utf-8")
    b.write_text(TEXT.upper(), encoding="utf-8")
    code, _, err = run_cli(["tokenizer", "train", "--input", str(a), str(b), "--vocab-size", "300",
                            "--out", str(tok_path)])
    assert code == 0 and "merges" in err and "wrote" in err
    tok = Tokenizer.load(tok_path)
    assert tok.vocab_size == 300 and tok.eot_id == 299
    assert tok.merges == Tokenizer.train([TEXT, TEXT.upper()], 300, special_tokens=[ENDOFTEXT]).merges
    code, out, err = run_cli(["tokenizer", "encode", "--tokenizer", str(tok_path), "--input", str(a)])
    assert code == 0 and list(map(int, out.split())) == tok.encode(TEXT) and "tokens" in err
    code, out, _ = run_cli(["tokenizer", "encode", "--tokenizer", str(tmp_path), "--input", str(a), "--show"])
    lines = out.splitlines()
    assert len(lines) == len(tok.encode(TEXT)) and lines[0].split(None, 1)[1] == repr(tok.decode(tok.encode(TEXT)[:1]))
    a.write_text(ENDOFTEXT, encoding="utf-8")
    with pytest.raises(TinygenError, match="special token"):
        run_cli(["tokenizer", "encode", "--tokenizer", str(tok_path), "--input", str(a)])
    assert run_cli(["tokenizer", "encode", "--tokenizer", str(tok_path), "--input", str(a),
                    "--allow-special"])[1].split() == ["299"]
    a.write_bytes(b"\xff\xfe")
    with pytest.raises(TinygenError, match="not UTF-8"):
        run_cli(["tokenizer", "train", "--input", str(a), "--vocab-size", "300", "--out", str(tok_path)])


def test_the_show_lines_in_docs_have_the_commands_columns(tmp_path):
    doc = TOKENIZER_DOC.read_text(encoding="utf-8")
    shown = re.search(r"with `--show` one token per line, for learners:\n\n```text\n(.*?)```", doc, re.DOTALL).group(1)
    tok = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {ENDOFTEXT: 256})  # bytes: "é" is two tokens
    tok.save(tmp_path / "tok.json")
    (tmp_path / "a.txt").write_text("def f():\n    return 'café'\n", encoding="utf-8")
    code, out, _ = run_cli(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok.json"),
                            "--input", str(tmp_path / "a.txt"), "--show"])
    assert code == 0
    for line in shown.splitlines() + out.splitlines():
        match = SHOW_LINE.match(line)
        assert match and len(match.group(1) + match.group(2)) == 7, line
    assert any(SHOW_LINE.match(line).group(3).startswith("b'") for line in shown.splitlines())  # a partial character
    assert any(SHOW_LINE.match(line).group(3).startswith("b'") for line in out.splitlines())  # "é" and "☕" split
