"""`tinygen fill-mask`: candidates per mask from a run directory; one line and exit 2 for a causal
model, a text without a mask, or a bad --top-k."""
import numpy as np
import pytest

from tinygen import GPT, GPTConfig
from tinygen.cli import main
from tinygen.mlm import MASK
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

TOK = Tokenizer({bytes([b]): b for b in range(256)}, "gpt4", {MASK: 256, ENDOFTEXT: 257})


@pytest.fixture
def run_dir(tmp_path):
    def make(causal):
        path = tmp_path / ("causal" if causal else "mlm")
        GPT(GPTConfig(vocab_size=258, block_size=16, n_layer=1, n_head=2, n_embd=16, causal=causal)).save_pretrained(path)
        TOK.save(path / "tokenizer.json")
        return str(path)
    return make


def test_prints_candidates_per_mask_and_the_filled_text(run_dir, capsys):
    assert main(["fill-mask", "--model", run_dir(False), "--text", "x<|mask|>y<|mask|>", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mask 1:" and lines[4] == "mask 2:" and lines[-1].startswith("filled: x")
    probabilities = [float(line.split()[0]) for line in lines[1:4]]
    assert probabilities == sorted(probabilities, reverse=True) and all(0 < p < 1 for p in probabilities)


@pytest.mark.parametrize("causal, text, extra, message", [
    (True, "x<|mask|>", [], "causal \\(left-to-right\\) model: fill-mask needs a masked language model"),
    (False, "no mask", [], "the text has no <\\|mask\\|>"),
    (False, "x<|mask|>", ["--top-k", "0"], "--top-k must be a positive integer"),
])
def test_errors_are_one_line_and_exit_2(run_dir, capsys, causal, text, extra, message):
    assert main(["fill-mask", "--model", run_dir(causal), "--text", text, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tinygen fill-mask: error: ")
    assert __import__("re").search(message, err), err
