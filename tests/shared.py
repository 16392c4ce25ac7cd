"""What several test modules share: a text with every kind of chunk, a small perturbed model, a word corpus."""
import numpy as np

from tinygen import GPT, GPTConfig

# Every kind of chunk GPT-2's and GPT-4's split patterns make: contractions, numbers,
# scripts, emoji sequences, combining marks, odd whitespace, a long run.
TEXT = (
    "Hello world! It's a test: don't, won't, I'M, we'Ve 'll.\n"
    "def f(x):\n    return x ** 2  # comment\n\n\n\t\tindented\r\n"
    "Numbers 1 12 123 1234 12345 3.14159 1,000,000 ١٢٣ Ⅻ ½.\n"
    "Unicode: naïve café ΣΑΣ русский 日本語 한국어 עברית العربية 😀👍🏽👨‍👩‍👧 e\u0301 \u00a0\u3000\u2028.\n"
    "   trailing spaces   \n" + " " * 40 + "x" + "\n" * 5 + "!!!???..." + "a" * 300 + "\n"
)


def tiny_model(vocab=11, block=8, layers=2, heads=2, embd=8, dtype="float64", seed=1, scale=1.0):
    """A small GPT with weights far from the init's, so greedy text does not just repeat."""
    model = GPT(GPTConfig(vocab, block, layers, heads, embd, dtype=dtype), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for k, v in model.params.items():
        model.params[k] = (v + rng.normal(0, scale, v.shape)).astype(v.dtype)
    return model


def word_corpus(folder, files=8, lines=40, words=8, seed=0) -> str:
    """`files` small text files of random code-ish words in `folder` (a pathlib.Path); returns its path."""
    rng = np.random.default_rng(seed)
    vocab = "def return class import self value print list from data the a of".split()
    for i in range(files):
        (folder / f"d{i}.txt").write_text("\n".join(" ".join(rng.choice(vocab, words)) for _ in range(lines)) + "\n")
    return str(folder)
