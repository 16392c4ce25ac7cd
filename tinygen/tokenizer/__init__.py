"""The tokenizer, built up as minbpe builds it: the regex split (split.py), BPE training
and encoding (bpe.py), GPT-2 / tiktoken vocabulary files (files.py), and the `Tokenizer` (tokenizer.py)."""
from .split import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from .tokenizer import CL100K_SPECIAL_TOKENS, ENDOFTEXT, Tokenizer

__all__ = ["Tokenizer", "ENDOFTEXT", "CL100K_SPECIAL_TOKENS", "GPT2_PATTERN", "GPT4_PATTERN", "PATTERNS"]
