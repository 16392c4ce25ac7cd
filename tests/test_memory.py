"""reuse_freed_memory changes how malloc recycles memory, never a result."""
import platform

import numpy as np

from tinygen import GPT, GPTConfig, reuse_freed_memory


def test_reuse_freed_memory_applies_on_glibc_and_changes_no_result():
    config = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
    idx = np.arange(16).reshape(2, 8) % 32
    before = GPT(config).loss_and_grads(idx, idx)
    applied = reuse_freed_memory()
    assert applied is (platform.libc_ver()[0] == "glibc")  # mallopt exists only in glibc
    after = GPT(config).loss_and_grads(idx, idx)
    assert before[0] == after[0]
    assert all(np.array_equal(before[1][k], after[1][k]) for k in before[1])
