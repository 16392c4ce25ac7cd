"""Beam search against brute force, against a plain-Python reference, and its stopping rules."""
import itertools

import numpy as np
import pytest

from tinygen.beam import beam_search, log_softmax
from tinygen.config import GPTConfig
from tinygen.gpt import GPT
from tinygen.sampling import generate


def tiny_model(vocab=3, block=16, seed=1, scale=1.0):
    model = GPT(GPTConfig(vocab, block, 2, 2, 8, dtype="float64"), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for k, v in model.params.items():
        model.params[k] = v + rng.normal(0, scale, v.shape)
    return model


def brute_force(model, prompt, max_new, eos, length_penalty):
    """Every hypothesis (ends at the first eos or after max_new tokens), best first."""
    V = model.config.vocab_size
    out = []
    for n in range(1, max_new + 1):
        for new in itertools.product(range(V), repeat=n):
            if any(t in eos for t in new[:-1]) or (n < max_new and new[-1] not in eos):
                continue
            seq = list(prompt) + list(new)
            logp = log_softmax(model.forward(np.array([seq[:-1]]))[0])  # (T+n-1, V)
            total = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(new))
            out.append((total / n ** length_penalty, new))
    return sorted(out, key=lambda h: -h[0])


@pytest.mark.parametrize("eos, length_penalty", [((), 1.0), ((2,), 1.0), ((2,), 0.0), ((2,), -1.5), ((0, 2), 2.0)])
def test_enough_beams_is_exhaustive_search(eos, length_penalty):
    """With num_beams >= V ** max_new_tokens nothing is pruned: the result is brute force's ranking."""
    model = tiny_model()
    prompts = np.array([[0, 1], [2, 2]])
    K = 3 ** 3
    result = beam_search(model, prompts, 3, K, length_penalty=length_penalty, early_stopping="never",
                         eos_id=list(eos), num_return_sequences=K)
    for b, prompt in enumerate(prompts):
        want = brute_force(model, prompt, 3, eos, length_penalty)
        got = [(s, tuple(ids[2:2 + n])) for s, ids, n in zip(result.scores[b], result.ids[b], result.lengths[b])]
        assert len(want) <= K and [h for _, h in got[:len(want)]] == [h for _, h in want]
        np.testing.assert_allclose([s for s, _ in got[:len(want)]], [s for s, _ in want], rtol=1e-12)
        assert np.all(result.scores[b, len(want):] == -np.inf)  # fewer hypotheses exist than K
        for ids, n in zip(result.ids[b], result.lengths[b]):
            assert (ids[2 + n:] == -1).all()  # padded after the end


def reference_beam_search(model, prompt, max_new, K, length_penalty, early_stopping, eos):
    """transformers' rules written plainly, one hypothesis at a time."""
    running, finished, collecting = [(0.0, list(prompt))], [], True
    for g in range(max_new):
        cands = []
        for score, seq in running:
            logp = log_softmax(model.forward(np.array([seq]))[:, -1])[0]
            cands += [(score + logp[t], seq + [t]) for t in range(len(logp))]
        cands.sort(key=lambda c: -c[0])  # stable: earlier beam, then lower id, first on ties
        last = g + 1 == max_new
        if collecting:
            for score, seq in cands[:K]:
                if last or seq[-1] in eos:
                    finished = sorted(finished + [(score / (g + 1) ** length_penalty, seq)], key=lambda h: -h[0])[:K]
        running = [c for c in cands if c[1][-1] not in eos][:K]
        if last:
            break
        if collecting and len(finished) == K:
            if early_stopping is True:
                collecting = False
            else:
                length = max_new if early_stopping == "never" and length_penalty > 0 else g + 1
                collecting = running[0][0] / length ** length_penalty > finished[-1][0]
        if not collecting:
            break
    return finished


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, -0.5, 2.0])
def test_equals_plain_reference(K, early_stopping, length_penalty):
    model = tiny_model(vocab=5, seed=K, scale=0.2)  # flat enough that eos and the rules matter
    prompts = np.array([[1, 3, 4], [4, 4, 0]])
    result = beam_search(model, prompts, 5, K, length_penalty, early_stopping, eos_id=0, num_return_sequences=K)
    for b, prompt in enumerate(prompts):
        want = reference_beam_search(model, prompt, 5, K, length_penalty, early_stopping, {0})
        assert len(want) == K
        for (score, seq), got_score, ids, n in zip(want, result.scores[b], result.ids[b], result.lengths[b]):
            assert ids[:3 + n].tolist() == seq and n == len(seq) - 3
            assert got_score == pytest.approx(score, rel=1e-12)


def test_one_beam_without_eos_is_greedy():
    model = tiny_model(vocab=7)
    prompt = np.array([[1, 2], [3, 4]])
    result = beam_search(model, prompt, 10, 1)
    assert np.array_equal(result.ids[:, 0], generate(model, prompt, 10, temperature=0))


def test_never_is_at_least_as_good_as_the_heuristics():
    """Running beams evolve the same under every rule; only collecting stops sooner."""
    differ = 0
    for seed in range(4):
        model = tiny_model(vocab=5, seed=seed, scale=0.2)
        for lp in (2.0, 1.0, 0.0):
            best = {e: beam_search(model, [1, 3, 4], 6, 3, lp, e, eos_id=0).scores[0] for e in (True, False, "never")}
            assert best["never"] >= best[False] >= best[True]
            differ += best["never"] > best[True]
    assert differ  # the rules are not all the same on these models


def test_cache_and_sliding_window_agree_with_recomputation():
    model = tiny_model(vocab=6, block=6)
    prompt = np.array([[1, 2, 3], [5, 4, 3]])  # 3 + 9 tokens: the window slides
    for keep in (None, 1, 6):
        a = beam_search(model, prompt, 9, 3, eos_id=0, num_return_sequences=3, window_keep=keep)
        b = beam_search(model, prompt, 9, 3, eos_id=0, num_return_sequences=3, window_keep=keep, use_cache=False)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.lengths, b.lengths)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10)


def test_one_prompt_shapes_and_no_mutation():
    model = tiny_model(vocab=6)
    prompt = np.array([1, 2, 3])
    result = beam_search(model, prompt, 4, 2, num_return_sequences=2)
    assert result.ids.shape == (2, 7) and result.scores.shape == (2,) and result.lengths.tolist() == [4, 4]
    assert prompt.tolist() == [1, 2, 3] and result.scores[0] >= result.scores[1]
    zero = beam_search(model, prompt, 0, 2)
    assert zero.ids.tolist() == [[1, 2, 3]] and zero.lengths.tolist() == [0]


@pytest.mark.parametrize("options, match", [
    (dict(num_beams=0), "num_beams"), (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"), (dict(num_beams=2, eos_id=99), "eos_id"),
    (dict(num_beams=2, length_penalty=float("inf")), "length_penalty"), (dict(num_beams=2, max_new_tokens=-1), "max_new_tokens"),
])
def test_invalid_arguments(options, match):
    options = {"max_new_tokens": 3, **options}
    with pytest.raises(ValueError, match=match):
        beam_search(tiny_model(), [1, 2], **options)
