"""KV-cache decoding (tinygen.kv_decoding): the one-token fast path equals the full forward in
both dtypes, cached and uncached decoding agree as the window slides past block_size, the cache
rows follow a reorder, and prompt-tuned models count their virtual tokens."""
import numpy as np
import pytest

from tinygen import GPT, KVCache
from tinygen.errors import TinygenError
from tinygen.finetuning.prompt_tuning import init_prompt, prompt_embed
from tinygen.kv_decoding import Decoder, decode_step
from tinygen.sampling import generate
from shared import tiny_model


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_decode_step_equals_full_forward(dtype, tol):
    model = tiny_model(block=12, layers=3, heads=3, embd=12, dtype=dtype, scale=0.3)
    ids = np.random.default_rng(0).integers(0, 11, (3, 12))
    kv = KVCache(model.config, 3)
    model.forward(ids[:, :4], kv=kv)
    for n in range(4, 12):
        fast = decode_step(model.params, model.config, ids[:, n], kv)
        full = model.forward(ids[:, :n + 1])[:, -1]
        assert fast.dtype == np.dtype(dtype) and kv.length == n + 1
        np.testing.assert_allclose(fast, full, rtol=tol, atol=tol)


@pytest.mark.parametrize("keep", [None, 1, 5, 8])
def test_cached_and_uncached_agree_across_block_size(keep):
    """Every prompt length, 20 new tokens: the windows slide several times (block 8)."""
    model = tiny_model(block=8)
    for T in range(1, 9):
        prompt = np.random.default_rng(T).integers(0, 11, (2, T))
        cached = Decoder(model, 2, use_cache=True, window_keep=keep)
        plain = Decoder(model, 2, use_cache=False, window_keep=keep)
        ids = np.concatenate([prompt, np.zeros((2, 20), dtype=np.int64)], axis=1)
        for n in range(T, T + 20):
            a, b = cached.next_logits(ids, n), plain.next_logits(ids, n)
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
            ids[:, n] = np.argmax(a, axis=-1)
        assert np.array_equal(ids, generate(model, prompt, 20, temperature=0, window_keep=keep))
        assert np.array_equal(ids, generate(model, prompt, 20, temperature=0, window_keep=keep, use_cache=False))
        sampled = generate(model, prompt, 20, seed=T, top_k=5, window_keep=keep)
        assert np.array_equal(sampled, generate(model, prompt, 20, seed=T, top_k=5, window_keep=keep, use_cache=False))


def test_window_keep_block_size_is_last_block_recomputation():
    """window_keep = block_size: every step sees exactly the last block_size tokens (nanoGPT)."""
    model = tiny_model(block=6)
    ids = [3, 1, 4]
    for _ in range(15):
        ids.append(int(np.argmax(model.forward(np.array([ids[-6:]]))[0, -1])))
    assert generate(model, [3, 1, 4], 15, temperature=0, window_keep=6).tolist() == ids


def test_reorder_permutes_the_cache_rows():
    model = tiny_model()
    ids = np.random.default_rng(0).integers(0, 11, (3, 6))
    dec = Decoder(model, 3)
    dec.next_logits(ids, 4)
    rows = np.array([2, 2, 0])
    dec.reorder(rows)
    ids = ids[rows]
    np.testing.assert_allclose(dec.next_logits(ids, 5), model.forward(ids[:, :5])[:, -1], atol=1e-12)


def test_prompt_tuned_model_windows_count_the_virtual_tokens():
    """Virtual prompt tokens take positions, so a window holds block_size - n real tokens;
    such models take the general path (GPT.forward with the cache), with the same results."""
    plain = tiny_model(block=8)
    params = {**plain.params, **init_prompt(plain.params["wte.weight"], 3, np.random.default_rng(0))}
    model = GPT(plain.config, params=params, parts=plain.parts._replace(embed=prompt_embed(plain.parts.embed)))
    assert not Decoder(model, 1).fast and Decoder(plain, 1).fast
    prompt = np.array([[1, 2, 3, 4]])
    cached = generate(model, prompt, 12, temperature=0)
    assert np.array_equal(cached, generate(model, prompt, 12, temperature=0, use_cache=False))
    with pytest.raises(TinygenError, match="block_size"):
        generate(model, np.arange(6)[None], 1)
