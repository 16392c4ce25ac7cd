"""The tokenizer, built up as minbpe builds it: the regex split (split.py), BPE training
and encoding (bpe.py), vocabulary files (files.py), the `Tokenizer` (tokenizer.py), and
tiktoken's names and batch forms over it (compat.py)."""
from .compat import TokenNotFound
from .split import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from .tokenizer import CL100K_SPECIAL_TOKENS, ENDOFTEXT, Tokenizer

__all__ = ["Tokenizer", "TokenNotFound", "ENDOFTEXT", "CL100K_SPECIAL_TOKENS", "GPT2_PATTERN", "GPT4_PATTERN",
           "PATTERNS"]
