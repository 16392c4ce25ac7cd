"""`tinygen sample` end to end on a tiny run directory (model + tokenizer written to disk)."""
import numpy as np
import pytest

from tinygen import GPT, GPTConfig
from tinygen.cli import main
from tinygen.tokenizer import ENDOFTEXT, Tokenizer

TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat. " * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    tok = Tokenizer.train(TEXT, vocab_size=270, special_tokens=[ENDOFTEXT])
    model = GPT(GPTConfig(tok.vocab_size, 32, 2, 2, 16), seed=0)
    rng = np.random.default_rng(0)
    for k, v in model.params.items():  # far from the init, so the text varies with the seed
        model.params[k] = (v + rng.normal(0, 0.5, v.shape)).astype(v.dtype)
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return str(path)


@pytest.fixture
def tinygen(capsys):
    """Run `tinygen ARGS...` in-process -> (exit code, stdout, stderr)."""
    def run(*argv):
        try:
            code = main(["sample", *map(str, argv)])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_samples_stream_the_prompt_and_continuation(tinygen, run_dir):
    code, out, err = tinygen("--model", run_dir, "--prompt", "the cat", "--max-new-tokens", 20, "--seed", 3)
    assert code == 0 and err == "" and out.startswith("the cat") and len(out) > len("the cat\n")
    assert tinygen("--model", run_dir, "--prompt", "the cat", "--max-new-tokens", 20, "--seed", 3)[1] == out
    code, other, _ = tinygen("--model", run_dir, "--prompt", "the cat", "--max-new-tokens", 20, "--seed", 4)
    assert code == 0 and other != out


def test_options_and_several_samples(tinygen, run_dir):
    code, out, _ = tinygen("--model", run_dir, "--prompt", "a dog", "--max-new-tokens", 10, "--num-samples", 3,
                           "--temperature", 0.8, "--top-k", 20, "--top-p", 0.9, "--min-p", 0.01,
                           "--repetition-penalty", 1.2, "--seed", 0)
    assert code == 0 and out.count("a dog") >= 3 and out.count("-" * 40) == 2


def test_greedy_and_beams(tinygen, run_dir):
    code, out, _ = tinygen("--model", run_dir, "--prompt", "the", "--max-new-tokens", 8, "--temperature", 0)
    assert code == 0 and out == tinygen("--model", run_dir, "--prompt", "the", "--max-new-tokens", 8, "--temperature", 0)[1]
    code, out, _ = tinygen("--model", run_dir, "--prompt", "the", "--max-new-tokens", 8, "--num-beams", 3, "--num-samples", 2)
    assert code == 0 and out.count("the") >= 2 and out.count("-" * 40) == 1


def test_stop_string_ends_the_text(tinygen, run_dir):
    code, full, _ = tinygen("--model", run_dir, "--prompt", "the", "--max-new-tokens", 30, "--temperature", 0)
    continuation = full[len("the"):-1]
    stop = continuation[3:5]
    code, out, _ = tinygen("--model", run_dir, "--prompt", "the", "--max-new-tokens", 30, "--temperature", 0, "--stop", stop)
    assert code == 0 and out == "the" + continuation[:continuation.find(stop)] + "\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "empty"),
    (["--prompt", "the cat sat on the mat and " * 20], "context"),
    (["--prompt", "the", "--top-p", "1.5"], "top_p"),
    (["--prompt", "the", "--temperature", "-1"], "temperature"),
    (["--prompt", "the", "--top-k", "0"], "top_k"),
    (["--prompt", "the", "--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 0, got -1"),
    (["--prompt", "the", "--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    (["--prompt", "the", "--num-beams", "0"], "--num-beams must be a positive integer, got 0"),
    (["--prompt", "the", "--num-beams", "2", "--temperature", "0.5"], "--temperature"),
    (["--prompt", "the", "--num-beams", "2", "--num-samples", "3"], "num-samples"),
    (["--prompt", "the", "--stop", ""], "stop"),
])
def test_bad_input_is_one_line_and_exit_2(tinygen, run_dir, args, message):
    code, out, err = tinygen("--model", run_dir, *args)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_bad_flag_values_and_missing_model(tinygen, run_dir, tmp_path):
    code, _, err = tinygen("--model", run_dir, "--prompt", "x", "--temperature", "warm")
    assert code == 2 and "--temperature" in err  # argparse's message
    code, _, err = tinygen("--model", tmp_path / "nothing", "--prompt", "x")
    assert code == 2 and err.count("\n") == 1
