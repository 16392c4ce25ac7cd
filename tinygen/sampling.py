"""Sampling: from next-token logits to new tokens, with a KV cache.

Each step turns the model's last logits (B, V) into one token per row. The
logits pass through small pure processors, in Hugging Face transformers'
order (docs/sampling.md shows each on a worked example):

    penalize_repeats -> suppress_tokens -> temperature_scale -> top_k_filter -> top_p_filter -> min_p_filter -> sample

suppress_tokens acts only while a row has fewer than `min_new_tokens` new
tokens: it takes the stop tokens out of the running (transformers'
MinNewTokensLengthLogitsProcessor, which sits in the same place).
`temperature=0` is greedy: the argmax after the repetition penalty (the
filters always keep the argmax, so they change nothing). Processors return new
float64 arrays; none modifies its input, and `generate` returns a new array.

Decoding keeps each layer's keys and values (model.KVCache), so a new token
costs one position's work, O(T C), instead of the whole prefix's O(T^2 C); the
logits equal full recomputation's because causal attention never lets an
earlier position see a later one. When the sequence outgrows block_size the
context window jumps: it keeps the last `window_keep` tokens (default
block_size // 2) and rebuilds the cache from them. `use_cache=False` computes
the same windows from scratch each step, so both paths give the same tokens.

Shapes: B batch, T time, V vocabulary.
"""
import codecs
import numbers

import numpy as np

from .kv_decoding import Decoder
from .errors import TinygenError
from .model import check_ids
from .sharding import shard_rows, spawn_rngs


# ------------------------------------------------------------ processors
def _softmax64(logits):
    """Row softmax in float64; -inf entries get probability exactly 0."""
    logits = np.asarray(logits, dtype=np.float64)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def penalize_repeats(logits, ids, penalty):
    """Make every token already in `ids` less likely (CTRL; transformers' rule).

    A seen token's logit is divided by `penalty` when positive and multiplied
    by it when negative, once however often the token appeared. logits (B, V),
    ids (B, T) the whole sequence so far, prompt included -> (B, V) float64.

    >>> penalize_repeats(np.array([[2.0, -1.0, 0.5]]), np.array([[0, 1, 1]]), 2.0)
    array([[ 1. , -2. ,  0.5]])
    """
    logits = np.asarray(logits, dtype=np.float64)
    seen = np.zeros(logits.shape, dtype=bool)
    seen[np.arange(logits.shape[0])[:, None], ids] = True
    penalized = np.where(logits < 0, logits * penalty, logits / penalty)
    return np.where(seen, penalized, logits)


def suppress_tokens(logits, token_ids):
    """The logits with the given token ids at -inf: they cannot be picked, greedy or sampled.

    `min_new_tokens` applies it to the stop tokens (end-of-text) until a row
    has that many new tokens. logits (B, V) -> (B, V) float64.

    >>> suppress_tokens(np.array([[2.0, 1.0, 0.5]]), [0])
    array([[-inf,  1. ,  0.5]])
    """
    logits = np.array(logits, dtype=np.float64)
    logits[:, list(token_ids)] = -np.inf
    return logits


def temperature_scale(logits, temperature):
    """logits / temperature (> 0): below 1 sharpens the distribution, above 1 flattens it."""
    return np.asarray(logits, dtype=np.float64) / temperature


def top_k_filter(logits, k):
    """Keep the k largest logits of each row, -inf elsewhere; ties with the k-th are kept.

    k = 0 is "no limit", transformers' convention (its `generate` skips top-k when
    top_k is 0 or None): the logits come back unchanged, as a float64 copy.
    Ties are kept as transformers keeps them (`scores < topk(...)[-1]` goes).

    >>> top_k_filter(np.array([[1.0, 3.0, 2.0, 3.0]]), 2)
    array([[-inf,   3., -inf,   3.]])
    >>> top_k_filter(np.array([[1.0, 3.0]]), 0)
    array([[1., 3.]])
    """
    logits = np.asarray(logits, dtype=np.float64)
    if k == 0:
        return logits.copy()
    V = logits.shape[-1]
    k = min(k, V)
    kth = np.partition(logits, V - k, axis=-1)[:, V - k:V - k + 1]  # (B, 1) the k-th largest
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits, p):
    """Nucleus: keep the most probable tokens until their probability adds up to >= p.

    transformers' computation: sort ascending, drop every token whose cumulative
    probability, counted from the least likely, is <= 1 - p; the most likely
    token always stays (min_tokens_to_keep = 1).

    Ties, tinygen's own rule: the sort is stable, so tokens are ordered by
    (logit, id) and among equal logits the lower id is dropped first: [0, 0]
    with p = 0.5 keeps only id 1. transformers sorts with torch.sort, which is
    not stable: on CPU it agrees with this rule for up to 16 tokens, but from
    17 on which of several tied tokens survives at the cut is unspecified
    there. Only the tokens tied at the cut-off can differ; every token above
    the cut is kept by both.

    >>> top_p_filter(np.log([[0.1, 0.6, 0.3]]), 0.7)   # 0.6 + 0.3 >= 0.7
    array([[       -inf, -0.51082562, -1.2039728 ]])
    """
    logits = np.asarray(logits, dtype=np.float64)
    if p >= 1.0:
        return logits.copy()
    order = np.argsort(logits, axis=-1, kind="stable")  # (B, V) ascending
    cum = np.cumsum(_softmax64(np.take_along_axis(logits, order, axis=-1)), axis=-1)
    drop_sorted = cum <= 1.0 - p
    drop_sorted[:, -1] = False  # min_tokens_to_keep = 1
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)


def min_p_filter(logits, min_p):
    """Keep tokens whose probability is >= min_p times the top token's probability.

    >>> min_p_filter(np.log([[0.5, 0.3, 0.2]]), 0.5)   # threshold 0.25
    array([[-0.69314718, -1.2039728 ,        -inf]])
    """
    logits = np.asarray(logits, dtype=np.float64)
    probs = _softmax64(logits)
    drop = probs < min_p * probs.max(axis=-1, keepdims=True)
    drop[np.arange(len(drop)), probs.argmax(axis=-1)] = False  # min_tokens_to_keep = 1
    return np.where(drop, -np.inf, logits)


def process_logits(logits, ids=None, temperature=1.0, top_k=None, top_p=None, min_p=None,
                   repetition_penalty=None):
    """All processors in transformers' order. logits (B, V), ids (B, T) -> (B, V) float64.

    temperature 0 is treated as 1 here (greedy decoding takes the argmax anyway).
    """
    out = np.array(logits, dtype=np.float64)  # a copy, even when nothing applies
    if repetition_penalty is not None and repetition_penalty != 1.0:
        out = penalize_repeats(out, ids, repetition_penalty)
    if temperature not in (0, 1):
        out = temperature_scale(out, temperature)
    if top_k:  # None or 0: no limit, as in transformers
        out = top_k_filter(out, top_k)
    if top_p is not None and top_p < 1.0:
        out = top_p_filter(out, top_p)
    if min_p is not None and min_p > 0.0:
        out = min_p_filter(out, min_p)
    return out


def sample_from_logits(logits, rng):
    """One id per row drawn from softmax(logits), by inverting the CDF with one uniform per row.

    logits (B, V) -> (B,) int64. Exactly B numbers are drawn from `rng` per call,
    so a row's draws do not depend on what the other rows sampled. A token with
    probability 0 (-inf logit) is never drawn.
    """
    cdf = np.cumsum(_softmax64(logits), axis=-1)  # (B, V)
    total = cdf[:, -1:]
    target = np.minimum(rng.random((len(cdf), 1)) * total, np.nextafter(total, 0.0))
    return (cdf <= target).sum(axis=-1)  # the first index whose cdf exceeds target


# ------------------------------------------------------------ validation
def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and np.isfinite(x)


def check_sampling_options(temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                           seed=None):
    """Raise TinygenError (a ValueError) naming the first bad option and its value."""
    if not _is_real(temperature) or temperature < 0:
        raise TinygenError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise TinygenError(f"top_k must be an integer >= 1, or 0 or None for no limit, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise TinygenError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and (not _is_real(min_p) or not 0.0 <= min_p <= 1.0):
        raise TinygenError(f"min_p must be in [0, 1], got {min_p!r}")
    if repetition_penalty is not None and (not _is_real(repetition_penalty) or repetition_penalty <= 0):
        raise TinygenError(f"repetition_penalty must be a number > 0 (1 is none), got {repetition_penalty!r}")
    if seed is not None and not isinstance(seed, np.random.Generator) and (not _is_int(seed) or seed < 0):
        raise TinygenError(f"seed must be an integer >= 0 or a numpy Generator, got {seed!r}")


def make_rng(seed):
    """A Generator from a seed (None: fresh entropy); a Generator passes through."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def parse_stop(stop, tokenizer=None):
    """stop: None, an id, a string, or a list of them -> (set of ids, list of strings)."""
    items = [] if stop is None else [stop] if isinstance(stop, (str, numbers.Integral)) else list(stop)
    ids, texts = set(), []
    for s in items:
        if _is_int(s):
            ids.add(int(s))
        elif isinstance(s, str) and s:
            if tokenizer is None:
                raise TinygenError(f"stop string {s!r} needs a tokenizer: pass tokenizer=...")
            texts.append(s)
        else:
            raise TinygenError(f"stop must be token ids or non-empty strings, got {s!r}")
    return ids, texts


def require_causal(config, what="generation"):
    """Raise TinygenError unless the model is causal: a masked language model (GPTConfig.causal False)
    was trained to fill in masked positions seeing both sides, not to continue text left to right."""
    if not getattr(config, "causal", True):
        raise TinygenError(f"this is a masked language model (causal=False): it cannot generate left to right, "
                           f"so {what} does not apply; fill in <|mask|> tokens with `tinygen fill-mask`")


def check_prompt(model, idx):
    """(B, T) or (T,) ids of equal-length prompts -> (B, T) int64 copy, checked (a causal model's)."""
    require_causal(model.config)
    idx = np.asarray(idx)
    if idx.size == 0:
        raise TinygenError(f"the prompt is empty (shape {idx.shape}): generation needs at least one token")
    if idx.ndim == 1:
        idx = idx[None, :]
    idx = check_ids(idx, model.config, "prompt")  # also rejects T > block_size
    return idx.astype(np.int64)


# ------------------------------------------------------------ decoding
def decode_tokens(model, ids, prompt_len, max_new_tokens, pick, use_cache=True, window_keep=None):
    """Yield the next tokens (B,) step by step, writing each into ids[:, n] in place.

    ids (B, prompt_len + max_new_tokens) int64 holds the prompt in its first
    prompt_len columns; pick(logits (B, V), seq (B, n)) -> (B,) chooses tokens.
    The cache and the sliding window are decode.Decoder's.
    """
    decoder = Decoder(model, ids.shape[0], use_cache, window_keep)
    for n in range(prompt_len, prompt_len + max_new_tokens):
        tok = pick(decoder.next_logits(ids, n), ids[:, :n])
        ids[:, n] = tok
        yield tok


def hold_stops(pick, stop_ids, prompt_len, min_new_tokens, vocab_size):
    """pick, with the stop tokens suppressed while a row has fewer than min_new_tokens new tokens.

    The count is the sequence's length minus prompt_len (the `seq` pick is
    given grows by one per step, from prompt_len). Stop strings are not
    suppressed (they are text, found after the token is chosen), as in
    transformers, where min_new_tokens acts on eos_token_id only.
    """
    if not _is_int(min_new_tokens) or min_new_tokens < 0:
        raise TinygenError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    held = sorted(i for i in stop_ids if 0 <= i < vocab_size)
    if not min_new_tokens or not held:
        return pick
    if len(held) == vocab_size:
        raise TinygenError(f"min_new_tokens={min_new_tokens} would suppress every token: all {vocab_size} are stop tokens")

    def pick_after_min(logits, seq):
        if seq.shape[1] - prompt_len < min_new_tokens:
            logits = suppress_tokens(logits, held)
        return pick(logits, seq)

    return pick_after_min


def make_picker(temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None, seed=None):
    """pick(logits (B, V), seq (B, n)) -> (B,) ids: greedy at temperature 0, else sampled."""
    check_sampling_options(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    penalize = repetition_penalty is not None and repetition_penalty != 1.0
    if temperature == 0:
        if not penalize:
            return lambda logits, seq: np.argmax(logits, axis=-1)
        return lambda logits, seq: np.argmax(penalize_repeats(logits, seq, repetition_penalty), axis=-1)
    rng = make_rng(seed)

    def pick(logits, seq):
        out = process_logits(logits, seq, temperature, top_k, top_p, min_p, repetition_penalty)
        return sample_from_logits(out, rng)

    return pick


class _StopWatcher:
    """Per-row text of the generated tokens (incremental UTF-8), to find stop strings."""

    def __init__(self, tokenizer, texts, batch):
        self.tokenizer, self.texts = tokenizer, texts
        self.longest = max(map(len, texts))
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(batch)]
        self.text = [""] * batch

    def feed(self, row, token):
        """Add one token to a row; return the index where a stop string starts, or -1."""
        piece = self.decoders[row].decode(self.tokenizer.decode_bytes([int(token)]))
        old = len(self.text[row])
        self.text[row] += piece
        lo = max(0, old - self.longest + 1)  # a new match must end in the new piece
        hits = [i for i in (self.text[row].find(s, lo) for s in self.texts) if i >= 0]
        return min(hits) if hits else -1


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, min_p=None,
             repetition_penalty=None, seed=None, stop=None, use_cache=True, tokenizer=None,
             pad_id=-1, window_keep=None, min_new_tokens=0, workers=None):
    """Continue each prompt by up to max_new_tokens tokens; returns the ids, prompt first.

    idx: (B, T) equal-length prompts, or one prompt (T,) (then the result is 1-D).
    temperature 0 is greedy; top_k / top_p / min_p filter and repetition_penalty
    (> 1 discourages repeats) act as in transformers, in the module's order.
    seed: an int or a numpy Generator makes sampling reproducible.
    stop: token ids and/or strings (strings need `tokenizer`, anything with
    decode_bytes). A row ends at the first stop token, which is kept in its ids,
    or at the token whose text completes a stop string (also kept; stream()
    trims the text). Output width is the longest row; rows that ended earlier
    are padded with pad_id (-1: not a token; `row[row >= 0]` recovers one).
    use_cache=False recomputes every step from scratch (same tokens, slower).
    window_keep: tokens kept when the context slides past block_size.
    min_new_tokens: the stop token ids cannot be chosen until a row has this
    many new tokens (transformers' name and rule: its eos_token_id is our stop
    ids; a stop string can still end a row earlier). A greedy completion that
    would be empty because end-of-text wins the first step gets
    min_new_tokens=1 tokens instead.
    workers: shards of rows decoded at once, each on its own thread with a one-thread BLAS
    (None or 1: one stream, BLAS with its own threads). One stream is the default because it
    measured faster: a decoding step is many small calls (Python between them holds the GIL,
    so threads queue for it) or, for a large model, one read of every weight per shard
    (benchmarks/compare_api.py, batch 8: two shards ran at 0.44x one stream's tokens/s on S,
    0.80x on M, 0.72x on GPT-2 small at batch 4). Greedy rows come out the same for any
    count (to the rounding of the logits); sampled rows draw from generators spawned from
    `seed` per shard, reproducible for a given count but different between counts.
    """
    prompt = check_prompt(model, idx)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise TinygenError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    stop_ids, stop_texts = parse_stop(stop, tokenizer)
    check_sampling_options(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, use_cache=use_cache, window_keep=window_keep,
                   min_new_tokens=min_new_tokens, stop_ids=stop_ids, stop_texts=stop_texts, tokenizer=tokenizer)
    with model.workers_for(prompt.shape[0], 1 if workers is None else workers) as pool:
        rows = shard_rows(prompt.shape[0], pool.n)
        seeds = [seed] if len(rows) == 1 else spawn_rngs(make_rng(seed), len(rows))
        shards = pool.map(lambda job: _decode_rows(model, prompt[job[0]], max_new_tokens, seed=job[1], **options),
                          list(zip(rows, seeds)))
    ids = np.concatenate([shard_ids for shard_ids, _ in shards], axis=0)  # (B, T + max_new_tokens)
    lengths = np.concatenate([shard_lengths for _, shard_lengths in shards])  # (B,) each row's final length
    ids = ids[:, :lengths.max()].copy()
    for b in np.flatnonzero(lengths < ids.shape[1]):
        ids[b, lengths[b]:] = pad_id
    return ids[0] if np.ndim(idx) == 1 else ids


def _decode_rows(model, prompt, max_new_tokens, *, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                 use_cache, window_keep, min_new_tokens, stop_ids, stop_texts, tokenizer):
    """One stream of generate: prompt (B, T) -> (ids (B, T + max_new_tokens), each row's final length (B,))."""
    B, T = prompt.shape
    pick = hold_stops(make_picker(temperature, top_k, top_p, min_p, repetition_penalty, seed), stop_ids, T,
                      min_new_tokens, model.config.vocab_size)
    ids = np.empty((B, T + max_new_tokens), dtype=np.int64)
    ids[:, :T] = prompt
    lengths = np.full(B, T + max_new_tokens)  # final length of each row
    done = np.zeros(B, dtype=bool)
    watcher = _StopWatcher(tokenizer, stop_texts, B) if stop_texts else None
    steps = decode_tokens(model, ids, T, max_new_tokens, pick, use_cache, window_keep)
    for n, tok in enumerate(steps, T):
        if not (stop_ids or watcher):
            continue
        for b in np.flatnonzero(~done):
            if int(tok[b]) in stop_ids or (watcher is not None and watcher.feed(b, tok[b]) >= 0):
                done[b], lengths[b] = True, n + 1
        if done.all():
            break
    return ids, lengths


def stream(model, tokenizer, prompt_ids, max_new_tokens, stop=None, **options):
    """Yield the text of one prompt's continuation piece by piece, as tokens are made.

    prompt_ids (T,) or (1, T); options: those of generate (temperature, top_k,
    seed, use_cache, ...). The text logic is stream_text's.
    """
    prompt = check_prompt(model, prompt_ids)
    if prompt.shape[0] != 1:
        raise TinygenError(f"stream takes one prompt, got a batch of {prompt.shape[0]}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise TinygenError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    stop_ids, stop_texts = parse_stop(stop, tokenizer)
    use_cache, window_keep = options.pop("use_cache", True), options.pop("window_keep", None)
    min_new_tokens = options.pop("min_new_tokens", 0)
    T = prompt.shape[1]
    pick = hold_stops(make_picker(**options), stop_ids, T, min_new_tokens, model.config.vocab_size)
    ids = np.empty((1, T + max_new_tokens), dtype=np.int64)
    ids[:, :T] = prompt
    tokens = (int(tok[0]) for tok in decode_tokens(model, ids, T, max_new_tokens, pick, use_cache, window_keep))
    yield from stream_text(tokens, tokenizer, stop_ids, stop_texts)


def stream_text(tokens, tokenizer, stop_ids=(), stop_texts=()):
    """Text pieces of a stream of token ids, each as soon as it is safe to print.

    Bytes of a character split across tokens are held back until it is
    complete (an incremental UTF-8 decoder), so nothing garbled is printed;
    the pieces join to tokenizer.decode(ids) of the tokens consumed. A stop id
    ends the stream without its own text; a stop string ends it just before
    the string, and text that might be the start of one is held back until it
    is known not to be. Consuming stops at the stop, so generation ends there.

    >>> class Bytes: decode_bytes = staticmethod(bytes)
    >>> list(stream_text(iter([104, 0xE2, 0x82, 0xAC, 105]), Bytes()))  # "h€i", € in 3 tokens
    ['h', '', '', '€', 'i']
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, sent = "", 0  # all text so far; how much of it has been yielded
    for tok in tokens:
        if tok in stop_ids:
            break
        text += decoder.decode(tokenizer.decode_bytes([tok]))
        # every match starts at or after `sent`: text before it had no stop-string prefix left open
        cut = min([i for i in (text.find(s, sent) for s in stop_texts) if i >= 0], default=-1)
        if cut >= 0:
            yield text[sent:cut]
            return
        safe = len(text) - _pending_stop_prefix(text, stop_texts)
        yield text[sent:safe]
        sent = safe
    text += decoder.decode(b"", final=True)  # an unfinished character becomes U+FFFD
    cut = min([i for i in (text.find(s, sent) for s in stop_texts) if i >= 0], default=len(text))
    if cut > sent:
        yield text[sent:cut]


def _pending_stop_prefix(text, stops):
    """Length of the longest end of `text` that starts some stop string (to hold back).

    >>> _pending_stop_prefix("hello\\n", ["\\n\\n"])
    1
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
