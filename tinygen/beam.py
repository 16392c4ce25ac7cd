"""Beam search: follow the num_beams most probable continuations instead of one sample.

Each step extends every running beam by every token, scores the candidates
by their total log-probability, and keeps the best. A candidate that ends
(an eos token, or the last allowed token) becomes a finished hypothesis with

    score = sum of its new tokens' log-probs / new_length ** length_penalty

where new_length counts the generated tokens, eos included (as transformers,
which divides by the length *without* the prompt for decoder-only models).
length_penalty > 0 favours longer hypotheses, < 0 shorter ones, 0 ranks by
probability alone. The rules follow transformers' vectorised beam search:

- only candidates among the top num_beams of a step may finish; the running
  beams are the best num_beams candidates that do not end in eos;
- a row stops collecting once it has num_beams finished hypotheses and
  `early_stopping` says no running beam can beat the worst of them:
  True: stop at once; False (default, transformers' heuristic): when the best
  running score divided by its current length ** length_penalty is no better;
  "never": only when that is impossible (the bound uses max_new_tokens as the
  length when length_penalty > 0), so no better hypothesis is ever cut off.

With num_beams >= V ** max_new_tokens nothing is ever pruned and the result
is the exhaustive search's (tests/test_beam.py checks against brute force).
Scores are float64 log-softmax of the raw logits: no sampling processors.

Shapes: B prompts, K num_beams, R num_return_sequences, T prompt length,
N max_new_tokens, V vocabulary.
"""
import numbers
from typing import NamedTuple

import numpy as np

from .kv_decoding import Decoder
from .errors import TinygenError
from .sampling import check_prompt


class BeamResult(NamedTuple):
    ids: np.ndarray  # (B, R, T + N) prompt + hypothesis, pad_id after each hypothesis ends
    scores: np.ndarray  # (B, R) float64, best first: sum log-probs / length ** length_penalty
    lengths: np.ndarray  # (B, R) new tokens of each hypothesis, eos included


def log_softmax(logits):
    """(B, V) -> float64 log-probabilities, stable for any logit size."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _check(max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences, eos_id, vocab_size):
    def is_int(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not is_int(num_beams) or num_beams < 1:
        raise TinygenError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise TinygenError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise TinygenError(f"num_return_sequences must be an integer in [1, num_beams={num_beams}], "
                           f"got {num_return_sequences!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) or not np.isfinite(length_penalty):
        raise TinygenError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise TinygenError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    eos = [] if eos_id is None else [eos_id] if is_int(eos_id) else list(eos_id)
    for e in eos:
        if not is_int(e) or not 0 <= e < vocab_size:
            raise TinygenError(f"eos_id must be token ids in [0, {vocab_size}), got {eos_id!r}")
    return eos


def _add(hyps, num_beams, score, ids, length):
    """Keep the num_beams best finished hypotheses of one row, best first (ties: earlier first)."""
    hyps.append((score, ids, length))
    hyps.sort(key=lambda h: -h[0])  # stable
    del hyps[num_beams:]


def beam_search(model, idx, max_new_tokens, num_beams, length_penalty=1.0, early_stopping=False,
                eos_id=None, num_return_sequences=1, use_cache=True, pad_id=-1, window_keep=None,
                min_new_tokens=0):
    """The num_return_sequences best continuations of each prompt, by beam search.

    idx (B, T) equal-length prompts or one prompt (T,); eos_id: an id or ids
    that end a hypothesis (None: every hypothesis has max_new_tokens tokens).
    Returns a BeamResult; with a 1-D prompt its arrays lose the B axis.
    The KV cache is permuted along with the beams (Decoder.reorder); the
    sliding window and use_cache behave as in sampling.generate.
    min_new_tokens: eos gets log-probability -inf until a hypothesis has this
    many new tokens (transformers' MinNewTokensLengthLogitsProcessor on the
    log-probs), so no hypothesis finishes before then except at max_new_tokens.
    """
    prompt = check_prompt(model, idx)
    V = model.config.vocab_size
    eos = _check(max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences, eos_id, V)
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, numbers.Integral) or min_new_tokens < 0:
        raise TinygenError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    if min_new_tokens and eos and len(set(eos)) == V:
        raise TinygenError(f"min_new_tokens={min_new_tokens} would suppress every token: all {V} are eos")
    B, T = prompt.shape
    K, N = num_beams, max_new_tokens
    is_eos = np.zeros(V, dtype=bool)
    is_eos[eos] = True
    seqs = np.repeat(prompt, K, axis=0)  # (B*K, T) running beams, grown one column per step
    seqs = np.concatenate([seqs, np.zeros((B * K, N), dtype=np.int64)], axis=1)  # (B*K, T+N)
    scores = np.full((B, K), -np.inf)  # sum of log-probs of each running beam
    scores[:, 0] = 0.0  # all K start as the prompt: expand only one copy at first
    finished = [[] for _ in range(B)]  # per row: [(score, ids, new length)], best first
    collecting = np.ones(B, dtype=bool)  # rows whose finished set may still change
    decoder = Decoder(model, B * K, use_cache, window_keep)
    for g in range(N):  # g tokens generated so far
        n = T + g
        logp = log_softmax(decoder.next_logits(seqs, n))  # (B*K, V)
        if g < min_new_tokens:
            logp[:, eos] = -np.inf  # too short to end
        cand = scores[:, :, None] + logp.reshape(B, K, V)
        cand = cand.reshape(B, K * V)  # candidate r = beam r // V extended by token r % V
        order = np.argsort(-cand, axis=1, kind="stable")  # (B, K*V) best first
        last = g + 1 == N
        src = np.zeros((B, K), dtype=np.int64)
        for b in range(B):
            if collecting[b]:
                for r in order[b, :K]:  # only the top K may finish
                    beam, tok = divmod(int(r), V)
                    if cand[b, r] > -np.inf and (last or is_eos[tok]):
                        hyp = np.append(seqs[b * K + beam, :n], tok)
                        _add(finished[b], K, cand[b, r] / (g + 1) ** length_penalty, hyp, g + 1)
            keep = order[b][~is_eos[order[b] % V]][:K]  # the best K that go on
            src[b], seqs_tok = b * K + keep // V, keep % V
            scores[b] = cand[b, keep]
            seqs[b * K:(b + 1) * K, n] = seqs_tok
        if last:
            break
        rows = src.reshape(-1)
        seqs[:, :n] = seqs[rows, :n]  # each new beam's history is its source beam's
        decoder.reorder(rows)
        for b in np.flatnonzero(collecting):
            collecting[b] = _still_collecting(finished[b], scores[b, 0], K, g + 1, N, length_penalty, early_stopping)
        if not collecting.any():
            break
    return _result(prompt, finished, N, num_return_sequences, pad_id, np.ndim(idx) == 1)


def _still_collecting(hyps, best_running, num_beams, length, max_new_tokens, length_penalty, early_stopping):
    """transformers' stopping rule for one row, after `length` generated tokens."""
    if len(hyps) < num_beams:
        return True
    if early_stopping is True:
        return False
    if early_stopping == "never" and length_penalty > 0:
        length = max_new_tokens  # longer is better: the best a running beam could do is at the end
    return best_running / length ** length_penalty > hyps[-1][0]


def _result(prompt, finished, N, R, pad_id, one_prompt):
    B, T = prompt.shape
    ids = np.full((B, R, T + N), pad_id, dtype=np.int64)
    ids[:, :, :T] = prompt[:, None, :]
    scores = np.full((B, R), -np.inf)
    lengths = np.zeros((B, R), dtype=np.int64)
    for b in range(B):
        hyps = finished[b] if N else [(0.0, prompt[b], 0)]
        for j, (score, hyp, length) in enumerate(hyps[:R]):
            ids[b, j, :len(hyp)] = hyp
            scores[b, j], lengths[b, j] = score, length
    if one_prompt:
        return BeamResult(ids[0], scores[0], lengths[0])
    return BeamResult(ids, scores, lengths)
