"""Masked language modelling (BERT): reconstruct chosen tokens, seeing the text on both sides.

The same transformer with bidirectional attention (GPTConfig(causal=False),
tinygen.parts) reads a window in which some tokens were hidden, and is
trained to predict the original token at exactly those positions:

    window   def  add ( a ,  b ) :  return  a  +  b         T tokens of text
    chosen         *           *                  *          15% of the positions
    x        def  <|mask|> ( a , b ) : return  q  + b        80% <|mask|>, 10% a random token, 10% kept
    y        -1   add  -1 ...  -1 ... ) ... -1   a   -1 -1   the original token where chosen, -1 (IGNORE) elsewhere

The loss is the cross-entropy at the chosen positions only (tinygen.loss
ignores -1), and logits[t] predicts the token *at* t, not after it. The
random and kept tokens keep the model from learning that only <|mask|>
positions matter: any position may be one it must check. The recipe is
BERT's (Devlin et al. 2019; google-research/bert create_pretraining_data.py):
per window exactly max(1, round(0.15 n)) positions are chosen among the n
that are not special tokens (end-of-text separators are never hidden), and a
random replacement is drawn uniformly from the ordinary (non-special) tokens.

Such a model cannot continue text left to right (each position's
prediction depends on what comes after it); it fills in blanks:
`fill_mask` and `tinygen fill-mask`.

Shapes: B batch, T block size, V vocabulary, K candidates.
"""
from typing import NamedTuple

import numpy as np

from .data import STREAM_TRAIN, STREAM_VAL, random_windows
from .errors import TinygenError
from .layers import softmax
from .loss import IGNORE

MASK = "<|mask|>"
MASK_RATE = 0.15  # share of the (non-special) positions of a window that are chosen
REPLACE_MASK, REPLACE_RANDOM = 0.8, 0.1  # of the chosen: <|mask|>, a random token; the rest (0.1) kept


def mask_tokens(ids, rng: np.random.Generator, mask_id: int, ordinary_ids, special_ids=()):
    """BERT's masking of a batch of windows: ids (B, T) -> (x, y), each (B, T) int64.

    ordinary_ids: the ids a random replacement is drawn from (every token but
    the special ones); special_ids: ids that are never chosen (separators).
    Draws from `rng`: one uniform per position to choose, one to decide how
    each position is replaced, one replacement id per position.

    >>> x, y = mask_tokens(np.arange(20)[None], np.random.default_rng(0), 99, np.arange(20))
    >>> int((y >= 0).sum()), bool(np.array_equal(x[y < 0], np.arange(20)[None][y < 0]))
    (3, True)
    """
    ids = np.asarray(ids, dtype=np.int64)
    B, T = ids.shape
    eligible = ~np.isin(ids, list(special_ids))  # (B, T)
    n_eligible = eligible.sum(axis=1)  # (B,)
    n_chosen = np.where(n_eligible > 0, np.maximum(1, np.round(MASK_RATE * n_eligible)), 0).astype(np.int64)
    keys = np.where(eligible, rng.random((B, T)), np.inf)  # a random order of the eligible positions
    rank = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1)  # (B, T) each position's place in it
    chosen = rank < n_chosen[:, None]  # (B, T) the first n_chosen of each row
    how = rng.random((B, T))
    random_ids = np.asarray(ordinary_ids, dtype=np.int64)[rng.integers(0, len(ordinary_ids), (B, T))]
    x = np.where(chosen & (how < REPLACE_MASK), mask_id, ids)
    x = np.where(chosen & (how >= REPLACE_MASK) & (how < REPLACE_MASK + REPLACE_RANDOM), random_ids, x)
    y = np.where(chosen, ids, IGNORE)
    return x, y


class MaskedBatches:
    """batches(step) -> (x, y): B random windows of the step (the same windows as
    data.RandomBatches draws, without the shifted targets), masked by `mask_tokens` with
    the same generator. A pure function of the step, so resuming is exact."""

    def __init__(self, ids, batch_size: int, block_size: int, seed: int, mask_id: int, ordinary_ids,
                 special_ids=()):
        self.ids, self.batch_size, self.block_size, self.seed = ids, batch_size, block_size, seed
        self.mask_id, self.ordinary_ids, self.special_ids = mask_id, np.asarray(ordinary_ids), tuple(special_ids)
        random_windows(ids, 1, block_size, np.random.default_rng(0))  # fail early if too short

    def __call__(self, step: int):
        rng = np.random.default_rng([self.seed, STREAM_TRAIN, step])
        windows, _ = random_windows(self.ids, self.batch_size, self.block_size, rng)
        return mask_tokens(windows, rng, self.mask_id, self.ordinary_ids, self.special_ids)


def fixed_masked_batches(ids, n_batches: int, batch_size: int, block_size: int, seed: int, mask_id: int,
                         ordinary_ids, special_ids=()) -> list:
    """The held-out masked batches every evaluation uses, drawn once: [(x, y)] * n_batches."""
    rng = np.random.default_rng([seed, STREAM_VAL])
    out = []
    for _ in range(n_batches):
        windows, _ = random_windows(ids, batch_size, block_size, rng)
        out.append(mask_tokens(windows, rng, mask_id, ordinary_ids, special_ids))
    return out


def masking_ids(tokenizer) -> tuple:
    """(mask id, ordinary ids, special ids) of a tokenizer that has <|mask|>."""
    if MASK not in tokenizer.special_tokens:
        raise TinygenError(f"the tokenizer has no {MASK} special token; a masked language model's tokenizer "
                           f"needs one (tinygen pretrain --objective mlm trains it with one)")
    special = sorted(tokenizer.special_tokens.values())
    ordinary = np.setdiff1d(np.arange(tokenizer.vocab_size), special)
    return tokenizer.special_tokens[MASK], ordinary, tuple(special)


# ------------------------------------------------------------------ filling in masks
class Candidate(NamedTuple):
    text: str  # the token's text
    id: int
    probability: float


def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list:
    """The top_k candidates for each <|mask|> in `text`, most probable first: [[Candidate] per mask].

    One forward pass of a masked language model over the encoded text (its
    special tokens allowed); each mask position's logits, softmaxed, rank the
    vocabulary. Special tokens are not candidates.
    """
    if model.config.causal:
        raise TinygenError("this is a causal (left-to-right) model: fill-mask needs a masked language model "
                           "(tinygen pretrain --objective mlm); to continue text use tinygen sample")
    mask_id, ordinary, _ = masking_ids(tokenizer)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise TinygenError(f"top_k must be a positive integer, got {top_k!r}")
    ids = tokenizer.encode(text, allowed_special="all")
    if mask_id not in ids:
        raise TinygenError(f"the text has no {MASK}: mark each blank to fill with {MASK}")
    if len(ids) > model.config.block_size:
        raise TinygenError(f"the text is {len(ids)} tokens, more than the model's context of "
                           f"{model.config.block_size}: shorten it")
    logits = model.forward(np.array([ids]))[0]  # (T, V)
    out = []
    for t in np.flatnonzero(np.array(ids) == mask_id):
        probs = softmax(logits[t, ordinary].astype(np.float64))  # (V_ordinary,) specials excluded
        best = np.argsort(-probs, kind="stable")[:top_k]
        out.append([Candidate(tokenizer.decode([int(ordinary[i])]), int(ordinary[i]), float(probs[i])) for i in best])
    return out


def fill_in(text: str, candidates: list) -> str:
    """The text with each <|mask|> replaced by its top candidate.

    >>> fill_in("return <|mask|> + <|mask|>", [[Candidate(" x", 87, 0.5)], [Candidate(" 1", 9, 0.3)]])
    'return  x +  1'
    """
    pieces = text.split(MASK)
    return pieces[0] + "".join(c[0].text + rest for c, rest in zip(candidates, pieces[1:]))
