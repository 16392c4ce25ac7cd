"""Scores of a generated completion against its reference, in the terms each field uses.

    subtoken    method names (code2vec, code2seq): precision, recall and F1 of
                the name's subtokens ("getFileName" -> get, file, name)
    rouge_l     summaries: ROUGE-L F1, from the longest common subsequence of words
    bleu4       summaries: smoothed sentence BLEU-4, CodeXGLUE's code-to-text score
    args_f1     parameter lists: F1 of the set of parameter names
    exact_match the whole completion, surrounding spaces aside

Each metric turns one (generated, reference) pair into a few numbers, its
*stats*, and a test set into values computed from the column sums of those
stats: a mean for most, code2seq's micro-averaged precision/recall/F1 for
subtokens. Because every value is a function of sums, a bootstrap resample
of the examples is one indexed sum (`bootstrap`), and two systems scored on
the same examples are compared on the same resamples (`paired_bootstrap`):
a difference is beyond noise when its 95% interval leaves out 0.

docs/transfer.md works one example through every metric.
"""
import ast
import math
import re
from collections import Counter
from typing import Callable, NamedTuple

import numpy as np

from ..errors import TinygenError

N_RESAMPLES = 1000  # bootstrap resamples: the 2.5% / 97.5% percentiles move by ~0.1 of a point between seeds
LEVEL = 0.95


# ------------------------------------------------------------------ subtokens (code2seq)
# code2seq's JavaExtractor (Common.splitToSubtokens): split at lower->Upper, at "_", at digits
# (dropped), inside runs of capitals before a capitalised word, at spaces; then each piece is
# lowercased and reduced to its letters, and empty pieces are dropped.
SUBTOKEN_SPLIT = re.compile(r"(?<=[a-z])(?=[A-Z])|_|[0-9]|(?<=[A-Z])(?=[A-Z][a-z])|\s+")


def subtokens(name: str) -> list:
    """A name's subtokens, as code2seq splits method names.

    >>> subtokens("getHTTPResponse_code2"), subtokens(" _isleap")
    (['get', 'http', 'response', 'code'], ['isleap'])
    """
    pieces = (re.sub(r"[^a-z]", "", p.lower()) for p in SUBTOKEN_SPLIT.split(name.strip()))
    return [p for p in pieces if p]


def subtoken_stats(generated: str, reference: str) -> tuple:
    """(true positives, false positives, false negatives) of the subtokens, counted as multisets.

    code2seq counts a predicted subtoken as right when it occurs in the
    reference at all; counting multisets differs only when a subtoken
    repeats, and makes swapping the two strings swap precision and recall.

    >>> subtoken_stats("get_file_name", "getName")
    (2, 1, 0)
    """
    g, r = Counter(subtokens(generated)), Counter(subtokens(reference))
    tp = sum((g & r).values())
    return tp, sum(g.values()) - tp, sum(r.values()) - tp


def _ratio(num, den):
    """num / den, 0 where den is 0 (no prediction has no precision)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def subtoken_scores(tp, fp, fn) -> dict:
    """Micro-averaged precision, recall and F1 from summed counts (scalars or arrays).

    >>> {k: round(float(v), 3) for k, v in subtoken_scores(2, 1, 0).items()}
    {'precision': 0.667, 'recall': 1.0, 'f1': 0.8}
    """
    precision, recall = _ratio(tp, np.add(tp, fp)), _ratio(tp, np.add(tp, fn))
    f1 = _ratio(2 * precision * recall, precision + recall)
    both_empty = (np.add(tp, fp) == 0) & (np.add(tp, fn) == 0)  # nothing predicted, nothing to predict
    return {"precision": np.where(both_empty, 1.0, precision), "recall": np.where(both_empty, 1.0, recall),
            "f1": np.where(both_empty, 1.0, f1)}


# ------------------------------------------------------------------ ROUGE-L
def rouge_words(text: str) -> list:
    """Google's rouge-score default tokenizer: lowercase, runs of [a-z0-9] (no stemming).

    >>> rouge_words("Return the URL's parts.")
    ['return', 'the', 'url', 's', 'parts']
    """
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two sequences (dynamic programming, O(len a * len b)).

    >>> lcs_length("the cat sat on the mat".split(), "the cat lay on a mat".split())
    4
    """
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004): P = LCS / len(generated), R = LCS / len(reference), F1 = 2PR / (P + R).

    rouge-score's F-measure (beta = 1). Two texts without words score 1
    (rouge-score says 0; here identical texts always score 1).

    >>> round(rouge_l("the cat lay on a mat", "the cat sat on the mat"), 4)   # LCS 4 of 6 and 6
    0.6667
    """
    g, r = rouge_words(generated), rouge_words(reference)
    if not g or not r:
        return float(not g and not r)
    lcs = lcs_length(g, r)
    return 0.0 if lcs == 0 else 2 * lcs / (len(g) + len(r))  # = 2PR / (P + R) with P = lcs/|g|, R = lcs/|r|


# ------------------------------------------------------------------ smoothed BLEU-4 (CodeXGLUE)
# CodeXGLUE's code-to-text evaluator (smooth_bleu.py, from CodeNN, Iyer et al. 2016) lowercases,
# splits words from punctuation, then applies NIST mteval-v11a's tokenisation, whose punctuation
# class [{-~[-` -&(-+:-@/] includes "_": "snake_case" becomes "snake _ case".
BLEU_SPLIT = re.compile(r"[\w]+|[^\s\w]")
NIST_RULES = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation
              (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless after a digit
              (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless before a digit
              (re.compile(r"([0-9])(-)"), r"\1 \2 ")]  # dash after a digit


def bleu_words(text: str) -> list:
    """CodeXGLUE's code-to-text tokenisation for BLEU.

    >>> bleu_words("Return the file_name, or None.")
    ['return', 'the', 'file', '_', 'name', ',', 'or', 'none', '.']
    """
    s = " " + " ".join(BLEU_SPLIT.findall(text.strip().lower())) + " "
    for pattern, replace in NIST_RULES:
        s = pattern.sub(replace, s)
    return s.split()


def ngrams(words: list, n: int) -> Counter:
    """The n-grams of a word list, counted.

    >>> ngrams(["a", "b", "a", "b"], 2)
    Counter({('a', 'b'): 2, ('b', 'a'): 1})
    """
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(generated: str, reference: str) -> float:
    """Smoothed sentence BLEU-4, as CodeXGLUE scores code summaries (Lin & Och 2004's add-one).

        p_1 = matched unigrams / generated unigrams                (no smoothing)
        p_n = (matched n-grams + 1) / (generated n-grams + 1)      n = 2, 3, 4 (add-one)
        BP  = exp(min(0, 1 - (len(reference) + 1) / (len(generated) + 1)))
        BLEU = BP * (p_1 p_2 p_3 p_4) ** (1/4)

    Matches are clipped by the reference's counts. The brevity penalty's +1 is
    CodeXGLUE's; NLTK's method2 smooths p_n the same way but uses exp(1 - r/c).
    When no unigram matches the score is 0 (CodeXGLUE's code gives ~1e-77,
    log of the smallest float). Identical texts score 1, empty ones included.

    >>> round(bleu4("return the sum of numbers", "returns the sum of two numbers"), 4)
    0.4502
    """
    g, r = bleu_words(generated), bleu_words(reference)
    log_p = 0.0
    for n in range(1, 5):
        guess, matched = ngrams(g, n), ngrams(r, n)
        correct, total = sum((guess & matched).values()), sum(guess.values())
        if n == 1:
            if total and not correct:
                return 0.0
            log_p += 0.0 if not total else math.log(correct / total)
        else:
            log_p += math.log((correct + 1) / (total + 1))
    brevity = min(0.0, 1.0 - (len(r) + 1) / (len(g) + 1))
    return math.exp(log_p / 4 + brevity)


# ------------------------------------------------------------------ parameter names
def parameter_names(text: str) -> set:
    """The parameter names of a parameter list such as `args` completes ("a, b=1, *rest, **kw").

    Parsed as `def f(TEXT): pass`; text that does not parse (a model's
    half-right attempt) falls back to the identifier at the start of each
    comma-separated piece, stars aside.

    >>> sorted(parameter_names(" self, key, /, default=None, *args, flag=(1, 2), **kw"))
    ['args', 'default', 'flag', 'key', 'kw', 'self']
    >>> sorted(parameter_names("self, key=, *"))   # does not parse
    ['key', 'self']
    """
    try:
        args = ast.parse(f"def f({text.strip()}): pass").body[0].args
    except (SyntaxError, ValueError):
        return set(re.findall(r"(?:^|,)\s*\**\s*([A-Za-z_]\w*)", text.strip()))
    every = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
    return {a.arg for a in every}


def set_f1(generated: set, reference: set) -> float:
    """F1 of two sets: 2 |G & R| / (|G| + |R|); two empty sets agree (1.0).

    >>> set_f1({"a", "b"}, {"b", "c", "d"})
    0.4
    """
    if not generated and not reference:
        return 1.0
    return 2 * len(generated & reference) / (len(generated) + len(reference))


def args_f1(generated: str, reference: str) -> float:
    """F1 of the sets of parameter names.

    >>> args_f1(" self, key", " self, key, default=None")
    0.8
    """
    return set_f1(parameter_names(generated), parameter_names(reference))


def exact_match(generated: str, reference: str) -> bool:
    """Whether a generated completion equals the reference, surrounding spaces aside.

    >>> exact_match(" spawn ", "spawn")
    True
    """
    return generated.strip() == reference.strip()


# ------------------------------------------------------------------ the table of metrics
class Metric(NamedTuple):
    """A metric: per-example stats, and the test-set values computed from their column sums."""

    stats: Callable  # (generated, reference) -> tuple of k numbers
    values: Callable  # (totals (..., k) array of column sums, n examples) -> {value name: (...) array}
    what: str  # one line for docs and --help


def _mean(name, score, what) -> Metric:
    return Metric(lambda g, r: (float(score(g, r)),), lambda totals, n: {name: totals[..., 0] / n}, what)


def _subtoken_values(totals, n):
    scores = subtoken_scores(totals[..., 0], totals[..., 1], totals[..., 2])
    return {f"subtoken_{k}": v for k, v in scores.items()}


METRICS = {
    "exact_match": _mean("exact_match", exact_match, "the whole completion, surrounding spaces aside"),
    "subtoken": Metric(subtoken_stats, _subtoken_values,
                       "precision / recall / F1 of code2seq subtokens, micro-averaged over the examples"),
    "rouge_l": _mean("rouge_l", rouge_l, "ROUGE-L F1 (longest common subsequence of words), averaged"),
    "bleu4": _mean("bleu4", bleu4, "smoothed sentence BLEU-4 (CodeXGLUE's code-to-text), averaged"),
    "args_f1": _mean("args_f1", args_f1, "F1 of the set of parameter names, averaged"),
}
# The held-out loss as a metric of the same kind: stats (summed -log p of an example's completion
# tokens, their number), value the token-weighted mean. evaluate.example_losses makes its stats.
LOSS = Metric(None, lambda totals, n: {"val_loss": _ratio(totals[..., 0], totals[..., 1])},
              "mean cross-entropy per completion token (nats), token-weighted")
TASK_METRICS = {"name": ("subtoken",), "summarize": ("rouge_l", "bleu4"), "args": ("args_f1",)}  # built-in tasks


def check_metric_names(names, where="metric") -> tuple:
    """names (a str or strings) -> a tuple of known metric names; TinygenError names an unknown one."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name not in METRICS:
            raise TinygenError(f"{where}: unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return names


def example_stats(metric: str, generated, references) -> np.ndarray:
    """(n, k) stats of a metric for n (generated, reference) pairs.

    >>> example_stats("subtoken", ["get_name", "size"], ["getName", "length"])
    array([[2., 0., 0.],
           [0., 1., 1.]])
    """
    if len(generated) != len(references):
        raise TinygenError(f"{len(generated)} generated completions for {len(references)} references")
    rows = [METRICS[metric].stats(g, r) for g, r in zip(generated, references)]
    return np.array(rows, dtype=np.float64).reshape(len(rows), -1)


def _spec(metric) -> Metric:
    return METRICS[metric] if isinstance(metric, str) else metric


def values(metric, stats: np.ndarray) -> dict:
    """{value name: float} of a metric (a name or a Metric) over all examples, from their stats (n, k)."""
    return {k: float(v) for k, v in _spec(metric).values(stats.sum(axis=0), len(stats)).items()}


# ------------------------------------------------------------------ bootstrap intervals
class Interval(NamedTuple):
    value: float  # on all examples
    low: float  # 2.5th percentile of the bootstrap resamples
    high: float  # 97.5th percentile


def resample_totals(stats: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Column sums of n_resamples resamples (with replacement) of the n rows: (R, k)."""
    n = len(stats)
    idx = rng.integers(0, n, size=(n_resamples, n))  # (R, n)
    return stats[idx].sum(axis=1)  # (R, k)


def bootstrap(metric, stats: np.ndarray, n_resamples=N_RESAMPLES, seed=0, level=LEVEL) -> dict:
    """{value name: Interval}: each value on all examples with its percentile bootstrap interval.

    >>> stats = example_stats("exact_match", ["a", "b", "c", "d"], ["a", "b", "x", "y"])
    >>> bootstrap("exact_match", stats)["exact_match"].value
    0.5
    """
    if len(stats) == 0:
        return {}
    full = values(metric, stats)
    resampled = _spec(metric).values(resample_totals(stats, n_resamples, np.random.default_rng(seed)), len(stats))
    tail = (1 - level) / 2 * 100
    return {k: Interval(full[k], float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
            for k, v in resampled.items()}


def paired_bootstrap(metric, stats_a: np.ndarray, stats_b: np.ndarray, n_resamples=N_RESAMPLES, seed=0,
                     level=LEVEL) -> dict:
    """{value name: Interval of value(a) - value(b)}: two systems scored on the same examples,
    compared on the same resamples. The difference is beyond noise when the interval leaves out 0.

    >>> a = example_stats("exact_match", ["x"] * 40, ["x"] * 40)          # all right
    >>> b = example_stats("exact_match", ["x"] * 20 + ["y"] * 20, ["x"] * 40)   # half right
    >>> d = paired_bootstrap("exact_match", a, b)["exact_match"]
    >>> d.value, d.low > 0
    (0.5, True)
    """
    if stats_a.shape != stats_b.shape:
        raise TinygenError(f"paired_bootstrap needs the same examples: stats {stats_a.shape} vs {stats_b.shape}")
    if len(stats_a) == 0:
        return {}
    n = len(stats_a)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    spec = _spec(metric)
    ra, rb = spec.values(stats_a[idx].sum(axis=1), n), spec.values(stats_b[idx].sum(axis=1), n)
    fa, fb = values(metric, stats_a), values(metric, stats_b)
    tail = (1 - level) / 2 * 100
    return {k: Interval(fa[k] - fb[k], float(np.percentile(ra[k] - rb[k], tail)),
                        float(np.percentile(ra[k] - rb[k], 100 - tail))) for k in ra}


def beyond_noise(difference: Interval) -> bool:
    """Whether a paired difference's interval leaves out 0."""
    return difference.low > 0 or difference.high < 0
