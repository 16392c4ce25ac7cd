"""A GPT with experts: parameters, gradient checks of the block and the whole model, decoding,
sampling, checkpoints (ours and transformers'), training (metrics, resume, threads), LoRA, the CLI."""
import dataclasses
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygen import GPT, GPTConfig
from tinygen.beam import beam_search
from tinygen.checkpoint import load_model
from tinygen.cli import main
from tinygen.data import RandomBatches, fixed_batches
from tinygen.errors import TinygenError
from tinygen.finetuning.lora import LoraSpec, init_lora, lora_linear
from tinygen.gradient_check import THRESHOLD, check_model
from tinygen.loss import cross_entropy_forward
from tinygen.model import gpt_forward, param_shapes
from tinygen.moe import active_params
from tinygen.moe_check import block_check, model_check, part_check
from tinygen.optim import AdamW
from tinygen.parts import EXPERT_MLP, GPT2, parts_for
from tinygen.plumbing.metrics import read_metrics
from tinygen.plumbing.parallel import Workers
from tinygen.sampling import generate
from tinygen.train import TrainConfig, accumulate_grads, train

SMALL = dict(vocab_size=19, block_size=12, n_layer=4, n_head=2, n_embd=8)


def moe_model(seed=0, **changes):
    """A float64 model with experts in blocks 1 and 3, weights moved off the init so routing varies."""
    config = GPTConfig(**{**SMALL, "dtype": "float64", "n_expert": 4, **changes})
    model = GPT(config, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for p in model.params.values():
        p += rng.normal(0, 0.3, p.shape)
    return model


# ------------------------------------------------------------------ parameters and parts
def test_expert_blocks_have_a_router_and_stacked_experts_and_no_dense_mlp():
    config = GPTConfig(**SMALL, n_expert=3)
    shapes = param_shapes(config)
    for i in (1, 3):
        assert shapes[f"h.{i}.mlp.router.weight"] == (8, 3) and shapes[f"h.{i}.mlp.router.bias"] == (3,)
        assert shapes[f"h.{i}.mlp.experts.c_fc.weight"] == (3, 8, 32)
        assert shapes[f"h.{i}.mlp.experts.c_proj.weight"] == (3, 32, 8)
        assert f"h.{i}.mlp.c_fc.weight" not in shapes
    for i in (0, 2):
        assert shapes[f"h.{i}.mlp.c_fc.weight"] == (8, 32) and f"h.{i}.mlp.router.weight" not in shapes
    assert parts_for(config) == GPT2._replace(mlp=EXPERT_MLP)
    params = GPT(config).params
    dense = 8 * 32 + 32 + 32 * 8 + 8  # one MLP
    routers = 2 * (8 * 3 + 3)
    assert sum(p.size for p in params.values()) == sum(p.size for p in GPT(GPTConfig(**SMALL)).params.values()) \
        + 2 * 2 * dense + routers  # blocks 1 and 3: 3 MLPs instead of 1
    assert active_params(params, 2) == sum(p.size for p in GPT(GPTConfig(**SMALL)).params.values()) + 2 * dense + routers


def test_no_experts_is_todays_dense_model_bit_for_bit(tmp_path):
    """n_expert=0 ignores the other expert fields: same parameters, same parts, same logits, same files."""
    dense = GPT(GPTConfig(**SMALL), seed=3)
    other = GPT(GPTConfig(**SMALL, expert_top_k=1, moe_every=1, capacity_factor=0.5, aux_loss_coef=0.5), seed=3)
    assert other.parts == GPT2 and list(other.params) == list(dense.params)
    assert all(np.array_equal(other.params[k], dense.params[k]) for k in dense.params)
    idx = np.arange(12).reshape(1, 12) % 19
    assert np.array_equal(other.forward(idx), dense.forward(idx))
    dense.save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    hf = json.loads((tmp_path / "a" / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["tinygen"] == {"dtype": "float32", "dropout": 0.0}


# ------------------------------------------------------------------ gradient checks
def test_block_with_experts_matches_finite_differences():
    name, rows = block_check(np.random.default_rng(1))
    assert len(rows) == 15 and max(e for _, e in rows.values()) < THRESHOLD, rows


def test_whole_model_with_experts_matches_finite_differences():
    name, rows = model_check(seed=2, max_coords=8)
    assert set(rows) == set(param_shapes(GPTConfig(11, 8, 2, 2, 8, n_expert=4)))  # every parameter
    assert any(".mlp.router." in n for n in rows) and any(".mlp.c_fc." in n for n in rows)
    assert max(e for _, e in rows.values()) < THRESHOLD, rows


def test_expert_part_in_a_training_forward_matches_finite_differences():
    name, rows = part_check(np.random.default_rng(3))
    assert max(e for _, e in rows.values()) < THRESHOLD, rows


def test_the_checks_do_drop_tokens_and_weigh_the_aux_loss():
    """The block and model checks run with a capacity that drops assignments (else they would not test it)."""
    model = moe_model(capacity_factor=0.5)
    idx = np.random.default_rng(0).integers(0, 19, (2, 12))
    stats = {}
    loss, grads, aux = model.loss_and_grads(idx, idx, rng=np.random.default_rng(0), return_aux=True, stats=stats)
    assert set(aux) == {"h.1.mlp.aux", "h.3.mlp.aux"} and all(v >= 0.01 * 0.999 for v in aux.values())
    assert all(d > 0 for d in stats["expert_dropped"].values())
    assert set(stats["expert_load"]) == {"h.1", "h.3"} and all(np.isclose(sum(v), 1) for v in stats["expert_load"].values())


def test_float64_model_check_without_training_forward_has_no_aux():
    """Outside training (no rng) there is no capacity and no aux loss: GPT.loss is the language-model loss."""
    model = moe_model(capacity_factor=0.5)
    idx = np.random.default_rng(1).integers(0, 19, (2, 12))
    logits, cache = gpt_forward(model.params, idx, model.config, model.parts)
    assert cache.aux == [] and model.loss(idx, idx) == cross_entropy_forward(logits, idx)[0]
    errors = check_model(model, idx, idx, max_coords=4)
    assert max(errors.values()) < THRESHOLD


# ------------------------------------------------------------------ decoding and sampling
@settings(max_examples=10)
@given(st.integers(1, 4), st.integers(1, 2), st.integers(1, 2), st.integers(1, 11), st.integers(0, 100))
def test_kv_cache_decoding_equals_full_recompute(E, k, moe_every, prompt, seed):
    k = min(k, E)
    model = moe_model(seed, n_expert=E, expert_top_k=k, moe_every=moe_every, capacity_factor=0.3)
    ids = np.random.default_rng(seed).integers(0, 19, (2, 12))
    full = model.forward(ids)  # (2, 12, V)
    from tinygen.model import KVCache

    kv = KVCache(model.config, 2)
    steps = [model.forward(ids[:, :prompt], kv=kv)]
    steps += [model.forward(ids[:, t:t + 1], kv=kv) for t in range(prompt, 12)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-10, atol=1e-12)


def test_generate_and_beam_search_with_and_without_the_cache_agree():
    model = moe_model(5)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    a = generate(model, prompt, 14, temperature=0.0)  # past block_size: the window slides
    b = generate(model, prompt, 14, temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(a, b)
    c = generate(model, prompt, 6, temperature=1.0, top_k=5, seed=7)
    assert c.shape == (2, 9) and np.array_equal(c, generate(model, prompt, 6, temperature=1.0, top_k=5, seed=7))
    for prompt_ in (prompt, np.array([[7, 8, 9], [1, 1, 2]])):
        a = beam_search(model, prompt_, 12, 3, num_return_sequences=2)  # past block_size: the window slides
        b = beam_search(model, prompt_, 12, 3, num_return_sequences=2, use_cache=False)
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10)


def test_sample_command_on_a_run_directory_with_experts(tmp_path, capsys):
    from tinygen.tokenizer import ENDOFTEXT, Tokenizer

    tok = Tokenizer.train("the cat sat on the mat. the dog sat on the log. " * 20, vocab_size=270,
                          special_tokens=[ENDOFTEXT])
    model = GPT(GPTConfig(tok.vocab_size, 32, 2, 2, 16, n_expert=3, expert_top_k=2), seed=0)
    model.save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    assert main(["sample", "--model", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert main(["sample", "--model", str(tmp_path), "--prompt", "the", "--max-new-tokens", "4", "--num-beams", "2"]) == 0


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_and_mismatches_are_refused(tmp_path):
    model = moe_model(1, capacity_factor=1.5)
    model.save_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m", dtype="float64")
    assert loaded.config == model.config and loaded.parts == model.parts
    assert all(np.array_equal(loaded.params[k], model.params[k]) for k in model.params)
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["model_type"] == "tinygen_moe" and "n_embd" not in hf
    hf["tinygen"]["moe_every"] = 1  # experts claimed in every block, the weights have them in 1 and 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(TinygenError, match="the weights have experts in h.1, h.3, but config.json describes "
                                           "experts in h.0, h.1, h.2, h.3"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(GPTConfig(**SMALL).to_hf()))
    with pytest.raises(TinygenError, match="config.json describes a dense GPT-2"):
        load_model(tmp_path / "m")
    GPT(GPTConfig(**SMALL)).save_pretrained(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps(GPTConfig(**SMALL, n_expert=2).to_hf()))
    with pytest.raises(TinygenError, match="the weights have no experts, but config.json describes experts in h.1, h.3"):
        load_model(tmp_path / "d")


def test_transformers_refuses_a_checkpoint_with_experts(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    GPT(GPTConfig(**SMALL, n_expert=2), seed=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tinygen_moe"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------ training
def tiny_setup(**changes):
    config = TrainConfig(vocab_size=29, block_size=8, n_layer=2, n_head=2, n_embd=16, batch_size=4, max_steps=8,
                         lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_interval=2, eval_batches=2,
                         checkpoint_interval=2, n_expert=4, expert_top_k=2, **changes)
    ids = np.random.default_rng(5).integers(0, 29, 600).astype(np.uint16)
    return config, RandomBatches(ids, 4, 8, 0), fixed_batches(ids, 2, 4, 8, 0)


TIMING = ("tokens_per_sec", "elapsed_s")


def rows_without_timing(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("workers", [1, 2])
def test_training_records_the_losses_and_the_load_and_resumes_bit_exact(tmp_path, workers):
    config, batches, val = tiny_setup(capacity_factor=1.0, workers=workers, dropout=0.1)
    full = GPT(config.model_config(29), seed=0)
    train(full, batches, config, tmp_path / "full", val_batches=val, progress=False)
    half = GPT(config.model_config(29), seed=0)
    train(half, batches, dataclasses.replace(config, max_steps=4, lr_decay_steps=8), tmp_path / "half",
          val_batches=val, progress=False)
    resumed = GPT(config.model_config(29), seed=9)
    train(resumed, batches, dataclasses.replace(config, lr_decay_steps=8), tmp_path / "half", val_batches=val,
          resume=True, progress=False)
    assert all(np.array_equal(full.params[k], resumed.params[k]) for k in full.params)
    rows = rows_without_timing(tmp_path / "full")
    assert rows == rows_without_timing(tmp_path / "half")
    for row in rows[1:]:
        assert row["train_loss"] == pytest.approx(row["lm_loss"] + row["aux_loss"], abs=2e-5)
        assert row["aux_loss"] >= 0.01 * 0.999  # coef * aux, aux >= 1 (one expert block)
        (load,) = row["expert_load"].values()
        assert len(load) == 4 and sum(load) == pytest.approx(1, abs=1e-4)
        assert 0 <= row["expert_dropped"]["h.1"] < 1
    assert rows[-1]["val_loss"] == pytest.approx(np.mean([full.loss(x, y) for x, y in val]), rel=1e-5)
    svg = (tmp_path / "full" / "expert_load.svg").read_text()
    assert svg.startswith("<svg") and "expert load, h.1" in svg


@pytest.mark.parametrize("coef", [0.0, 0.01])
def test_worker_threads_sum_to_the_one_stream_gradient(coef):
    """Without a capacity, routing is per token, so W shards give the whole batch's language-model
    loss, gradient and load. The aux loss is each shard's own (f and P are shard means, and
    f . P is not linear in them), as GShard's is per group: with it the gradients differ a little."""
    config, batches, _ = tiny_setup(aux_loss_coef=coef)
    model = GPT(dataclasses.replace(config.model_config(29), dtype="float64"), seed=1)
    runs = []
    for w in (1, 2):
        with Workers(w) as workers:
            opt = AdamW(model.params, lr=1e-3, workers=workers)
            measured = {}
            loss = accumulate_grads(model, opt, workers, batches(0), dataclasses.replace(config, workers=w), 0, measured)
            runs.append((loss, opt.grad_buffer.copy(), measured))
    (loss1, g1, m1), (loss2, g2, m2) = runs
    assert m1["lm_loss"] == pytest.approx(m2["lm_loss"], rel=1e-12)
    np.testing.assert_allclose(m1["expert_load"]["h.1"], m2["expert_load"]["h.1"], rtol=1e-12)
    if coef == 0:
        assert loss1 == pytest.approx(loss2, rel=1e-12)
        np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-12)
    else:
        assert m1["aux_loss"] != m2["aux_loss"] and abs(m1["aux_loss"] - m2["aux_loss"]) < 0.1 * coef


def test_lora_on_the_attention_projections_of_a_model_with_experts():
    model = moe_model(2)
    spec = LoraSpec(rank=2, alpha=4.0, targets=("c_attn", "c_proj", "c_fc"))
    rng = np.random.default_rng(0)
    lora = init_lora(model.params, spec, rng)
    assert "h.0.attn.c_attn.lora_A" in lora and "h.0.mlp.c_fc.lora_A" in lora
    assert not any(".experts." in k for k in lora)  # stacked experts are not projections LoRA adapts
    params = {**model.params, **{k: v + rng.normal(0, 0.3, v.shape) for k, v in lora.items()}}
    tuned = GPT(model.config, params=params, parts=model.parts._replace(linear=lora_linear(spec, model.parts.linear)))
    idx = rng.integers(0, 19, (2, 12))
    names = [k for k in lora if ".attn." in k] + ["h.1.mlp.router.weight", "h.1.mlp.experts.c_fc.weight"]
    errors = check_model(tuned, idx, idx, max_coords=6, names=names)
    assert max(errors.values()) < THRESHOLD, errors


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("flags, message", [
    (["--n-expert", "-1"], "n_expert must be an integer >= 0"),
    (["--n-expert", "2", "--expert-top-k", "3"], "expert_top_k (3) must be at most n_expert (2)"),
    (["--moe-every", "0"], "moe_every must be a positive integer"),
    (["--capacity-factor", "0"], "capacity_factor must be a positive number"),
])
def test_bad_expert_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    code = main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
