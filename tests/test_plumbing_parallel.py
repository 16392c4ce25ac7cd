"""Data parallelism: shards summed on worker threads equal one stream; the threads' BLAS setting."""
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygen.config import GPTConfig
from tinygen.errors import TinygenError
from tinygen.finetuning.lora import LoraSpec, init_lora, lora_linear
from tinygen.loss import IGNORE
from tinygen.gpt import GPT
from tinygen import optim
from tinygen.optim import CHUNK, AdamW
from tinygen.plumbing.parallel import OneBlasThread, Workers, default_workers, openblas_threads_api, ranges
from tinygen.train import TrainConfig, accumulate_grads

V, T = 11, 5


@given(st.integers(0, 50), st.integers(1, 8))
def test_ranges_cover_in_order_with_sizes_one_apart(n, parts):
    spans = ranges(n, parts)
    assert len(spans) == parts and spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sizes = [stop - start for start, stop in spans]
    assert max(sizes) - min(sizes) <= 1


def test_workers_map_keeps_order_and_raises_the_first_error():
    with Workers(3) as workers:
        assert workers.map(lambda i: i * i, range(7)) == [i * i for i in range(7)]

        def fail(i):
            if i == 2:
                raise ValueError("shard 2")
            return i

        with pytest.raises(ValueError, match="shard 2"):
            workers.map(fail, range(4))


def test_workers_run_on_several_threads_and_one_runs_inline():
    barrier = threading.Barrier(2, timeout=10)  # deadlocks (and times out) unless 2 run at once
    with Workers(2) as workers:
        names = workers.map(lambda _: (barrier.wait(), threading.current_thread().name)[1], range(2))
    assert all(name.startswith("tinygen-worker") for name in names)
    with Workers(1) as one:
        assert one.map(lambda _: threading.current_thread().name, range(3)) == [threading.current_thread().name] * 3


def test_workers_run_in_the_callers_numpy_error_state():
    """np.errstate is per thread (or per context); the threads see the caller's."""
    overflow = lambda _: np.exp(np.float32(1000.0))  # noqa: E731
    with Workers(2) as workers:
        with np.errstate(over="raise"), pytest.raises(FloatingPointError):
            workers.map(overflow, range(2))
        with np.errstate(over="ignore"):
            assert workers.map(overflow, range(2)) == [np.inf, np.inf]


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_workers_reject_a_bad_count(n):
    with pytest.raises(TinygenError, match=r"Workers n \(threads\) must be a positive integer"):
        Workers(n)


def openblas_or_skip():
    api = openblas_threads_api()
    if api is None:
        pytest.skip("NumPy here does not use OpenBLAS")
    return api


def test_blas_threads_are_limited_inside_and_restored_after():
    api = openblas_or_skip()
    _, get_threads = api
    before = get_threads()
    with OneBlasThread().scope(api):
        assert get_threads() == 1
    assert get_threads() == before
    with Workers(2) as workers:  # Workers.map limits BLAS while its threads run
        assert workers.map(lambda _: get_threads(), range(2)) == [1, 1]
        with pytest.raises(ZeroDivisionError):
            workers.map(lambda i: 1 // i, range(2))  # ... and restores it when one fails
    assert get_threads() == before
    assert default_workers(batch_size=1) == 1 and default_workers(batch_size=64) == min(default_workers(), 64)


def test_overlapping_scopes_restore_the_callers_count_once_the_last_closes():
    """Two of the caller's threads each in a scope, closing in either order: the count is 1 while
    any is open and the caller's after (a save/restore per scope would leave 1 behind)."""
    api = openblas_or_skip()
    set_threads, get_threads = api
    before = get_threads()
    scopes = OneBlasThread()
    for order in ([0, 1], [1, 0]):
        set_threads(2)
        opened, release = [threading.Event() for _ in range(2)], [threading.Event() for _ in range(2)]

        def hold(i):
            with scopes.scope(api):
                opened[i].set()
                release[i].wait(10)

        threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
        for i, t in enumerate(threads):
            t.start()
            opened[i].wait(10)
        assert get_threads() == 1
        release[order[0]].set()
        threads[order[0]].join()
        assert get_threads() == 1  # the other scope is still open
        release[order[1]].set()
        threads[order[1]].join()
        assert get_threads() == 2
    set_threads(before)


@pytest.mark.parametrize("callers_count", [1, 2])
def test_the_public_api_gives_the_caller_its_blas_setting_back(callers_count):
    """Whatever the caller set before, GPT's sharded calls leave it as it was, also when
    several of the caller's threads call the model at once."""
    set_threads, get_threads = openblas_or_skip()
    before = get_threads()
    set_threads(callers_count)
    try:
        model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=8))
        idx = np.arange(4 * T).reshape(4, T) % V
        model.forward(idx, workers=2)
        model.loss(idx, idx, workers=2)
        model.loss_and_grads(idx, idx, workers=2)
        model.generate(idx[:, :2], 2, temperature=0, workers=2)
        assert get_threads() == callers_count
        with Workers(3) as callers:  # the caller's own threads, each calling the model
            callers.map(lambda _: model.loss_and_grads(idx, idx, workers=2), range(6))
        assert get_threads() == callers_count
    finally:
        set_threads(before)


# ------------------------------------------------------------ the training step
def float64_model(seed=0):
    config = GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    return GPT(config, seed=seed)


def reference_step(model, x, y, B, A):
    """Mean over the A micro-batches of GPT.loss_and_grads on each (no sharding)."""
    losses, grads = [], []
    for a in range(A):
        loss, g = model.loss_and_grads(x[a * B:(a + 1) * B], y[a * B:(a + 1) * B], workers=1)
        losses.append(loss)
        grads.append(g)
    return np.mean(losses), {k: sum(g[k] for g in grads) / A for k in grads[0]}


def lora_model(seed=0):
    """float64_model with LoRA on c_attn and c_fc (B made non-zero, so the update matters)."""
    base = float64_model(seed)
    spec = LoraSpec(rank=2, alpha=4.0, targets=("c_attn", "c_fc"))
    extra = init_lora(base.params, spec, np.random.default_rng(seed))
    extra = {k: (v + 0.1 if k.endswith("lora_B") else v) for k, v in extra.items()}
    return GPT(base.config, params={**base.params, **extra}, parts=base.parts._replace(linear=lora_linear(spec, base.parts.linear)))


@given(st.integers(1, 5), st.integers(1, 2), st.integers(1, 4), st.booleans(), st.data())
def test_sharded_step_equals_one_stream(B, A, n_workers, with_lora, data):
    """Any split into shards, including shards whose targets are all ignored, gives the
    same loss and gradient as the unsharded micro-batches (float64, to rounding); with
    LoRA, for its trainable tensors only (the base is frozen)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(0, V, (B * A, T))
    y = rng.integers(0, V, (B * A, T))
    y[rng.random(y.shape) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))] = IGNORE
    model = lora_model() if with_lora else float64_model()
    trainable = (lambda name: ".lora_" in name) if with_lora else None
    want_loss, want = reference_step(model, x, y, B, A)
    config = TrainConfig(batch_size=B, grad_accum=A, block_size=T, n_layer=2, n_head=2, n_embd=8,
                         dtype="float64", workers=n_workers)
    with Workers(n_workers) as workers:
        opt = AdamW(model.params, lr=1e-3, workers=workers, trainable=trainable)
        loss = accumulate_grads(model, opt, (x, y), workers=workers, config=config, step=0)
    assert loss == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    assert set(opt.grads) == {k for k in want if trainable is None or trainable(k)}
    for k in opt.grads:
        np.testing.assert_allclose(opt.grads[k], want[k], rtol=1e-10, atol=1e-13, err_msg=k)


@pytest.mark.parametrize("n_workers, chunk", [(1, CHUNK), (2, CHUNK), (3, CHUNK), (2, 1000)])
def test_adamw_on_threads_and_in_chunks_gives_the_bits_of_one_pass(monkeypatch, n_workers, chunk):
    """The update is elementwise, so any split into threads and chunks gives the bits of one
    whole-buffer pass, weight decay included (its boundary falls inside a chunk here)."""
    shapes = {"big.weight": (3, CHUNK // 2 + 7), "small.weight": (5, 4), "small.bias": (4,)}

    def train(n, chunk_size):
        monkeypatch.setattr(optim, "CHUNK", chunk_size)
        monkeypatch.setattr(optim, "THREADED_CHUNK", chunk_size)
        params = {k: np.random.default_rng(1).standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        with Workers(n) as workers:
            opt = AdamW(params, lr=1e-2, workers=workers)
            for step in range(3):
                opt.step({k: np.random.default_rng([2, step]).standard_normal(s).astype(np.float32)
                          for k, s in shapes.items()})
        return opt.flat.buffer.copy()

    assert np.array_equal(train(n_workers, chunk), train(1, 10**9))


@pytest.mark.parametrize("n_workers", [2, 3])
def test_clipping_a_flat_buffer_on_threads_equals_one_thread(n_workers):
    g = np.random.default_rng(0).standard_normal(1001).astype(np.float32)
    one, split = g.copy(), g.copy()
    norm_one = optim.clip_grad_norm(one, 1.0)
    with Workers(n_workers) as workers:
        assert optim.global_norm(split, workers) == pytest.approx(norm_one, rel=1e-14)
        norm_split = optim.clip_grad_norm(split, 1.0, workers)
    assert norm_split == pytest.approx(norm_one, rel=1e-14)
    np.testing.assert_allclose(split, one, rtol=1e-6)
    assert np.linalg.norm(split.astype(np.float64)) == pytest.approx(1.0, rel=1e-5)


def test_clipping_scales_non_contiguous_arrays_in_place():
    base = lambda: np.arange(1.0, 17.0, dtype=np.float32).reshape(4, 4)  # noqa: E731
    grads = {"w": base().T, "b": base()[:, ::2]}  # views: a transpose and a strided slice
    norm = optim.clip_grad_norm(grads, 1.0)
    assert norm > 1 and optim.global_norm(grads) == pytest.approx(1.0, rel=1e-5)
    strided = np.arange(1.0, 9.0, dtype=np.float32)[::2]
    with Workers(2) as workers:
        optim.clip_grad_norm(strided, 1.0, workers)
    assert np.linalg.norm(strided) == pytest.approx(1.0, rel=1e-5)
