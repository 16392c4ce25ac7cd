"""Byte-pair encoding, the algorithm: learn merges from counted chunks, apply them by rank.

Training (`train_merges`) starts from the 256 byte tokens and repeatedly merges
the most frequent adjacent pair into a new token. Encoding (`encode_piece`)
replays the merges on one pre-token chunk, lowest rank first, exactly as
tiktoken does; `encode_pieces` does the same for many chunks at once, one
NumPy round per merge step of all of them (a fresh tokenizer meets thousands).
The `Tokenizer` class in `tinygen.tokenizer` wraps them with a split pattern,
special tokens and file formats; this module knows only bytes and integer ids.

Training is incremental, not a recount:
- each distinct chunk is stored once with its frequency (a "word"), as a str
  with one character per token (`chr(id)`), so applying a merge to a word is
  one C-level `str.replace` and a pair is a 2-character string;
- `counts[pair]` is the frequency-weighted number of occurrences of each
  adjacent pair, and `where[pair]` lists the words that contain it;
- after merging pair (a, b) into t, only the words in `where[(a, b)]` are
  touched, and only the pairs around each merge site change:
  (x, a) -> (x, t) and (b, y) -> (t, y);
- the best pair comes from a heap of (-count, pair) entries with lazy deletion:
  counts of existing pairs only go down, so a popped entry whose count is
  stale is pushed back with its true count and the next entry is tried.

Tie-break (deterministic): the highest count wins; among equal counts, the
pair of token ids (left, right) that is smallest lexicographically.

Every merge makes a new byte string: a run of bytes that no merge crosses is
segmented the same way in every word, so once (ab, c) has built "abc", no word
can still hold "a" next to "bc". Token bytes are therefore unique, and a token's
id is also its merge rank.
"""
import heapq
import warnings
from itertools import chain, islice, repeat
from operator import add

import numpy as np

LONG_PIECE = 256  # pieces longer than this are merged with a heap: O(n log n), not O(n^2)
_BYTES = [bytes([b]) for b in range(256)]
_NONE = 1 << 62  # the rank of a pair that is not a token: above every real rank
NO_PAIR = (1 << 31) - 1  # the same in NumPy's arrays: above every id < 2^21, and rank << 32 fits in int64


def train_merges(chunk_counts, vocab_size, progress=None):
    """Learn merges from {chunk_bytes: frequency} until there are `vocab_size` tokens.

    Returns (merges, token_bytes): merges is a list of (left_id, right_id) in the
    order they were learned, token_bytes[i] the bytes of token i (0..255 are
    the single bytes). Stops early, with a warning, when no pair is left.

    >>> merges, toks = train_merges({b"abab": 3, b"ab": 1}, 258)
    >>> merges, toks[256:]          # (97, 98) occurs 7 times, then (256, 256) 3 times
    ([(97, 98), (256, 256)], [b'ab', b'abab'])
    """
    token_bytes = [bytes([i]) for i in range(256)]
    words, freqs = [], []
    for chunk, freq in chunk_counts.items():
        if len(chunk) > 1:
            words.append(chunk.decode("latin-1"))  # one char per byte: chr(byte) == token id
            freqs.append(freq)
    counts, where = {}, {}
    for i, word in enumerate(words):
        freq = freqs[i]
        for pair in map(add, word, islice(word, 1, None)):
            counts[pair] = counts.get(pair, 0) + freq
            where.setdefault(pair, []).append(i)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    target = vocab_size - len(token_bytes)
    while len(token_bytes) < vocab_size:
        pair = _pop_best(heap, counts)
        if pair is None:
            warnings.warn(
                f"BPE training stopped at {len(token_bytes)} tokens, before vocab_size={vocab_size}: "
                "no pair of adjacent tokens is left in the text; give more text for a larger vocabulary",
                stacklevel=3,
            )
            break
        a, b = ord(pair[0]), ord(pair[1])
        merges.append((a, b))
        token_bytes.append(token_bytes[a] + token_bytes[b])
        touched = _merge(pair, chr(len(token_bytes) - 1), words, freqs, counts, where)
        for p in touched:
            heapq.heappush(heap, (-counts[p], p))
        if progress is not None and (len(merges) % 16 == 0 or len(token_bytes) == vocab_size):
            progress(len(token_bytes) - 256, target)
    return merges, token_bytes


def _pop_best(heap, counts):
    """The pair with the highest true count (then the smallest), or None; drops stale entries."""
    while heap:
        neg, pair = heap[0]
        true = counts.get(pair, 0)
        if true == -neg:
            heapq.heappop(heap)
            return pair
        if true:  # counts only go down: a stale entry is an upper bound; put it back, corrected
            heapq.heapreplace(heap, (-true, pair))
        else:  # merged away, or no occurrence left
            heapq.heappop(heap)
    return None


def _merge(pair, new, words, freqs, counts, where):
    """Merge `pair` into the new token char `new` in every word that has it.

    Only pairs next to a merge site change. In "xaby" -> "xty": (x,a) and (b,y)
    lose `freq`, (x,t) and (t,y) gain it; in "abab" -> "tt" the middle (b,a)
    becomes (t,t). Returns the set of new pairs, to be pushed on the heap.
    """
    a, b = pair
    touched = set()
    for i in set(where.pop(pair)):
        word = words[i]
        if pair not in word:  # stale index entry: an earlier merge took the pair away
            continue
        word = words[i] = word.replace(pair, new)
        freq = freqs[i]
        n = len(word)
        j = word.find(new)
        while j != -1:
            counts[pair] -= freq
            if j:
                left = word[j - 1]
                old, nxt = (b + a, new + new) if left == new else (left + a, left + new)
                counts[old] -= freq
                counts[nxt] = counts.get(nxt, 0) + freq
                where.setdefault(nxt, []).append(i)
                touched.add(nxt)
            if j + 1 < n:
                right = word[j + 1]
                if right != new:  # a following site handles the (t, t) case as its left
                    counts[b + right] -= freq
                    nxt = new + right
                    counts[nxt] = counts.get(nxt, 0) + freq
                    where.setdefault(nxt, []).append(i)
                    touched.add(nxt)
            j = word.find(new, j + 1)
    assert counts[pair] == 0, "pair counts out of sync"
    del counts[pair]
    return touched


def encode_piece(piece, ranks):
    """Token ids for one chunk's bytes: merge the adjacent pair of lowest rank, leftmost first.

    `ranks` maps token bytes to ids (an id is its merge rank). This is tiktoken's
    rule, which is what makes GPT-2 and cl100k vocabularies encode exactly.

    >>> encode_piece(b"aaab", {b"a": 0, b"b": 1, b"aa": 2, b"ab": 3, b"aab": 4})
    [2, 3]
    """
    if len(piece) > LONG_PIECE:
        return _encode_long(piece, ranks)
    return _merge_parts(list(map(_BYTES.__getitem__, piece)), ranks)


def _merge_parts(parts, ranks):
    """`encode_piece`'s merge loop, from any list of token bytes: [b"a", b"ab"] -> ids."""
    get = ranks.get
    pair_ranks = list(map(get, map(add, parts, islice(parts, 1, None)), repeat(_NONE)))
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NONE:
            break
        i = pair_ranks.index(best)  # leftmost of the lowest rank
        parts[i] += parts.pop(i + 1)
        del pair_ranks[i]
        if i:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], _NONE)
        if i < len(pair_ranks):
            pair_ranks[i] = get(parts[i] + parts[i + 1], _NONE)
    return list(map(ranks.__getitem__, parts))


def encode_pieces(pieces, ranks, token_bytes, finish_below=64, table=None):
    """[encode_piece(p, ranks) for p in pieces], with the merges of all pieces done together.

    `token_bytes[i]` is the bytes of token i (a list; None for unused ids).
    See `merge_pieces`, which does the work and returns the ids as arrays.

    >>> ranks = {bytes([b]): b for b in range(256)} | {b"aa": 256, b"ab": 257, b"aaab": 258}
    >>> token_bytes = [bytes([b]) for b in range(256)] + [b"aa", b"ab", b"aaab"]
    >>> encode_pieces([b"aaab", b"xaab", b"aaa"], ranks, token_bytes, finish_below=1)
    [[258], [120, 256, 98], [256, 97]]
    """
    which, ids, lens = merge_pieces(pieces, ranks, token_bytes, finish_below, table)
    out, ids, k = [None] * len(pieces), ids.tolist(), 0
    for i, n in zip(which.tolist(), lens.tolist()):
        out[i] = ids[k : k + n]
        k += n
    return out


def merge_pieces(pieces, ranks, token_bytes, finish_below=64, table=None):
    """The ids of many pieces as arrays (which, ids, lens): piece which[k]'s ids are the k-th lens[k] of ids.

    Each piece goes through exactly `encode_piece`'s merges, in its order; a
    round makes the next merge of every unfinished piece at once, with NumPy
    arrays over all their parts, so Python's cost is per round, not per merge;
    the ranks of new pairs come from `table` (`PairTable(ranks)`, built here if
    not given: pass it in to build it once per vocabulary). Once fewer than
    `finish_below` pieces are left (the long ones), they finish with
    `encode_piece`'s loop from where they are. Pieces come out in the order
    they finish; arrays, so that a caller can turn all ids into what it needs
    at once (the tokenizer: one str of chr(id)).

    State, over the parts of the unfinished pieces laid end to end:
      ids (N,)   the token id of each part
      pr  (N,)   the rank of (this part + the next part of the same piece), NO_PAIR if not a token or last
      lens (S,)  parts per unfinished piece; which (S,) its index in `pieces`

    >>> ranks = {bytes([b]): b for b in range(256)} | {b"aa": 256, b"ab": 257, b"aaab": 258}
    >>> token_bytes = [bytes([b]) for b in range(256)] + [b"aa", b"ab", b"aaab"]
    >>> [a.tolist() for a in merge_pieces([b"aaab", b"xaab", b"aaa"], ranks, token_bytes, finish_below=1)]
    [[1, 2, 0], [120, 256, 98, 256, 97, 258], [3, 2, 1]]
    """
    if len(pieces) < max(finish_below, 1):  # too few for NumPy to pay off
        return _as_arrays(range(len(pieces)), [encode_piece(p, ranks) for p in pieces])
    lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))  # (S,)
    if lens.max() > LONG_PIECE or lens.min() < 1 or lens.sum() >> 32:  # positions are kept in 32 bits
        raise ValueError(f"merge_pieces takes non-empty pieces of at most {LONG_PIECE} bytes, < 2^32 bytes in all")
    table = PairTable(ranks) if table is None else table
    done_which, done_ids, done_lens = [], [], []  # the finished pieces, a batch per round
    which = np.arange(len(pieces))
    raw = np.frombuffer(b"".join(pieces), dtype=np.uint8).astype(np.int64)  # (N,) the bytes
    ids = table.byte_ids[raw]  # (N,)
    if ids.min() < 0:
        raise KeyError(f"a byte of the pieces is not a token: {bytes(raw[ids < 0][:1].tolist())!r}")
    pr = np.append(table.byte_pairs[raw[:-1] << 8 | raw[1:]], NO_PAIR)  # (N,)
    pr[np.cumsum(lens) - 1] = NO_PAIR  # a piece's last part has no pair
    while len(lens):
        starts = np.cumsum(lens) - lens  # (S,)
        # each piece's lowest pair rank and, of equal ones, the leftmost: one segment minimum of
        # rank * 2^32 + position (one pass instead of a minimum, a comparison and a first-of-each-piece)
        low = np.minimum.reduceat(pr << 32 | np.arange(len(pr)), starts)  # (S,)
        best, at = low >> 32, low & 0xFFFFFFFF  # (S,) (S,)
        done = best == NO_PAIR
        # one compaction per round drops the parts of finished pieces and the right half of each merge
        keep = np.repeat(~done, lens) if done.any() else np.ones(len(ids), dtype=bool)  # (N,)
        gone = np.cumsum(np.where(done, lens, 0))[~done]  # (S',) parts of finished pieces before each other one
        if len(gone) < len(lens):  # no pair left to merge: record these pieces
            done_which.append(which[done]), done_ids.append(ids[~keep]), done_lens.append(lens[done])
            best, at, lens, which = best[~done], at[~done], lens[~done], which[~done]
        if len(lens) < finish_below:
            ids, starts = ids[keep], np.cumsum(lens) - lens
            parts = [[token_bytes[t] for t in ids[a : a + n].tolist()] for a, n in zip(starts.tolist(), lens.tolist())]
            finished = _as_arrays(which, [_merge_parts(p, ranks) for p in parts])
            for a, b in zip((done_which, done_ids, done_lens), finished):
                a.append(b)
            break
        ids[at] = best  # a token's id is its rank: the merged part
        keep[at + 1] = False
        ids, pr = ids[keep], pr[keep]
        at -= gone + np.arange(len(at))  # where the merged parts are now, after the parts dropped before them
        lens -= 1
        ends = np.cumsum(lens)
        pr[at] = NO_PAIR  # if the merged part is now its piece's last
        redo = np.concatenate([at[at != ends - lens] - 1, at[at != ends - 1]])  # the two new pairs
        pr[redo] = table.ranks(ids[redo], ids[redo + 1])
    return np.concatenate(done_which), np.concatenate(done_ids), np.concatenate(done_lens)


def _as_arrays(which, out):
    """`merge_pieces`' arrays (which, ids, lens) of the lists of ids `out` of pieces `which`."""
    lens = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
    return np.array(which, dtype=np.int64), np.fromiter(chain.from_iterable(out), dtype=np.int64), lens


class PairTable:
    """The rank of every pair of tokens whose bytes joined are a token, looked up with NumPy.

    BPE asks "is token_bytes[left] + token_bytes[right] a token, of which rank?"
    for every new pair. As a bytes dict lookup that is ~1 us each (join, hash,
    probe), ~30 ms for the ~29k new pairs of 1 MB of fresh English. Here each
    pair is one int64 key, left << 21 | right (ids stay below 2^21, as
    tokenizer.MAX_TOKEN_ID requires), found by binary search in the sorted keys
    of all such pairs: one `np.searchsorted` per round for all pieces at once.

    The keys are every split of every token into two tokens (GPT-2: 108k keys
    for 50k tokens), not just the merges that built them: the bytes lookup it
    replaces finds a token however its two halves were split, so this does too.
    Building it is one pass over the tokens' split points (~0.1 s for GPT-2):
    `Tokenizer` builds it once per vocabulary and process and shares it.

    >>> t = PairTable({b"a": 0, b"b": 1, b"ab": 2, b"abb": 3})
    >>> t.ranks(np.array([0, 2, 0]), np.array([1, 1, 0])).tolist()  # ab, abb, aa (not a token)
    [2, 3, 2147483647]
    """

    SHIFT = 21

    def __init__(self, ranks):
        if ranks and max(ranks.values()) >> self.SHIFT:
            raise ValueError(f"PairTable takes ids below 2^{self.SHIFT}, got {max(ranks.values())}")
        get, keys, values = ranks.get, [], []
        for token, rank in ranks.items():
            for k in range(1, len(token)):
                left = get(token[:k])
                if left is not None:
                    right = get(token[k:])
                    if right is not None:
                        keys.append(left << self.SHIFT | right)
                        values.append(rank)
        keys, values = np.array(keys, dtype=np.int64), np.array(values, dtype=np.int64)
        order = np.argsort(keys)
        self.keys = np.append(keys[order], 1 << 62)  # (K+1,) sorted, a sentinel above every key
        self.values = np.append(values[order], NO_PAIR)  # (K+1,)
        # the first round's pairs are all pairs of bytes (half of all lookups): a direct 256 x 256 table
        self.byte_ids = np.array([ranks.get(b, -1) for b in _BYTES], dtype=np.int64)  # (256,) -1: not a token
        self.byte_pairs = np.full(1 << 16, NO_PAIR, dtype=np.int64)  # (65536,) [a << 8 | b]: rank of bytes([a, b])
        two = [(token[0] << 8 | token[1], rank) for token, rank in ranks.items() if len(token) == 2]
        if two:
            self.byte_pairs[[k for k, _ in two]] = [r for _, r in two]

    def ranks(self, left, right):
        """(n,) the rank of token_bytes[left[k]] + token_bytes[right[k]], NO_PAIR where that is not a token."""
        key = left << self.SHIFT | right  # (n,)
        # searched in ascending order, the table is read front to back, mostly from the CPU cache:
        # 2x faster with the sort than without (1 MB of English: 2.3 ms against 4.8 for 49k lookups)
        order = np.argsort(key)
        at = np.empty_like(order)
        at[order] = np.searchsorted(self.keys, key[order])  # (n,) in 0..K: the sentinel catches keys above the last
        return np.where(self.keys[at] == key, self.values[at], NO_PAIR)


def _encode_long(piece, ranks):
    """`encode_piece` for long pieces: a linked list of parts and a heap of (rank, start).

    Each part is named by its start offset; end[i] is its end offset (0 once it
    has been merged into its left neighbour). A heap entry is checked on pop by
    recomputing the rank of the pair now at that start, so stale entries drop out.
    """
    get = ranks.get
    n = len(piece)
    end = list(range(1, n + 1))
    prev = list(range(-1, n - 1))
    heap = [(r, i) for i in range(n - 1) if (r := get(piece[i : i + 2])) is not None]
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        j = end[i]
        if j == 0 or j >= n or get(piece[i : end[j]]) != r:
            continue
        k = end[i] = end[j]
        end[j] = 0
        if k < n:
            prev[k] = i
            if (r2 := get(piece[i : end[k]])) is not None:
                heapq.heappush(heap, (r2, i))
        p = prev[i]
        if p >= 0 and (r2 := get(piece[p:k])) is not None:
            heapq.heappush(heap, (r2, p))
    out, i = [], 0
    while i < n:
        out.append(ranks[piece[i : end[i]]])
        i = end[i]
    return out


def recover_merges(ranks):
    """The (left, right) byte pair that produces each multi-byte token, in rank order.

    A rank file lists tokens, not merges; the merge that builds token t is what
    BPE does to t's bytes using only tokens ranked below t, which always ends in
    two parts. (minbpe recovers GPT-4's merges the same way.)

    >>> recover_merges({b"a": 0, b"b": 1, b"ab": 2, b"abb": 3})
    [(b'a', b'b'), (b'ab', b'b')]
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1], rank)
                if r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built from two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges
