"""The split before BPE: text -> chunks by a regex, as tiktoken does it.

BPE never merges across chunk boundaries, so the split pattern decides which
tokens can exist at all: GPT-2's keeps a leading space with the word after it
(" hello"), GPT-4's also caps digit runs at three and keeps newlines apart.
Both are byte-exact copies of tiktoken's patterns; `splitter(pattern)` returns
a `Splitter`, which splits a text exactly as `regex.findall(pattern, text)`
would, faster for the built-in patterns (see its docstring). docs/tokenizer.md
explains the patterns.
"""
import functools
import re

import regex

from ..errors import TinygenError

# Byte-exact copies of tiktoken's r50k (GPT-2) and cl100k (GPT-4) split patterns.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
# What the `re` twin of a built-in pattern reads (see Splitter): ASCII, Latin-1 and Latin Extended-A/B
# (accents, NBSP, "(c)"), General Punctuation (curly quotes, dashes, ellipsis, wide spaces).
COVERED = "\x00-\u024f\u2000-\u206f"
COVERED_CODES = [*range(0x250), *range(0x2000, 0x2070)]


@functools.lru_cache(maxsize=64)
def compile_pattern(pattern):
    """The compiled split regex; a TinygenError names an invalid one."""
    try:
        compiled = regex.compile(pattern)
    except (regex.error, TypeError, RecursionError, OverflowError) as e:  # deep nesting: RecursionError
        raise TinygenError(f"split pattern {pattern!r:.200} is not a valid regex: {type(e).__name__}: "
                           f"{str(e)[:200]}") from None
    if compiled.groups:
        raise TinygenError(f"split pattern {pattern!r:.200} has capturing groups; use (?:...) instead")
    return compiled


@functools.lru_cache(maxsize=8)
def splitter(pattern, block=1 << 16):
    """The `Splitter` of a pattern (shared: one per pattern and block size)."""
    return Splitter(pattern, block)


class Splitter:
    """A pattern's chunks of a text, as a list of lists (one per stretch of the text).

    `Splitter(GPT2_PATTERN)("hi there")` -> [["hi", " there"]]; joined, the
    lists are exactly `regex.findall(pattern, text)`.

    For GPT-2's and GPT-4's patterns there is a faster way than `regex`:
    Python's `re` runs them about twice as fast once \\p{L}, \\p{N} and \\s are
    spelled out as the characters that `regex` puts in them among the *covered*
    characters (`COVERED`: ASCII, Latin-1 and Latin Extended-A/B, General
    Punctuation), which is exact on text of covered characters. Covering more
    than ASCII keeps English with curly quotes, dashes, "(c)" signs and accents
    on `re` (1 MB of license texts: ~1000 such characters, each a detour to
    `regex`, ~9 ms of its ~44). Text is cut at safe points: a space right after a visible
    ASCII character ("!" to "~"), or a newline right after an ASCII letter or
    digit. No chunk of either pattern crosses one or looks across one: only
    whitespace chunks hold a space, and they hold nothing else; a letter, digit
    or punctuation chunk may start with a space or another non-letter, never end
    with one, and the one thing it may end with, GPT-4's newlines after
    punctuation, cannot follow a letter or digit. The few words around each
    character that is not covered go to `regex`, the rest to `re`; the chunks come in
    blocks of about `block` characters so that each block's chunks stay in the
    CPU cache while they are encoded.

    `re` reads possessive quantifiers (`\\p{L}++`, `?+`, `{1,3}+`) only from
    Python 3.11. Without them (`possessive=False`, chosen automatically on 3.10)
    the `re` twin uses the greedy forms, which match the same chunks for these
    two patterns: a possessive quantifier differs only when what follows it in
    its alternative fails and backtracking could help, and here nothing can
    help. Nothing follows `\\p{L}+`, `\\p{N}{1,3}` or `[^\\s\\p{L}\\p{N}]+`
    that could fail (`[\\r\\n]*` matches empty); an optional non-letter given
    back before `\\p{L}+` leaves a non-letter where a letter is needed; and a
    shorter whitespace run than `\\s+` ends before more whitespace, where `$`
    cannot match. The tests compare both forms with `regex` on every Python.

    A Splitter pickles as its arguments, so it is rebuilt (and recompiled for
    the Python that loads it) on the other side of a process pool.
    """

    def __init__(self, pattern, block=1 << 16, possessive=None):
        self.pattern, self.block, self.possessive = pattern, block, possessive
        self._slow = compile_pattern(pattern).findall
        self._fast = _covered_twin(pattern, possessive).findall if pattern in PATTERNS.values() else None

    def __reduce__(self):
        return Splitter, (self.pattern, self.block, self.possessive)

    def __repr__(self):
        return f"Splitter({self.pattern!r})"

    def __call__(self, text):
        if self._fast is None:
            return [self._slow(text)]
        blocks, pos, slow = [[]], 0, self._slow
        if not text.isascii():
            for run in _uncovered_runs(text):
                if run.start() >= pos:  # else it is inside the last stretch given to `regex`
                    start = _safe_point_before(text, run.start(), pos)
                    self._fast_blocks(text, pos, start, blocks)
                    pos = _safe_point_after(text, run.end(), len(text))
                    self._add(blocks, slow(text, start, pos))
        self._fast_blocks(text, pos, len(text), blocks)
        return blocks

    def _fast_blocks(self, text, pos, end, blocks):
        """Add the `re` twin's chunks of the covered stretch text[pos:end], block by block."""
        block, fast = self.block, self._fast
        while pos < end:
            cut = _safe_point_after(text, pos + block, end) if end - pos > 2 * block else end
            self._add(blocks, fast(text[pos:cut]))  # a slice is stored in as few bytes/char as it needs: faster
            pos = cut

    def _add(self, blocks, chunks):
        """Append `chunks` to the last block, or start a new one once that holds ~`block` characters' worth."""
        if len(blocks[-1]) * 4 < self.block:  # ~4 characters per chunk
            blocks[-1] += chunks
        else:
            blocks.append(chunks)


def _covered_set(cls):
    r"""The covered characters `regex` puts in a class, as ranges for `re`: r"\p{N}" -> "0-9²-³¹¼-¾"."""
    inside = [c for c in COVERED_CODES if regex.match(cls, chr(c))]
    runs, start = [], 0
    for k in range(1, len(inside) + 1):
        if k == len(inside) or inside[k] != inside[k - 1] + 1:
            a, b = inside[start], inside[k - 1]
            runs.append(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else ""))
            start = k
    return "".join(runs)


@functools.lru_cache(maxsize=8)
def _covered_twin(pattern, possessive=None):
    """`pattern` for `re`, exact on covered text: \\p{L}, \\p{N}, \\s spelled out as sets of covered characters.

    possessive=None keeps possessive quantifiers where `re` has them (Python
    3.11+, ~10 % faster there) and drops them elsewhere; False always drops them.
    """
    letters, digits, spaces = _covered_set(r"\p{L}"), _covered_set(r"\p{N}"), _covered_set(r"\s")
    twin = (pattern.replace(r"[^\s\p{L}\p{N}]", f"[^{spaces}{letters}{digits}]")
            .replace(r"[^\r\n\p{L}\p{N}]", f"[^\\r\\n{letters}{digits}]").replace(r"\p{L}", f"[{letters}]")
            .replace(r"\p{N}", f"[{digits}]").replace(r"\s", f"[{spaces}]").replace(r"\S", f"[^{spaces}]"))
    if possessive is not False:
        try:
            return re.compile(twin)
        except re.error:  # Python 3.10: "multiple repeat"
            if possessive:
                raise
    return re.compile(greedy(twin))


def greedy(pattern):
    r"""`pattern` with its possessive quantifiers made greedy: r"\p{L}++|x{1,3}+|y?+" -> r"\p{L}+|x{1,3}|y?"."""
    return _POSSESSIVE.sub(r"\1", pattern)


_POSSESSIVE = re.compile(r"(?<!\\)([+*?]|\{\d+(?:,\d*)?\})\+")

_UNCOVERED = regex.compile(f"[^{COVERED}]+")  # `regex` finds these 3x faster than `re`
_NON_ASCII = regex.compile(r"[^\x00-\x7f]+")  # and these 3x faster still (1 MB of English: 0.8 ms)


def _uncovered_runs(text):
    """The runs of characters that are not covered, as matches: looked for only inside the non-ASCII runs."""
    for run in _NON_ASCII.finditer(text):
        yield from _UNCOVERED.finditer(text, run.start(), run.end())
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_VISIBLE = frozenset(map(chr, range(33, 127)))  # "!" to "~": ASCII, not whitespace


def _is_safe(text, j):
    """True if text[j] is a space after a visible ASCII character, or a newline after an ASCII letter or digit."""
    c = text[j]
    return j > 0 and ((c == " " and text[j - 1] in _VISIBLE) or (c == "\n" and text[j - 1] in _ALNUM))


def _safe_point_before(text, i, lo):
    """The last safe point in text[lo+1:i], else lo: "ab cd€" (i=5, lo=0) -> 2."""
    j = max(text.rfind(" ", lo, i), text.rfind("\n", lo, i))
    while j > lo and not _is_safe(text, j):
        j = max(text.rfind(" ", lo, j), text.rfind("\n", lo, j))
    return j if j > lo else lo


def _safe_point_after(text, i, hi):
    """The first safe point in text[i:hi], else hi: "€ab cd" (i=1) -> 3."""
    found = _SAFE.search(text, i, hi)
    return found.start() if found else hi


_SAFE = re.compile(r"(?<=[!-~]) |(?<=[A-Za-z0-9])\n")  # lookbehind sees text before `i`, as _is_safe does
