"""The training loop and `tinygen pretrain`: config checks, resume bit for bit, SIGKILL, Ctrl-C, NaN, CLI errors."""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tinygen import GPT, TinygenError
from tinygen.checkpoint import checkpoint_step, load_model, load_train_state
from tinygen.cli import main
from tinygen.data import RandomBatches, fixed_batches
from tinygen.plumbing.metrics import read_metrics
from tinygen.pretrain import PRESETS
from tinygen.train import TrainConfig, TrainingDiverged, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = "import sys\nfrom tinygen.cli import main\nsys.exit(main(sys.argv[1:]))"
SMALL = ["--preset", "tiny", "--vocab-size", "300", "--block-size", "16", "--n-layer", "1", "--n-embd", "32",
         "--batch-size", "4", "--eval-batches", "1", "--samples", "0"]
TIMING = ("tokens_per_sec", "elapsed_s")
WORDS = ("the model reads a token and predicts the next one while the loss falls slowly "
         "def return class import self value print list from data").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Twelve small deterministic text files, ~25 KB in all."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(12):
        lines = [" ".join(rng.choice(WORDS, rng.integers(4, 12))) + "." for _ in range(40)]
        (folder / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return str(folder)


@pytest.fixture
def cli():
    """Run `tinygen ARGS` in-process."""
    return lambda *argv: main([str(a) for a in argv])


def spawn(*argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", RUNNER, *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def rows_without_timing(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def same_weights(a, b):
    pa, pb = load_model(a).params, load_model(b).params
    return set(pa) == set(pb) and all(np.array_equal(pa[k], pb[k]) for k in pa)


# ------------------------------------------------------------------ TrainConfig
@pytest.mark.parametrize("field, value, message", [
    ("n_layer", 0, "TrainConfig.n_layer must be a positive integer, got 0"),
    ("max_steps", -1, "TrainConfig.max_steps must be an integer >= 0, got -1"),
    ("lr", float("nan"), r"TrainConfig.lr must be a number in \[0, inf\], got nan"),
    ("min_lr", 1.0, r"TrainConfig.min_lr \(1.0\) must not exceed lr"),
    ("warmup_steps", -1, "TrainConfig.warmup_steps"),
    ("lr_decay_steps", 2.5, "TrainConfig.lr_decay_steps must be an integer >= 0"),
    ("beta2", 1.0, r"TrainConfig.beta2 must be a number in \[0, 1\), got 1.0"),
    ("dropout", 1.0, r"TrainConfig.dropout must be a number in \[0, 1\)"),
    ("n_embd", 30, r"TrainConfig.n_embd \(30\) must be divisible by n_head"),
    ("dtype", "float16", "TrainConfig.dtype must be one of 'float32', 'float64'"),
    ("batch_size", True, "TrainConfig.batch_size"),
    ("workers", np.int64(-1), "TrainConfig.workers"),
])
def test_train_config_names_the_bad_field(field, value, message):
    with pytest.raises(TinygenError, match=message):
        TrainConfig(**{field: value})


def test_train_config_takes_numpy_integers_and_dataclasses_replace():
    config = TrainConfig(max_steps=np.int64(10), batch_size=np.int32(4))
    assert dataclasses.replace(config, max_steps=20).max_steps == 20 and config.max_steps == 10
    with pytest.raises(TinygenError, match="TrainConfig.max_steps"):
        dataclasses.replace(config, max_steps=-1)  # replace validates too


def test_presets_are_valid_and_every_field_explains_itself():
    from tinygen.data import DataConfig

    for name, overrides in PRESETS.items():
        train_keys = TrainConfig.__dataclass_fields__.keys()
        TrainConfig(**{k: v for k, v in overrides.items() if k in train_keys})
        DataConfig(**{k: v for k, v in overrides.items() if k not in train_keys})
    for cls in (TrainConfig, DataConfig):
        assert all(f.metadata["help"] and f.metadata["check"] for f in dataclasses.fields(cls)), cls


def test_help_explains_every_flag(cli, capsys):
    with pytest.raises(SystemExit):
        cli("pretrain", "--help")
    text = capsys.readouterr().out
    for flag in ["--preset", "--data", "--out", "--resume", "--max-steps", "--seed", "--vocab-size", "--n-layer",
                 "--batch-size", "--lr", "--warmup-steps", "--encoding-errors", "--corpus-bytes", "--tokenizer",
                 "--exclude-modules"]:
        assert flag in text
    assert "micro-batches summed into each optimizer step (default: 1)" in " ".join(text.split())  # the field's help


# ------------------------------------------------------------------ the pipeline's settings
def test_run_settings_round_trip_and_bad_files_are_named(tmp_path):
    from tinygen.pretrain import RunSettings, new_settings, read_settings, resume_settings, start_run

    settings = new_settings(tmp_path / "run", preset="tiny", overrides=dict(max_steps=np.int64(7), pattern="gpt2"),
                            sources=[tmp_path])
    assert settings.train.max_steps == 7 and settings.train.lr_decay_steps == 7 and settings.data.pattern == "gpt2"
    assert settings.sources == (str(tmp_path),) and settings.preset == "tiny"
    start_run(settings)
    back = read_settings(tmp_path / "run")
    assert back == settings and isinstance(back, RunSettings)
    assert resume_settings(tmp_path / "run", max_steps=9, workers=1).train == dataclasses.replace(
        settings.train, max_steps=9, workers=1)
    with pytest.raises(TinygenError, match=r"only max_steps and workers can change \(got lr\)"):
        resume_settings(tmp_path / "run", lr=0.1)
    with pytest.raises(TinygenError, match="'colour' is not a TrainConfig or DataConfig field"):
        new_settings(tmp_path / "x", overrides={"colour": "red"})
    with pytest.raises(TinygenError, match="unknown preset 'huge'"):
        new_settings(tmp_path / "x", preset="huge")
    path = tmp_path / "run" / "train_config.json"
    good = json.loads(path.read_text())
    for change, message in [({"version": 99}, "settings version 99"), ({"format": "other"}, "not a tinygen run"),
                            ({"train": {**good["train"], "n_layer": 0}}, "malformed settings: TrainConfig.n_layer"),
                            ({"data": {**good["data"], "colour": 1}}, "malformed settings"),
                            ({"encoding_errors": "ignore"}, "RunSettings.encoding_errors")]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(TinygenError, match=message):
            read_settings(tmp_path / "run")


# ------------------------------------------------------------------ the loop
def tiny_setup(seed=0, dropout=0.0):
    config = TrainConfig(vocab_size=29, block_size=8, n_layer=1, n_head=2, n_embd=16, batch_size=4, max_steps=8,
                         lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_interval=2, eval_batches=2,
                         checkpoint_interval=2, seed=seed, dropout=dropout)
    ids = np.random.default_rng(5).integers(0, 29, 600).astype(np.uint16)
    return config, RandomBatches(ids, 4, 8, seed), fixed_batches(ids, 2, 4, 8, seed)


def test_overfits_one_batch(tmp_path):
    config, batches, _ = tiny_setup()
    config = dataclasses.replace(config, max_steps=150, lr=2e-2, min_lr=2e-2, warmup_steps=0, weight_decay=0.0,
                            checkpoint_interval=1000, eval_interval=1000)
    model = GPT(config.model_config(29), seed=0)
    x, y = batches(0)
    result = train(model, lambda step: (x, y), config, tmp_path, progress=False)
    assert result.train_loss < 0.1 and model.loss(x, y) < 0.1


@pytest.mark.parametrize("dropout, workers", [(0.0, 1), (0.1, 1), (0.1, 2), (0.0, 3)])
def test_resume_in_process_is_bit_exact(tmp_path, dropout, workers):
    config, batches, val = tiny_setup(dropout=dropout)
    config = dataclasses.replace(config, workers=workers)
    full = GPT(config.model_config(29), seed=0)
    train(full, batches, config, tmp_path / "full", val_batches=val, progress=False)
    half = GPT(config.model_config(29), seed=0)
    first = train(half, batches, dataclasses.replace(config, max_steps=4, lr_decay_steps=8), tmp_path / "half",
                  val_batches=val, progress=False)
    assert first.step == 4
    resumed = GPT(config.model_config(29), seed=123)  # other weights: the checkpoint must overwrite them all
    train(resumed, batches, dataclasses.replace(config, lr_decay_steps=8), tmp_path / "half", val_batches=val,
          resume=True, progress=False)
    assert all(np.array_equal(full.params[k], resumed.params[k]) for k in full.params)
    assert rows_without_timing(tmp_path / "full") == rows_without_timing(tmp_path / "half")
    assert [r["step"] for r in read_metrics(tmp_path / "half" / "metrics.jsonl")] == list(range(9))
    assert (tmp_path / "half" / "loss.svg").read_text().startswith("<svg")


def test_resume_on_another_worker_count_says_so(tmp_path):
    config, batches, _ = tiny_setup()
    model = GPT(config.model_config(29), seed=0)
    train(model, batches, dataclasses.replace(config, max_steps=4, lr_decay_steps=8, workers=2), tmp_path, progress=False)
    messages = []
    train(model, batches, dataclasses.replace(config, lr_decay_steps=8, workers=1), tmp_path, resume=True, progress=False,
          log=messages.append)
    assert any("resuming on 1 worker threads, the checkpoint was trained on 2" in m for m in messages)
    assert load_train_state(tmp_path / "train_state.safetensors").info["workers"] == 1


def test_gradient_accumulation_matches_a_big_batch(tmp_path):
    config, batches, _ = tiny_setup()
    big = GPT(config.model_config(29), seed=0)
    train(big, batches, dataclasses.replace(config, batch_size=4), tmp_path / "a", progress=False)
    small = GPT(config.model_config(29), seed=0)
    train(small, batches, dataclasses.replace(config, batch_size=2, grad_accum=2), tmp_path / "b", progress=False)
    for k in big.params:
        np.testing.assert_allclose(big.params[k], small.params[k], rtol=2e-4, atol=2e-5)


def test_frozen_parameters_stay_and_are_not_saved(tmp_path):
    config, batches, _ = tiny_setup()
    model = GPT(config.model_config(29), seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    trainable = lambda name: name.startswith("h.0.mlp.")  # noqa: E731
    train(model, batches, config, tmp_path, trainable=trainable, progress=False)
    for k, v in model.params.items():
        assert np.array_equal(v, before[k]) != trainable(k), k
    state = load_train_state(tmp_path / "train_state.safetensors")
    assert set(state.params) == {k for k in model.params if trainable(k)}


class NanAt:
    """A model whose loss becomes NaN at one step: the loop must stop before updating."""

    def __init__(self, model, bad_call):
        self.model, self.params, self.calls, self.bad_call = model, model.params, 0, bad_call
        self.lock = threading.Lock()  # shards call from worker threads

    def loss_and_grads(self, x, y, rng=None, scale=1.0, **options):
        with self.lock:
            self.calls += 1
            bad = self.calls == self.bad_call
        loss, *rest = self.model.loss_and_grads(x, y, rng, scale, **options)
        return (float("nan") if bad else loss), *rest

    def loss(self, x, y):
        return self.model.loss(x, y)

    def save_pretrained(self, directory):
        self.model.save_pretrained(directory)


@pytest.mark.parametrize("workers", [1, 2])
def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, workers):
    config, batches, val = tiny_setup()
    config = dataclasses.replace(config, workers=workers)  # `workers` calls (shards) per step: one shard of step 5 is NaN
    model = NanAt(GPT(config.model_config(29), seed=0), bad_call=4 * workers + 1)
    with pytest.raises(TrainingDiverged, match=r"step 5: the loss is nan.*last checkpoint \(step 4\) is intact"):
        train(model, batches, config, tmp_path, val_batches=val, progress=False)
    assert checkpoint_step(tmp_path) == 4
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == 4
    assert np.isfinite(load_model(tmp_path).params["wte.weight"]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_infinite_gradient_stops(tmp_path):
    config, batches, _ = tiny_setup()
    model = GPT(config.model_config(29), seed=0)
    model.params["ln_f.weight"][0] = np.inf
    with pytest.raises(TrainingDiverged, match=r"step 1: the loss is nan.*none saved yet"):
        train(model, batches, config, tmp_path, progress=False)


# ------------------------------------------------------------------ the command
def test_pretrain_writes_a_complete_run_directory(cli, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("pretrain", *SMALL, "--data", corpus, "--out", out, "--max-steps", 6, "--eval-interval", 3,
               "--samples", 2, "--sample-tokens", 5) == 0
    for name in ["config.json", "model.safetensors", "tokenizer.json", "train_state.safetensors", "metrics.jsonl",
                 "loss.svg", "train_config.json", "data/train.npy", "data/val.npy", "data/tokens.json"]:
        assert (out / name).is_file(), name
    text = capsys.readouterr().out
    assert "bits/byte" in text and "greedy samples" in text
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(7))
    assert set(rows[1]) == {"step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s"}
    assert rows[3]["val_loss"] is not None and rows[2]["val_loss"] is None and rows[1]["tokens"] == 64
    assert np.load(out / "data" / "train.npy", mmap_mode="r", allow_pickle=False).dtype == np.uint16
    assert json.loads((out / "train_config.json").read_text())["train"]["max_steps"] == 6
    # a checkpoint holds the run: starting again needs --resume or --overwrite
    assert cli("pretrain", *SMALL, "--data", corpus, "--out", out, "--max-steps", 6) == 2
    assert "--resume" in capsys.readouterr().err
    # --overwrite starts over and reuses the tokenizer and token cache, which match
    assert cli("pretrain", *SMALL, "--data", corpus, "--out", out, "--max-steps", 2, "--overwrite") == 0
    assert "reusing" in capsys.readouterr().err and checkpoint_step(out) == 2


def test_resume_reproduces_the_uninterrupted_run(cli, corpus, tmp_path):
    common = [*SMALL, "--data", corpus, "--eval-interval", 3, "--checkpoint-interval", 2, "--dropout", 0.1]
    assert cli("pretrain", *common, "--out", tmp_path / "a", "--max-steps", 12) == 0
    assert cli("pretrain", *common, "--out", tmp_path / "b", "--max-steps", 6, "--lr-decay-steps", 12) == 0
    assert cli("pretrain", "--resume", tmp_path / "b", "--max-steps", 12) == 0
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert rows_without_timing(tmp_path / "a") == rows_without_timing(tmp_path / "b")
    a = load_train_state(tmp_path / "a" / "train_state.safetensors")
    b = load_train_state(tmp_path / "b" / "train_state.safetensors")
    assert a.step == b.step == 12 and all(np.array_equal(a.optimizer[k], b.optimizer[k]) for k in a.optimizer)


def test_sigkill_at_a_random_moment_then_resume(cli, corpus, tmp_path):
    common = [*SMALL, "--data", corpus, "--eval-interval", 8, "--checkpoint-interval", 2, "--max-steps", 32]
    delay = random.Random().uniform(0.0, 2.5)
    proc = spawn("pretrain", *common, "--out", tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 60
    while not metrics.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    was_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert cli("pretrain", "--resume", tmp_path / "killed") == 0, f"delay {delay:.3f}s"
    assert cli("pretrain", *common, "--out", tmp_path / "straight") == 0
    assert same_weights(tmp_path / "killed", tmp_path / "straight"), f"delay {delay:.3f}s, killed: {was_running}"
    assert rows_without_timing(tmp_path / "killed") == rows_without_timing(tmp_path / "straight")


def test_ctrl_c_saves_a_checkpoint_and_exits(corpus, tmp_path):
    out = tmp_path / "run"
    proc = spawn("pretrain", *SMALL, "--data", corpus, "--out", out, "--max-steps", 100_000,
                 "--checkpoint-interval", 100_000, "--eval-interval", 100_000)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    step = checkpoint_step(out)
    assert step is not None and step >= 2
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == step
    assert f"--resume {out}" in err


@pytest.mark.parametrize("argv, message", [
    (["--resume", "{tmp}/nowhere"], "no such directory"),
    (["--resume", "{tmp}"], "not a tinygen run directory"),
    (["--data", "{tmp}/missing.txt", "--out", "{tmp}/r"], "missing.txt: no such file or folder"),
    (["--data", "{tmp}/bad.txt", "--out", "{tmp}/r"], r"bad.txt: not UTF-8 text: byte 0xfe at byte offset 3"),
    (["--n-embd", "30", "--out", "{tmp}/r"], "TrainConfig.n_embd"),
    (["--val-fraction", "2", "--out", "{tmp}/r"], "DataConfig.val_fraction"),
    (["--tokenizer", "{tmp}/bad.txt", "--out", "{tmp}/r"], "bad.txt"),
])
def test_cli_errors_are_one_line_and_exit_2(cli, capsys, tmp_path, argv, message):
    (tmp_path / "bad.txt").write_bytes(b"abc\xfe")
    assert cli("pretrain", *[a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tinygen pretrain: error: ")
    assert __import__("re").search(message, err), err


def test_resume_refuses_changed_settings(cli, capsys, corpus, tmp_path):
    assert cli("pretrain", *SMALL, "--data", corpus, "--out", tmp_path, "--max-steps", 1) == 0
    assert cli("pretrain", "--resume", tmp_path, "--lr", "0.1", "--max-steps", 3) == 2
    assert "only --max-steps and --workers can change (got --lr)" in capsys.readouterr().err
    assert cli("pretrain", "--resume", tmp_path, "--max-steps", 3) == 0
    assert checkpoint_step(tmp_path) == 3
    assert cli("pretrain", "--resume", tmp_path, "--max-steps", 4, "--workers", 1) == 0  # another machine
    assert checkpoint_step(tmp_path) == 4
    assert json.loads((tmp_path / "train_config.json").read_text())["train"]["workers"] == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_from_the_command_exits_1(cli, capsys, corpus, tmp_path):
    assert cli("pretrain", *SMALL, "--data", corpus, "--out", tmp_path, "--max-steps", 20, "--lr", "1e30",
               "--min-lr", "1e30", "--grad-clip", "0", "--checkpoint-interval", 1) == 1
    err = capsys.readouterr().err
    assert "step" in err and "is intact" in err
    assert load_model(tmp_path) is not None  # the last good checkpoint loads
