"""One batch over the cores: sharded results equal one stream's to rounding, and repeat bit for bit."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygen.config import GPTConfig
from tinygen.gpt import GPT
from tinygen.loss import IGNORE
from tinygen.plumbing.parallel import Workers
from tinygen.sharding import ShardSum, shard_rows, shard_weights, spawn_rngs

V = 13


def model64(T, seed=0, **changes):
    config = GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    return GPT(dataclasses.replace(config, **changes), seed=seed)


@given(st.integers(1, 12), st.integers(1, 6))
def test_shard_rows_cover_the_batch_in_order_one_shard_per_row_at_most(B, n):
    rows = shard_rows(B, n)
    assert len(rows) == min(B, n)
    assert np.concatenate([np.arange(B)[r] for r in rows]).tolist() == list(range(B))
    assert all(r.stop > r.start for r in rows)


@given(st.lists(st.lists(st.integers(-1, 3), min_size=3, max_size=3), min_size=1, max_size=6), st.integers(1, 6))
def test_shard_weights_are_each_shards_share_of_the_counted_positions(targets, n):
    targets = np.array(targets)
    weights = shard_weights(targets, shard_rows(len(targets), n))
    counted = int((targets != IGNORE).sum())
    assert sum(weights) == pytest.approx(1.0 if counted else 0.0)
    assert all(w >= 0 for w in weights)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 6), workers=st.integers(2, 4), ignored=st.sampled_from([0.0, 0.4, 1.0]),
       scale=st.sampled_from([1.0, 0.25]), seed=st.integers(0, 2**16))
def test_sharded_calls_equal_one_stream_in_float64(B, T, workers, ignored, scale, seed):
    """forward, loss and loss_and_grads on `workers` shards (more workers than rows included:
    then one row per shard) equal workers=1 to rounding, and repeat bit for bit."""
    rng = np.random.default_rng(seed)
    model = model64(T, seed=seed % 7)
    idx = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    targets[rng.random((B, T)) < ignored] = IGNORE
    np.testing.assert_allclose(model.forward(idx, workers=workers), model.forward(idx, workers=1),
                               rtol=1e-12, atol=1e-14)
    assert model.loss(idx, targets, workers=workers) == pytest.approx(model.loss(idx, targets, workers=1),
                                                                      rel=1e-12, abs=1e-14)
    want_loss, want = model.loss_and_grads(idx, targets, scale=scale, workers=1)
    loss, grads = model.loss_and_grads(idx, targets, scale=scale, workers=workers)
    assert loss == pytest.approx(want_loss, rel=1e-12, abs=1e-14)
    assert grads.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-13, err_msg=name)
    again_loss, again = model.loss_and_grads(idx, targets, scale=scale, workers=workers)
    assert again_loss == loss and all(np.array_equal(again[k], grads[k]) for k in grads)


def test_the_default_shards_over_every_core_and_matches_one_stream():
    """No argument: the default worker count (one per core, parallel.default_workers)."""
    model = model64(8)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, V, (6, 8)), rng.integers(0, V, (6, 8))
    with model.workers_for(6) as pool:
        assert pool.n >= 1
    loss, grads = model.loss_and_grads(idx, targets)
    want_loss, want = model.loss_and_grads(idx, targets, workers=1)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-13, err_msg=name)


def test_dropout_masks_come_from_generators_spawned_per_shard_reproducibly():
    model = model64(6, dropout=0.3)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, V, (4, 6)), rng.integers(0, V, (4, 6))
    a = model.loss_and_grads(idx, targets, rng=np.random.default_rng(9), workers=2)
    b = model.loss_and_grads(idx, targets, rng=np.random.default_rng(9), workers=2)
    assert a[0] == b[0] and all(np.array_equal(a[1][k], b[1][k]) for k in a[1])
    one = model.loss_and_grads(idx, targets, rng=np.random.default_rng(9), workers=1)
    assert one[0] != a[0]  # another split, other masks: same distribution, not the same draw


def test_a_model_with_experts_runs_one_stream_by_default():
    """The experts' load-balancing loss and capacity couple a batch's rows: no default sharding."""
    model = model64(6, n_expert=4, expert_top_k=2, moe_every=1)
    with model.workers_for(8) as pool:
        assert pool.n == 1
    rng = np.random.default_rng(2)
    idx = rng.integers(0, V, (4, 6))
    loss, grads = model.loss_and_grads(idx, idx)
    want_loss, want = model.loss_and_grads(idx, idx, workers=1)
    assert loss == want_loss and all(np.array_equal(grads[k], want[k]) for k in want)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 5), workers=st.integers(2, 3), seed=st.integers(0, 2**16))
def test_sharded_generate_equals_one_stream(B, workers, seed):
    """Greedy rows are the same tokens; sampled rows repeat for the same seed and worker count;
    rows that stop early are padded the same way."""
    model = model64(12, seed=seed % 5)
    prompt = np.random.default_rng(seed).integers(0, V, (B, 3))
    stop = int(prompt[0, 0])
    greedy = model.generate(prompt, 6, temperature=0, stop=stop, workers=workers)
    np.testing.assert_array_equal(greedy, model.generate(prompt, 6, temperature=0, stop=stop, workers=1))
    sampled = model.generate(prompt, 6, seed=seed, workers=workers)
    np.testing.assert_array_equal(sampled, model.generate(prompt, 6, seed=seed, workers=workers))


@given(st.permutations(range(6)), st.integers(0, 2**16))
def test_shard_sum_adds_in_shard_order_whatever_order_the_blocks_arrive(order, seed):
    """3 shards x 2 blocks arriving in any order: the sum is g_0 + g_1 + g_2, bit for bit,
    into shard 0's array, and nothing is left waiting."""
    rng = np.random.default_rng(seed)
    grads = [{"a": rng.normal(size=4).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
             for _ in range(3)]
    want = {k: (grads[0][k] + grads[1][k]) + grads[2][k] for k in grads[0]}
    given_arrays = [dict(g) for g in grads]
    summed = ShardSum(3)
    for i in order:  # arrival i: shard i // 2, block "a" or "b"
        name = "ab"[i % 2]
        summed.add(i // 2, {name: grads[i // 2][name]})
    assert set(summed.total) == {"a", "b"} and not summed._waiting
    for k in want:
        np.testing.assert_array_equal(summed.total[k], want[k])
        assert summed.total[k] is given_arrays[0][k]  # shard 0's array, no new buffer


def test_spawned_generators_are_independent_and_reproducible():
    first = [g.random() for g in spawn_rngs(np.random.default_rng(3), 3)]
    assert first == [g.random() for g in spawn_rngs(np.random.default_rng(3), 3)]
    assert len(set(first)) == 3
    assert spawn_rngs(None, 2) == [None, None]
