"""Pretraining end to end on the embedded demo data: outputs, exact resume after SIGKILL, SIGTERM,
the demo learning, and the errors a user meets first. Sharded runs against one device:
test_elastic_resume.py; two processes: test_multihost.py."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_prep.demo_videos import make_demo_dataset
from marlin_jax.interop import saved_models
from marlin_jax.config_files import load_config
from marlin_jax.pretraining.trainer import build_trainer, train_and_evaluate
from marlin_jax.training.run_control import NonFiniteLossError

from tiny_pretraining import read_metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs/pretrain/marlin_vit_small.py") + ":tiny"
LOSSES = ("rec_loss", "adv_loss", "d_loss")


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> pathlib.Path:
    output = tmp_path_factory.mktemp("demo")
    make_demo_dataset(output, num_videos=6, workers=1)
    return output / "shards"


def tiny_config(data_path, **overrides):
    config = load_config(TINY_CONFIG)
    config.data.path = str(data_path)
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def train_command(workdir, data_path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "marlin_jax.train", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
            f"--config.data.path={data_path}", *overrides]


def run_train(workdir, data_path, *overrides: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(workdir, data_path, *overrides), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def tiny_run(demo_shards, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config(demo_shards, total_steps=4, log_every=2, checkpoint_every=2, profile_steps="2,1",
                         **{"evals.val.every": 2})
    return workdir, train_and_evaluate(config, workdir)


def test_tiny_pretraining_writes_everything(tiny_run):
    tmp_path, final = tiny_run
    assert np.isfinite(final["rec_loss"])
    records = read_metrics(tmp_path)
    assert sorted(records) == [2, 4]
    for key in ("step", "rec_loss", "adv_loss", "d_loss", "lr", "clips_per_s", "g_grad_norm", "data_wait_s",
                "val/rec_loss", "val/d_loss", "val/g_loss", "val/loss", "val/rec_loss_baseline"):
        assert key in records[4], key
    assert records[4]["val/loss"] == pytest.approx(records[4]["val/d_loss"] + records[4]["val/g_loss"])
    assert saved_models.read_saved_model(tmp_path).step == 4
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "reconstructions" / "step_00000004.png").is_file()
    best_step = min((2, 4), key=lambda step: records[step]["val/loss"])
    assert saved_models.read_saved_model(tmp_path / "best").step == best_step
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["config"]["batch_size"] == 4 and saved_config["resolved"]["total_steps"] == 4
    # profile_steps="2,1": a trace of step 2 that TensorBoard's profile plugin opens.
    assert list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_export_best_writes_the_best_checkpoint(tiny_run, marlin_pytorch):
    workdir, _ = tiny_run
    best = saved_models.read_saved_model(workdir / "best")
    result = subprocess.run([sys.executable, "-m", "marlin_jax.export", f"--workdir={workdir}", "--best",
                             f"--output={workdir / 'exported'}"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    stem = workdir / "exported" / f"marlin_vit_small_tiny_step{best.step}_best"
    import torch
    state = torch.load(stem.with_suffix(".pt"), weights_only=True)
    np.testing.assert_array_equal(state["encoder.norm.weight"].numpy(), best.generator["encoder"]["norm"]["scale"])


def test_kill_and_resume_reproduces_the_uninterrupted_run(demo_shards, tmp_path):
    overrides = ("--config.total_steps=7", "--config.log_every=1", "--config.checkpoint_every=2",
                 "--config.evals.val.every=2")
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    run_train(reference_dir, demo_shards, *overrides)

    process = subprocess.Popen(train_command(resumed_dir, demo_shards, *overrides), cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (resumed_dir / "metrics.jsonl").is_file() and max(read_metrics(resumed_dir), default=0) >= 5:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(read_metrics(resumed_dir))
    assert killed_at < 7

    run_train(resumed_dir, demo_shards, *overrides)
    reference, resumed = read_metrics(reference_dir), read_metrics(resumed_dir)
    assert sorted(resumed) == sorted(reference) == list(range(1, 8))
    for step in reference:
        for key in LOSSES:
            assert resumed[step][key] == reference[step][key], (step, key)
    val_steps = [step for step in reference if "val/loss" in reference[step]]
    assert val_steps == [2, 4, 6, 7]
    for step in val_steps:
        for key in ("val/rec_loss", "val/d_loss", "val/loss", "val/rec_loss_baseline"):
            assert resumed[step][key] == reference[step][key], (step, key)


def test_sigterm_saves_and_stops(demo_shards, tmp_path):
    process = subprocess.Popen(
        train_command(tmp_path, demo_shards, "--config.total_steps=1000", "--config.log_every=1",
                      "--config.checkpoint_every=1000"),
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").is_file() and read_metrics(tmp_path)):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    saved_step = saved_models.read_saved_model(tmp_path).step
    assert 1 <= saved_step < 1000
    assert saved_step == max(read_metrics(tmp_path))


def test_init_from_official_weights(demo_shards, torch, tmp_path):
    import jax
    from marlin_jax import Marlin
    from marlin_jax.architectures import MarlinArchitecture
    config = tiny_config(demo_shards)
    arch = MarlinArchitecture.from_dict(config.model.to_dict())
    official = Marlin.random_init(arch, seed=11, full=False)
    files = official.to_pytorch(tmp_path / "official_encoder")
    config.init_from = str(files["pt"])
    trainer = build_trainer(config, tmp_path / "work")
    try:
        loaded = jax.device_get(trainer.state.generator["encoder"])
        expected = official.params["encoder"]
        for ours, theirs in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_array_equal(ours, theirs)
        assert "decoder" in trainer.state.generator  # an encoder-only file keeps the fresh decoder
    finally:
        trainer.loader.close()


def test_missing_data_is_reported_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="has no manifest.json"):
        train_and_evaluate(tiny_config(tmp_path / "nowhere"), tmp_path / "work")
    with pytest.raises(ValueError, match="config.data.path is empty"):
        train_and_evaluate(tiny_config(""), tmp_path / "work")


def test_workdir_of_another_model_size_refuses_to_resume(demo_shards, tmp_path):
    train_and_evaluate(tiny_config(demo_shards, total_steps=1, checkpoint_every=1), tmp_path)
    deeper = tiny_config(demo_shards, total_steps=2)
    deeper.model.encoder_depth = 3
    with pytest.raises(ValueError, match="holds a pretrain checkpoint with architecture="):
        train_and_evaluate(deeper, tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_shards, tmp_path):
    train_and_evaluate(tiny_config(demo_shards, total_steps=1, checkpoint_every=1), tmp_path)
    diverging = tiny_config(demo_shards, total_steps=4, log_every=1, checkpoint_every=1)
    diverging.learning_rate.base = 1e32  # resumes at step 1, then overflows
    with pytest.raises(NonFiniteLossError, match="non-finite values at step 2"):
        train_and_evaluate(diverging, tmp_path)
    saved = saved_models.read_saved_model(tmp_path)
    import jax
    assert saved.step == 1
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(saved.generator))


def test_the_demo_learns_the_face_layout(demo_shards, tmp_path):
    """README command 1, shortened to its first 200 steps (before the adversarial term starts): the held-out
    reconstruction error must already beat predicting each clip's mean colour, which a model that has learned
    nothing about faces does not."""
    demo_config = str(REPO_ROOT / "configs/pretrain/marlin_vit_small.py") + ":demo"
    result = subprocess.run([sys.executable, "-m", "marlin_jax.train", f"--config={demo_config}",
                             f"--workdir={tmp_path}", f"--config.data.path={demo_shards}",
                             "--config.total_steps=200"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    final = read_metrics(tmp_path)[200]
    assert final["val/rec_loss"] < final["val/rec_loss_baseline"], final
    assert (tmp_path / "reconstructions" / "step_00000200.png").is_file()
