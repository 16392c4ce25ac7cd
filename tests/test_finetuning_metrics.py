"""The field's metrics: known values worked by hand, the properties every metric owes
(identical texts score 1, disjoint ones 0, symmetric where the metric is), and the
bootstrap intervals over examples."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinygen.errors import TinygenError
from tinygen.finetuning.metrics import (
    LOSS, METRICS, Interval, args_f1, beyond_noise, bleu4, bleu_words, bootstrap, check_metric_names,
    example_stats, exact_match, lcs_length, paired_bootstrap, parameter_names, rouge_l, rouge_words,
    subtoken_scores, subtoken_stats, subtokens, values,
)

LOW = st.text("abcdefghijklm", min_size=1, max_size=6)  # words from two disjoint alphabets
HIGH = st.text("nopqrstuvwxyz", min_size=1, max_size=6)
words = lambda letters: st.lists(letters, min_size=1, max_size=6).map(" ".join)  # noqa: E731
names = st.from_regex(r"[a-z][a-zA-Z_]{0,15}", fullmatch=True)
SCORES = {"subtoken_f1": lambda g, r: float(subtoken_scores(*subtoken_stats(g, r))["f1"]),
          "rouge_l": rouge_l, "bleu4": bleu4, "args_f1": args_f1, "exact_match": lambda g, r: float(exact_match(g, r))}


# ------------------------------------------------------------------ known values
@pytest.mark.parametrize("name, expected", [
    ("getHTTPResponse", ["get", "http", "response"]), ("snake_case_name", ["snake", "case", "name"]),
    ("ArrayList2D", ["array", "list", "d"]), ("__init__", ["init"]), (" _isleap", ["isleap"]),
    ("parseURL", ["parse", "url"]), ("XMLHttpRequest", ["xml", "http", "request"]), ("x86", ["x"]),
])
def test_subtokens_split_as_code2seq(name, expected):
    assert subtokens(name) == expected


def test_subtoken_precision_recall_f1_by_hand():
    # generated get/file/name against reference get/name: 2 right, 1 extra, none missed
    assert subtoken_stats("get_file_name", "getName") == (2, 1, 0)
    s = subtoken_scores(2, 1, 0)
    assert (float(s["precision"]), float(s["recall"]), float(s["f1"])) == pytest.approx((2 / 3, 1.0, 0.8))
    # micro-averaging sums the counts first: (2,1,0) + (0,1,1) -> P 2/4, R 2/3
    stats = example_stats("subtoken", ["get_file_name", "size"], ["getName", "length"])
    v = values("subtoken", stats)
    assert (v["subtoken_precision"], v["subtoken_recall"]) == pytest.approx((0.5, 2 / 3))
    assert v["subtoken_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_rouge_l_by_hand():
    assert rouge_words("Return the URL's parts.") == ["return", "the", "url", "s", "parts"]
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    # LCS of "the cat lay on a mat" / "the cat sat on the mat" = the cat on mat (4): P = R = 4/6
    assert rouge_l("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # P = 2/2, R = 2/4 -> F1 = 2/3
    assert rouge_l("sum numbers", "return the sum numbers") == pytest.approx(2 / 3)


def test_bleu4_by_hand():
    """Worked in the docstring and docs/transfer.md: p1 = 4/5, p2 = (2+1)/(4+1), p3 = (1+1)/(3+1),
    p4 = (0+1)/(2+1), brevity exp(1 - 7/6)."""
    expected = math.exp(math.log(0.8 * 0.6 * 0.5 / 3) / 4 + (1 - 7 / 6))
    assert bleu4("return the sum of numbers", "returns the sum of two numbers") == pytest.approx(expected)
    assert round(expected, 4) == 0.4502
    # shorter than 4 words: the missing n-gram orders are (0+1)/(0+1) = 1; only the brevity penalty remains
    assert bleu4("the cat", "the cat sat") == pytest.approx(math.exp(1 - 4 / 3))
    # clipping: "the the the" matches "the" once; p2 = (0+1)/(2+1), p3 = (0+1)/(1+1), p4 = (0+1)/(0+1)
    assert bleu4("the the the", "the cat") == pytest.approx((1 / 3 * 1 / 3 * 1 / 2 * 1) ** 0.25)
    assert bleu_words("Return the file_name, or None.") == ["return", "the", "file", "_", "name", ",", "or", "none", "."]


def test_bleu4_is_not_symmetric():
    """Precision-based: swapping the texts changes what is counted. A short candidate pays the
    brevity penalty; a long one pays in unmatched n-grams."""
    assert bleu4("the cat", "the cat sat") == pytest.approx(math.exp(1 - 4 / 3))  # all matched, too short
    assert bleu4("the cat sat", "the cat") == pytest.approx((2 / 3 * 2 / 3 * 1 / 2) ** 0.25)  # "sat" unmatched


def test_parameter_names_and_args_f1():
    assert parameter_names(" self, key, /, default=None, *args, flag=(1, 2), **kw") == {
        "self", "key", "default", "args", "flag", "kw"}
    assert parameter_names(" ") == set() and args_f1(" ", " ") == 1.0
    assert parameter_names("self, key=, *") == {"self", "key"}  # does not parse: leading identifiers
    assert args_f1(" self, key", " self, key, default=None") == pytest.approx(0.8)
    assert args_f1(" a=1", " b=1") == 0.0


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("metric", sorted(SCORES))
@given(text=words(LOW))
def test_identical_texts_score_one(metric, text):
    text = text if metric != "args_f1" else text.replace(" ", ", ")  # a parameter list
    assert SCORES[metric](text, text) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", sorted(SCORES))
@given(a=words(LOW), b=words(HIGH))
def test_disjoint_texts_score_zero(metric, a, b):
    if metric == "args_f1":
        a, b = a.replace(" ", ", "), b.replace(" ", ", ")
    assert SCORES[metric](a, b) == 0.0


@pytest.mark.parametrize("metric", sorted(SCORES))
@given(a=st.one_of(words(LOW), names), b=st.one_of(words(LOW), names))
def test_scores_lie_in_zero_one(metric, a, b):
    assert 0.0 <= SCORES[metric](a, b) <= 1.0 + 1e-12


@pytest.mark.parametrize("metric", ["subtoken_f1", "rouge_l", "args_f1", "exact_match"])
@given(a=st.one_of(words(LOW), names), b=st.one_of(words(LOW), names))
def test_f_scores_are_symmetric(metric, a, b):
    assert SCORES[metric](a, b) == pytest.approx(SCORES[metric](b, a))


@given(a=names, b=names)
def test_swapping_texts_swaps_subtoken_precision_and_recall(a, b):
    ab, ba = subtoken_scores(*subtoken_stats(a, b)), subtoken_scores(*subtoken_stats(b, a))
    assert float(ab["precision"]) == pytest.approx(float(ba["recall"]))
    assert float(ab["recall"]) == pytest.approx(float(ba["precision"]))


# ------------------------------------------------------------------ the table and the bootstrap
def test_every_metric_reduces_to_values_from_column_sums():
    for name, metric in METRICS.items():
        stats = example_stats(name, ["get_x", "a b"], ["getX", "a c"])
        assert stats.ndim == 2 and len(stats) == 2
        assert all(0.0 <= v <= 1.0 for v in values(name, stats).values()), name
    with pytest.raises(TinygenError, match="unknown metric 'bleu'; choose from"):
        check_metric_names(["rouge_l", "bleu"])
    assert check_metric_names("rouge_l") == ("rouge_l",)


def test_bootstrap_interval_contains_the_value_and_is_reproducible():
    rng = np.random.default_rng(0)
    stats = rng.random((50, 1)).round()
    a, b = bootstrap("exact_match", stats, seed=3), bootstrap("exact_match", stats, seed=3)
    iv = a["exact_match"]
    assert a == b and iv.low <= iv.value <= iv.high and iv.high - iv.low > 0.1  # 50 coin flips: wide
    assert bootstrap("exact_match", np.ones((20, 1)))["exact_match"] == Interval(1.0, 1.0, 1.0)
    assert bootstrap("exact_match", np.zeros((0, 1))) == {}


def test_loss_is_token_weighted():
    stats = np.array([[10.0, 5.0], [2.0, 1.0]])  # 12 nats over 6 tokens
    assert values(LOSS, stats)["val_loss"] == pytest.approx(2.0)


def test_paired_bootstrap_separates_a_real_difference_from_noise():
    good = np.ones((40, 1))
    half = np.array([[1.0], [0.0]] * 20)
    d = paired_bootstrap("exact_match", good, half)["exact_match"]
    assert d.value == 0.5 and beyond_noise(d)
    same = paired_bootstrap("exact_match", half, half)["exact_match"]
    assert same == Interval(0.0, 0.0, 0.0) and not beyond_noise(same)
    # one example's difference among 40 is noise
    one = half.copy()
    one[1] = 1.0
    assert not beyond_noise(paired_bootstrap("exact_match", one, half)["exact_match"])
    with pytest.raises(TinygenError, match="same examples"):
        paired_bootstrap("exact_match", good, good[:3])
