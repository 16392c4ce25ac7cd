"""Fill-in-the-middle (Bavarian et al. 2022): a left-to-right model that also infills.

A causal model only sees what comes before. To let it write the middle of a
document given both sides, some training documents are cut at two random
character positions into prefix, middle and suffix and moved around, with
three special tokens marking the pieces:

    document   def area(r):\\n    return 3.14 * r * r\\n          cut at | and |:
               def area(r):\\n    return |3.14 * r| * r\\n
    PSM        <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle <|endoftext|>
    SPM        <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle <|endoftext|>

Nothing else changes: the same causal model, the same next-token loss over
every token. Having read prefix and suffix, it must produce the middle after
<|fim_middle|>, and end it with <|endoftext|>. At inference the prompt is the
part up to <|fim_middle|> (PSM) and generation stops at end-of-text
(`infill_prompt`, `tinygen sample --suffix`). Each piece is encoded on its
own (the paper's Enc(prefix), Enc(suffix), Enc(middle)), as they are at
inference, where the middle is not written yet.

The mode is SPM with probability SPM_RATE (0.5: the paper's joint PSM+SPM
training), else PSM. With SPM the prefix runs straight into the middle.

Where it applies (`FimBatches`): to the documents of each training window,
after the token cache's windows are cut ("context-level" FIM in the paper's
terms). Each fragment of a window between end-of-text tokens is decoded,
rearranged with probability `rate`, and encoded again; the window is then
cut back to T + 1 tokens (the rearranged one is a few tokens longer: three
sentinels, and pieces encoded apart), or padded with end-of-text tokens that
no target counts. A fragment whose bytes are not whole UTF-8 (a window edge
inside a character) stays as it is. The token cache, the validation batches
(plain text: the left-to-right loss) and rate 0 stay exactly as without FIM.

`middle_losses` measures what FIM is for: how well a model predicts a
middle given its prefix and suffix (PSM, SPM), or given the prefix alone
(left to right), one example at a time (docs/objectives.md).

Shapes: B batch, T block size.
"""
import numpy as np

from .data import STREAM_TRAIN, random_windows
from .errors import TinygenError
from .loss import IGNORE, token_losses

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)  # cl100k's names (tinygen.tokenizer.CL100K_SPECIAL_TOKENS)
SPM_RATE = 0.5  # of the rearranged documents, the share in SPM order (the paper's joint training)


def fim_ids(tokenizer) -> tuple:
    """(prefix id, middle id, suffix id) of a tokenizer with the three FIM tokens, else a TinygenError."""
    missing = [t for t in FIM_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        raise TinygenError(f"the tokenizer has no {missing[0]} special token: this model was not trained for "
                           "fill-in-the-middle (pretrain with --fim-rate > 0)")
    return tuple(tokenizer.special_tokens[t] for t in FIM_TOKENS)


def split_points(n: int, rng: np.random.Generator) -> tuple:
    """Two cut positions 0 <= i <= j <= n, uniformly at random: prefix [0, i), middle [i, j), suffix [j, n).

    >>> split_points(10, np.random.default_rng(0))
    (7, 9)
    """
    i, j = sorted(int(c) for c in rng.integers(0, n + 1, size=2))
    return i, j


def arrange(tokenizer, prefix: str, middle: str, suffix: str, spm: bool) -> tuple:
    """(ids, n_context): the pieces in PSM (or SPM) order with the sentinels, and how many leading ids
    are the context a model is given before it writes the middle (up to <|fim_middle|>, and in SPM
    the prefix too). No end-of-text: the caller's stream supplies it.

    >>> from tinygen.tokenizer import ENDOFTEXT, Tokenizer
    >>> tok = Tokenizer({bytes([b]): b for b in range(256)}, "gpt2", dict(zip(FIM_TOKENS + (ENDOFTEXT,), range(256, 260))))
    >>> arrange(tok, "ab", "c", "d", spm=False)      # <pre> a b <suf> d <mid> c
    ([256, 97, 98, 258, 100, 257, 99], 6)
    >>> arrange(tok, "ab", "c", "d", spm=True)       # <pre> <suf> d <mid> a b c
    ([256, 258, 100, 257, 97, 98, 99], 6)
    """
    pre, mid, suf = fim_ids(tokenizer)
    p, m, s = (tokenizer.encode_ordinary(piece) for piece in (prefix, middle, suffix))
    if spm:
        ids = [pre, suf] + s + [mid] + p + m
        return ids, 3 + len(s) + len(p)  # <pre> <suf> suffix <mid> prefix
    ids = [pre] + p + [suf] + s + [mid] + m
    return ids, 3 + len(p) + len(s)


def rearrange(tokenizer, text: str, rng: np.random.Generator, spm_rate: float = SPM_RATE) -> tuple:
    """One document cut at two random character positions and arranged as PSM or SPM: (ids, n_context)."""
    i, j = split_points(len(text), rng)
    return arrange(tokenizer, text[:i], text[i:j], text[j:], spm=bool(rng.random() < spm_rate))


def check_rate(rate) -> float:
    """A FIM rate: a number in [0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not 0.0 <= rate <= 1.0:
        raise TinygenError(f"fim_rate must be a number in [0, 1], got {rate!r}")
    return float(rate)


def fim_window(tokenizer, window, rate: float, rng: np.random.Generator, eot_id: int) -> np.ndarray:
    """A window of T + 1 ids with each fragment between end-of-text tokens rearranged with
    probability `rate`; cut back to T + 1, or padded with IGNORE (-1) marks where it got shorter.

    window (T+1,) ints -> (T+1,) int64, -1 where padding.
    """
    window = np.asarray(window, dtype=np.int64)
    cuts = np.flatnonzero(window == eot_id)
    pieces, start = [], 0
    for end in list(cuts) + [len(window)]:
        fragment = window[start:end]
        if len(fragment) and rng.random() < rate:
            try:
                text = tokenizer.decode_bytes(fragment.tolist()).decode("utf-8")
            except UnicodeDecodeError:  # a window edge inside a character: keep the fragment as it is
                text = None
            if text:
                fragment = np.array(rearrange(tokenizer, text, rng)[0], dtype=np.int64)
        pieces.append(fragment)
        if end < len(window):
            pieces.append(window[end:end + 1])  # the end-of-text token itself
        start = end + 1
    out = np.concatenate(pieces)[:len(window)]
    return np.concatenate([out, np.full(len(window) - len(out), IGNORE, dtype=np.int64)])


class FimBatches:
    """batches(step) -> (x, y): data.RandomBatches' windows of the step, each fragment rearranged
    with probability `rate` (fim_window), from the same generator. x (B, T), y (B, T); y is -1 where
    the rearranged window came out shorter (x holds end-of-text there).

    A pure function of the step, so resuming is exact; rate 0 gives RandomBatches' batches.
    """

    def __init__(self, ids, batch_size: int, block_size: int, seed: int, tokenizer, rate: float):
        self.ids, self.batch_size, self.block_size, self.seed = ids, batch_size, block_size, seed
        self.tokenizer, self.rate = tokenizer, check_rate(rate)
        fim_ids(tokenizer)
        if tokenizer.eot_id is None:
            raise TinygenError("fill-in-the-middle needs an <|endoftext|> token to find documents and end middles")
        random_windows(ids, 1, block_size, np.random.default_rng(0))  # fail early if too short

    def __call__(self, step: int):
        rng = np.random.default_rng([self.seed, STREAM_TRAIN, step])
        x, y = random_windows(self.ids, self.batch_size, self.block_size, rng)
        windows = np.concatenate([x, y[:, -1:]], axis=1)  # (B, T+1) the drawn windows
        eot = self.tokenizer.eot_id
        rows = np.stack([fim_window(self.tokenizer, w, self.rate, rng, eot) for w in windows])  # (B, T+1)
        x, y = rows[:, :-1].copy(), rows[:, 1:].copy()
        x[x == IGNORE] = eot  # padding reads end-of-text; its targets stay -1
        return x, y


def infill_prompt(tokenizer, prefix: str, suffix: str, spm: bool = False) -> list:
    """The ids to generate the middle from: PSM's <pre> prefix <suf> suffix <mid> (SPM's
    <pre> <suf> suffix <mid> prefix); the model continues with the middle, then end-of-text.

    >>> from tinygen.tokenizer import ENDOFTEXT, Tokenizer
    >>> tok = Tokenizer({bytes([b]): b for b in range(256)}, "gpt2", dict(zip(FIM_TOKENS + (ENDOFTEXT,), range(256, 260))))
    >>> infill_prompt(tok, "a", "b")
    [256, 97, 258, 98, 257]
    """
    ids, n_context = arrange(tokenizer, prefix, "", suffix, spm)
    assert n_context == len(ids)
    return ids


# ------------------------------------------------------------------ measuring infilling
MODES = ("psm", "spm", "prefix")


def middle_sequence(prefix, middle, suffix, ids, eot: int, mode: str) -> tuple:
    """(sequence, first middle index) of one example in `mode`: "psm" / "spm" (the FIM orders, the
    middle followed by end-of-text) or "prefix" (left to right: prefix + middle, the suffix unseen).

    prefix, middle, suffix: token id lists; ids: (prefix id, middle id, suffix id).
    >>> middle_sequence([1], [2, 3], [4], (7, 8, 9), 0, "psm")
    ([7, 1, 9, 4, 8, 2, 3, 0], 5)
    >>> middle_sequence([1], [2, 3], [4], (7, 8, 9), 0, "prefix")
    ([1, 2, 3], 1)
    """
    pre, mid, suf = ids
    if mode == "psm":
        head = [pre] + prefix + [suf] + suffix + [mid]
    elif mode == "spm":
        head = [pre, suf] + suffix + [mid] + prefix
    elif mode == "prefix":
        return prefix + middle, len(prefix)
    else:
        raise TinygenError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return head + middle + [eot], len(head)


def middle_losses(model, triples, ids, eot: int, mode: str = "psm", batch_size: int = 16) -> np.ndarray:
    """(n, 2) per example: the summed -log p of its middle's tokens, and their number, given the
    context of `mode` (middle_sequence). The end-of-text after the middle is not counted, so the
    three modes score exactly the same tokens. triples: [(prefix, middle, suffix) id lists], each
    fitting the model's context in the mode asked; a middle needs a token before it ("prefix"
    mode with an empty prefix scores its first token from nothing: that token is left out).
    """
    out = np.zeros((len(triples), 2))
    seqs = [middle_sequence(list(p), list(m), list(s), ids, eot, mode) for p, m, s in triples]
    for lo in range(0, len(seqs), batch_size):
        chunk = seqs[lo:lo + batch_size]
        T = max(1, max(len(seq) for seq, _ in chunk) - 1)  # 1: a lone one-token middle scores nothing
        x = np.full((len(chunk), T), eot, dtype=np.int64)
        y = np.full((len(chunk), T), IGNORE, dtype=np.int64)
        for b, ((seq, start), (_, middle, _)) in enumerate(zip(chunk, triples[lo:lo + batch_size])):
            x[b, :len(seq) - 1] = seq[:-1]
            first = max(start, 1)  # the position of a middle token, predicted from the one before it
            y[b, first - 1:start + len(middle) - 1] = seq[first:start + len(middle)]
        nll = token_losses(model.forward(x), y)  # (B, T)
        out[lo:lo + len(chunk), 0] = nll.sum(axis=1)
        out[lo:lo + len(chunk), 1] = (y >= 0).sum(axis=1)
    return out
