"""tinygen: a NumPy-only GPT-2, written to be read.

    from tinygen import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64))
    loss, grads = model.loss_and_grads(idx, targets)
"""
from .config import GPTConfig
from .errors import TinygenError
from .plumbing.memory import reuse_freed_memory
from .gpt import GPT
from .model import KVCache
from .gradient_check import check_layer, check_model, gradcheck
from .plumbing.parallel import Workers
from .tokenizer.tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "Tokenizer", "TinygenError", "gradcheck", "check_layer", "check_model", "reuse_freed_memory",
           "Workers"]
__version__ = "0.1.0"
