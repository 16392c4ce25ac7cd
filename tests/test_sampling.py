"""Sampling: each logit processor, the sampler's distribution, generate, stop rules, streaming.
The KV-cache decoding it runs on: tests/test_kv_decoding.py."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


from tinygen import GPT
from tinygen.errors import TinygenError
from tinygen.sampling import (
    generate,
    suppress_tokens,
    min_p_filter,
    penalize_repeats,
    process_logits,
    sample_from_logits,
    stream,
    stream_text,
    temperature_scale,
    top_k_filter,
    top_p_filter,
)

from shared import tiny_model


class ByteTokenizer:
    """Token i is the byte i: enough of a tokenizer for stop strings and streaming."""

    vocab_size = 256

    @staticmethod
    def decode_bytes(ids):
        return bytes(int(i) for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


logit_rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 12)),
                        elements=st.floats(-8, 8, allow_nan=False, allow_infinity=False))


# ------------------------------------------------------------ processors
def test_repetition_penalty_known_answer():
    logits = np.array([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    ids = np.array([[0, 1, 1], [3, 3, 3]])  # prompt tokens count; repeats count once
    out = penalize_repeats(logits, ids, 2.0)
    assert np.array_equal(out, [[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 0.5, -6.0]])
    assert np.array_equal(penalize_repeats(logits, ids, 0.5)[0], [4.0, -0.5, 0.5, -3.0])  # < 1 rewards


def test_temperature_known_answer():
    assert np.array_equal(temperature_scale(np.array([[1.0, -2.0]]), 0.5), [[2.0, -4.0]])


def test_top_k_keeps_the_k_largest_and_ties():
    out = top_k_filter(np.array([[1.0, 3.0, 2.0, 3.0, 0.0]]), 2)
    assert np.array_equal(np.isfinite(out), [[False, True, False, True, False]])
    assert np.array_equal(top_k_filter(np.array([[1.0, 2.0]]), 5), [[1.0, 2.0]])  # k > V keeps all


def test_top_k_zero_is_no_limit_as_in_transformers():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 0.0]])
    out = top_k_filter(logits, 0)
    assert np.array_equal(out, logits) and out is not logits
    assert np.array_equal(process_logits(logits, None, 0.7, top_k=0, top_p=0.9),
                          process_logits(logits, None, 0.7, top_k=None, top_p=0.9))
    model = tiny_model()
    assert np.array_equal(generate(model, [[1, 2]], 6, top_k=0, seed=3), generate(model, [[1, 2]], 6, seed=3))
    assert not np.array_equal(generate(model, [[1, 2]], 6, top_k=1, seed=3), generate(model, [[1, 2]], 6, seed=3))


def test_top_p_tie_rule_and_where_torch_sort_agrees():
    """tinygen: among equal logits the lower id is dropped first. transformers sorts with
    torch.sort (not stable): it agrees up to 16 tokens, not from 17 on (docs/sampling.md)."""
    for V in (2, 3, 16, 17, 41):  # (sizes where the cut-off is no float coin-flip)
        kept = np.isfinite(top_p_filter(np.zeros((1, V)), 0.5))[0]
        assert kept.tolist() == [i >= V // 2 for i in range(V)]  # the higher half of the ids
    torch = pytest.importorskip("torch")  # optional: checks the claim about transformers' sort

    def transformers_top_p(scores, top_p):  # TopPLogitsWarper.__call__ of transformers 5.24
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_indices_to_remove = cumulative_probs <= (1 - top_p)
        sorted_indices_to_remove[..., -1:] = 0
        remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
        return scores.masked_fill(remove, -float("inf"))

    rng = np.random.default_rng(0)
    differs = set()
    for V in range(2, 40):
        for _ in range(20):
            logits = rng.integers(-2, 2, (1, V)).astype(np.float64)  # many ties
            ours = np.isfinite(top_p_filter(logits, 0.5))
            theirs = np.isfinite(transformers_top_p(torch.from_numpy(logits), 0.5).numpy())
            if V <= 16:
                assert np.array_equal(ours, theirs), (V, logits)
            elif not np.array_equal(ours, theirs):
                differs.add(V)
                assert ours.sum() == theirs.sum()  # the same number of survivors, other ids among the tied
    assert differs and min(differs) >= 17


def test_top_p_known_answers_and_transformers_ties():
    kept = lambda logits, p: np.isfinite(top_p_filter(np.log(np.array([logits])), p))[0].tolist()
    assert kept([0.1, 0.6, 0.3], 0.7) == [False, True, True]
    assert kept([0.1, 0.6, 0.3], 0.6) == [False, True, False]  # 0.6 alone reaches p: smallest set
    assert kept([0.1, 0.6, 0.3], 1.0) == [True, True, True]
    assert kept([0.1, 0.6, 0.3], 1e-9) == [False, True, False]  # the top token always stays
    # equal logits: the stable ascending sort puts the lower id first, so it is dropped first
    assert np.isfinite(top_p_filter(np.zeros((1, 2)), 0.5)).tolist() == [[False, True]]
    assert np.isfinite(top_p_filter(np.zeros((1, 4)), 0.5)).tolist() == [[False, False, True, True]]


def test_min_p_known_answer():
    out = min_p_filter(np.log(np.array([[0.5, 0.3, 0.2]])), 0.5)  # keep p >= 0.25
    assert np.isfinite(out).tolist() == [[True, True, False]]
    assert np.isfinite(min_p_filter(np.zeros((1, 3)), 1.0)).all()  # all tie with the top


def allowed_by_definition(logits, top_k=None, top_p=None, min_p=None):
    """The tokens each filter keeps, from its textbook definition (descending order)."""
    keep = np.ones(logits.shape, dtype=bool)
    for b, row in enumerate(logits):
        x = row.copy()
        if top_k is not None:
            keep[b] &= x >= np.sort(x)[::-1][min(top_k, len(x)) - 1]
            x = np.where(keep[b], x, -np.inf)
        if top_p is not None:
            p = np.exp(x - x.max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])  # mass strictly more likely
            assume(np.all(np.abs(before - top_p) > 1e-9))  # no float coin-flips at the boundary
            kept = np.zeros_like(keep[b])
            kept[order] = (before < top_p) | (np.arange(len(x)) == 0)
            keep[b] &= kept
            x = np.where(keep[b], x, -np.inf)
        if min_p is not None:
            p = np.exp(x - x.max())
            assume(np.all(np.abs(p - min_p) > 1e-9))
            keep[b] &= p >= min_p
    return keep


distinct_rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 12)), unique=True,
                           elements=st.integers(-40, 40).map(lambda i: i / 5))  # ties: tested by example


@given(distinct_rows, st.integers(1, 12), st.floats(0.01, 1.0), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_samples_lie_in_the_allowed_set(logits, top_k, top_p, min_p, seed):
    allowed = allowed_by_definition(logits, top_k, top_p, min_p)
    processed = process_logits(logits, None, 1.0, top_k, top_p, min_p)
    assert np.array_equal(np.isfinite(processed), allowed)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        tok = sample_from_logits(processed, rng)
        assert allowed[np.arange(len(tok)), tok].all()


@given(logit_rows, st.integers(1, 12), st.floats(0.01, 1.0), st.floats(0.0, 1.0), st.floats(0.1, 3.0),
       st.floats(0.5, 2.0))
def test_processors_do_not_modify_input_and_follow_transformers_order(logits, k, p, min_p, t, penalty):
    before = logits.copy()
    ids = np.zeros((logits.shape[0], 2), dtype=np.int64)
    out = process_logits(logits, ids, t, k, p, min_p, penalty)
    manual = min_p_filter(top_p_filter(top_k_filter(temperature_scale(penalize_repeats(logits, ids, penalty), t), k), p), min_p)
    assert np.array_equal(out, manual)
    assert np.array_equal(logits, before) and out is not logits
    assert np.isfinite(out).any(axis=-1).all()  # every filter keeps at least the top token


# ------------------------------------------------------------ the sampler
def test_sampled_frequencies_match_processed_probabilities():
    """Chi-square goodness of fit: 40,000 seeded draws against softmax of the processed logits."""
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0])
    processed = process_logits(logits[None], None, temperature=1.5, top_k=7, top_p=0.9)
    probs = np.exp(processed[0] - processed[0].max())
    probs /= probs.sum()
    kept = probs > 0
    assert kept.sum() == 6  # top_k drops -4.0, then top_p the least likely of the rest
    n = 40_000
    draws = sample_from_logits(np.repeat(processed, n, axis=0), np.random.default_rng(1234))
    counts = np.bincount(draws, minlength=len(logits))
    assert counts[~kept].sum() == 0
    expected = n * probs[kept]
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    assert chi2 < 20.52, chi2  # the 0.999 quantile of chi-square with 6 - 1 = 5 degrees of freedom


def test_sampler_never_draws_zero_probability_tokens_at_the_edges():
    logits = np.array([[-np.inf, 0.0, -np.inf], [0.0, -np.inf, -np.inf], [-np.inf, -np.inf, 0.0]])

    class Edge:  # uniforms at both ends of [0, 1)
        def __init__(self, u):
            self.u = u

        def random(self, shape):
            return np.full(shape, self.u)

    for u in (0.0, np.nextafter(1.0, 0.0)):
        assert sample_from_logits(logits, Edge(u)).tolist() == [1, 0, 2]


# ------------------------------------------------------------ generate
def test_top_k_1_and_tiny_top_p_and_min_p_1_equal_greedy():
    model = tiny_model()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    greedy = generate(model, prompt, 12, temperature=0)
    assert np.array_equal(generate(model, prompt, 12, top_k=1, seed=0), greedy)
    assert np.array_equal(generate(model, prompt, 12, top_p=1e-9, seed=1, temperature=1.7), greedy)
    assert np.array_equal(generate(model, prompt, 12, min_p=1.0, seed=2), greedy)
    assert len(set(map(tuple, greedy[:, 3:]))) == 2 and len(set(greedy[0, 3:])) > 2  # not degenerate


def test_greedy_repetition_penalty_changes_the_choice():
    model = tiny_model()
    prompt = np.array([[1, 2, 3]])
    plain = generate(model, prompt, 1, temperature=0)[0, -1]
    logits = model.forward(prompt)[0, -1]
    want = np.argmax(penalize_repeats(logits[None], prompt, 1e6)[0])
    assert generate(model, prompt, 1, temperature=0, repetition_penalty=1e6)[0, -1] == want
    assert want != plain or plain not in (1, 2, 3)


def test_seed_reproducible_generator_accepted_rows_independent():
    model = tiny_model()
    prompt = np.array([[1, 2, 3], [1, 2, 3]])
    a = generate(model, prompt, 20, seed=7)
    assert np.array_equal(a, generate(model, prompt, 20, seed=7))
    assert np.array_equal(a, generate(model, prompt, 20, seed=np.random.default_rng(7)))
    assert not np.array_equal(a, generate(model, prompt, 20, seed=8))
    assert not np.array_equal(a[0], a[1])  # same prompt, independent draws


def test_generate_does_not_mutate_and_keeps_shapes():
    model = tiny_model()
    prompt = np.array([[1, 2, 3]], dtype=np.int32)
    before = prompt.copy()
    out = generate(model, prompt, 5, seed=0)
    assert np.array_equal(prompt, before) and out.shape == (1, 8) and out.dtype == np.int64
    assert np.array_equal(out[:, :3], prompt)
    one = model.generate([1, 2, 3], 5, seed=0)  # GPT.generate delegates; a 1-D prompt gives 1-D ids
    assert one.shape == (8,) and np.array_equal(one, out[0])
    assert np.array_equal(generate(model, prompt, 0), prompt) and generate(model, prompt, 0) is not prompt


@pytest.mark.parametrize("options, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(seed=-1), "seed"), (dict(seed="x"), "seed"), (dict(stop="\n"), "tokenizer"), (dict(stop=[1.5]), "stop"),
    (dict(window_keep=0), "window_keep"), (dict(window_keep=9), "window_keep"),
])
def test_invalid_options_raise_clear_value_errors(options, name):
    with pytest.raises(ValueError, match=name):
        generate(tiny_model(), [[1, 2]], 3, **options)


@pytest.mark.parametrize("idx, max_new, match", [
    ([[1, 2, 99]], 3, "vocabulary"), ([[]], 3, "empty"), ([list(range(9))], 1, "block_size"),
    ([[1.0, 2.0]], 3, "integer"), ([[1, 2]], -1, "max_new_tokens"),
])
def test_invalid_prompts_raise(idx, max_new, match):
    with pytest.raises(TinygenError, match=match):
        generate(tiny_model(), np.array(idx), max_new)


def test_stop_tokens_end_rows_independently_and_pad():
    model = tiny_model()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    full = generate(model, prompt, 12, temperature=0)
    stops = {int(full[0, 5]), int(full[1, 9])}
    ends = [3 + next(i for i, t in enumerate(row[3:]) if t in stops) + 1 for row in full]
    assert ends[0] != ends[1]  # one row is padded
    out = generate(model, prompt, 12, temperature=0, stop=sorted(stops))
    assert out.shape == (2, max(ends))
    for row, full_row, end in zip(out, full, ends):
        assert np.array_equal(row[:end], full_row[:end]) and (row[end:] == -1).all()
    one = generate(model, prompt[0], 12, temperature=0, stop=int(full[0, 5]))
    assert one[-1] == full[0, 5] and int(full[0, 5]) not in one[3:-1]  # the stop id is kept, once


def test_stop_strings_with_a_tokenizer():
    model = tiny_model(vocab=128, embd=16, scale=0.3)  # ids < 128: one ASCII character per token
    tok = ByteTokenizer()
    full = generate(model, [65, 66], 20, temperature=0)
    text = tok.decode(full[2:])
    stop = text[6:8]
    first = text.find(stop)
    out = generate(model, [65, 66], 20, temperature=0, stop=["never there", stop], tokenizer=tok)
    assert np.array_equal(out, full[:2 + first + len(stop)])  # ids keep the tokens of the stop string
    streamed = "".join(stream(model, tok, [65, 66], 20, temperature=0, stop=stop))
    assert streamed == text[:first]  # the text stops just before it


# ------------------------------------------------------------ min_new_tokens
def test_suppress_tokens_known_answer_and_no_mutation():
    logits = np.array([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    out = suppress_tokens(logits, [0, 1])
    assert out.tolist() == [[-np.inf, -np.inf, 0.5], [-np.inf, -np.inf, 1.0]] and logits[0, 0] == 2.0


def test_min_new_tokens_overrules_an_eos_that_wins_the_first_step():
    """The demo's empty greedy completions: end-of-text is the argmax at the first step.
    With min_new_tokens=k the first k new tokens are never a stop id, and from then on the
    rows decode as before (transformers' MinNewTokensLengthLogitsProcessor)."""
    model = tiny_model()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    first = generate(model, prompt, 1, temperature=0)[:, 3]
    stops = sorted(set(first.tolist()))
    assert generate(model, prompt, 8, temperature=0, stop=stops).shape == (2, 4)  # both rows end at once
    for k in (1, 3, 8):
        out = generate(model, prompt, 8, temperature=0, stop=stops, min_new_tokens=k)
        assert out.shape[1] >= 3 + k
        assert not np.isin(out[:, 3:3 + k], stops).any()
        # the first k tokens are the argmax among the other tokens
        logits = model.forward(prompt)[:, -1]
        assert np.array_equal(out[:, 3], suppress_tokens(logits, stops).argmax(axis=-1))


@given(seed=st.integers(0, 2**16), k=st.integers(0, 6))
def test_sampled_rows_never_stop_before_min_new_tokens(seed, k):
    model = tiny_model(vocab=5)
    out = generate(model, [[1, 2], [3, 4]], 6, seed=seed, stop=[0, 1], min_new_tokens=k, pad_id=-1)
    for row in out:
        new = row[2:][row[2:] >= 0]
        assert not np.isin(new[:k], [0, 1]).any()
        assert len(new) >= min(k + 1, 6) or not np.isin(new, [0, 1]).any()


def test_min_new_tokens_zero_is_the_default_and_stream_agrees():
    model = tiny_model(vocab=128, embd=16, scale=0.3)
    tok = ByteTokenizer()
    ids = generate(model, [65, 66], 10, seed=3, stop=[10], min_new_tokens=0)
    assert np.array_equal(ids, generate(model, [65, 66], 10, seed=3, stop=[10]))
    held = generate(model, [65, 66], 10, seed=3, stop=[10], min_new_tokens=4)
    assert "".join(stream(model, tok, [65, 66], 10, seed=3, stop=[10], min_new_tokens=4)) == tok.decode(
        [t for t in held[2:] if t != 10])


@pytest.mark.parametrize("k, stop, match", [(-1, [0], "min_new_tokens must be an integer >= 0"),
                                            (1.5, [0], "min_new_tokens"),
                                            (1, list(range(11)), "would suppress every token")])
def test_min_new_tokens_errors(k, stop, match):
    with pytest.raises(TinygenError, match=match):
        generate(tiny_model(), [1, 2], 3, stop=stop, min_new_tokens=k)


# ------------------------------------------------------------ streaming
def test_stream_text_holds_back_split_characters():
    tok = ByteTokenizer()
    data = "h€llo — ü!".encode()
    pieces = list(stream_text(iter(data), tok))
    assert "".join(pieces) == "h€llo — ü!" and "\ufffd" not in "".join(pieces)
    assert pieces[:5] == ["h", "", "", "€", "l"]


def test_stream_text_invalid_bytes_match_decode():
    tok = ByteTokenizer()
    for data in (b"a\xe2\x82", b"\xff\xfeab\xc3", b"\xe2\x82\xe2\x82\xac", b"ok"):
        assert "".join(stream_text(iter(data), tok)) == data.decode("utf-8", errors="replace")


def test_stream_text_stops():
    tok = ByteTokenizer()
    pieces = list(stream_text(iter(b"ab\ncd\n\nef"), tok, stop_texts=["\n\n"]))
    assert "".join(pieces) == "ab\ncd"
    assert pieces[2] == "" and pieces[3] == "\nc"  # the first "\n" waited for the next byte
    assert "".join(stream_text(iter(b"abcd"), tok, stop_ids={ord("c")})) == "ab"
    assert "".join(stream_text(iter(b"abcab"), tok, stop_texts=["cab", "bc"])) == "a"  # earliest start wins
    consumed = iter(b"xySTOPzz")
    assert "".join(stream_text(consumed, tok, stop_texts=["STOP"])) == "xy" and bytes(consumed) == b"zz"


def test_stream_yields_exactly_the_decoded_text():
    model = tiny_model(vocab=256, embd=16, scale=0.3)  # random bytes: split and invalid UTF-8 too
    tok = ByteTokenizer()
    for seed in range(4):
        ids = generate(model, [72, 105], 30, seed=seed, top_k=40)
        pieces = list(stream(model, tok, [72, 105], 30, seed=seed, top_k=40))
        assert "".join(pieces) == tok.decode(ids[2:])


def test_a_bidirectional_model_does_not_generate():
    import dataclasses

    from tinygen.beam import beam_search

    model = tiny_model()
    mlm = GPT(dataclasses.replace(model.config, causal=False), params=model.params)
    for call in (lambda: generate(mlm, [1, 2], 3), lambda: list(stream(mlm, ByteTokenizer(), [1, 2], 3)),
                 lambda: beam_search(mlm, [1, 2], 3, 2), lambda: mlm.generate(np.array([[1]]), 2)):
        with pytest.raises(TinygenError, match="masked language model .* cannot generate left to right"):
            call()
