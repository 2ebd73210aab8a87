"""The training harness around the steps: startup checks that fail before anything compiles, the in-training
linear probe, and extraction over every local device."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from marlin_jax import Marlin
from marlin_jax.architectures import VIT_SMALL, VIT_TINY, MarlinArchitecture
from marlin_jax.pretraining.evaluators import LinearProbeEvaluator
from marlin_jax.pretraining.step import StepSettings
from marlin_jax.pretraining.trainer import train_and_evaluate
from marlin_jax.training import sharding
from tiny_pretraining import IMAGE_SIZE, REPO_ROOT, TINY_CONFIG, run_env, tiny_config

STARTUP_ERRORS = [  # (config fields, the message naming the problem)
    ({"mask_strategy": "faces"}, "config.mask_strategy is 'faces'"),
    ({"decoder_mask_ratio": 1.5}, r"decoder_mask_ratio must lie in \(0, 1\]"),
    ({"mask_percentage_target": 1.0}, r"mask_percentage_target must lie in \(0, 1\)"),
    ({"mesh.shape": (4, 1, 1)}, r"config.mesh.shape \(4, 1, 1\) needs 4 devices, but there are 1"),
    ({"batch_size": 0}, "config.batch_size must be >= 1"),
    ({"total_steps": 10, "learning_rate.warmup_epochs": 20}, "--config.learning_rate.warmup_epochs"),
    ({"evals.val.type": "perplexity"}, "config.evals.val.type is 'perplexity'; the evaluators here are"),
    ({"evals.val.split": "holdout"}, "has no split 'holdout'"),
    ({"evals.probe.csv": "/nowhere/probe.csv"}, "CSV not found: /nowhere/probe.csv"),
    ({"profile_steps": "3"}, "config.profile_steps must be START,COUNT"),
]


@pytest.mark.parametrize("fields,message", STARTUP_ERRORS)
def test_config_mistakes_fail_before_anything_compiles(small_demo_shards, tmp_path, monkeypatch, fields, message):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(jax, "jit", no_compiling)
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(small_demo_shards, **fields), tmp_path)


def test_the_mesh_must_divide_the_widths_it_splits():
    def mesh(**shape):
        one_host = np.array([types.SimpleNamespace(process_index=0)])
        return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, **shape}, devices=one_host)

    sharding.check_model_fits(VIT_SMALL, mesh(tensor=3, fsdp=2))
    with pytest.raises(ValueError, match=r"tensor axis \(4\) does not divide the encoder heads \(6\)"):
        sharding.check_model_fits(VIT_SMALL, mesh(tensor=4))
    with pytest.raises(ValueError, match=r"fsdp axis \(5\) does not divide the encoder width \(384\)"):
        sharding.check_model_fits(VIT_SMALL, mesh(fsdp=5))
    with pytest.raises(ValueError, match="pass a multiple of 4"):
        sharding.check_batch_fits(6, mesh(data=2, fsdp=2))


def test_an_unknown_config_key_is_named_by_the_command_line(small_demo_shards, tmp_path):
    result = subprocess.run([sys.executable, "-m", "marlin_jax.train", f"--config={TINY_CONFIG}",
                             f"--workdir={tmp_path}", f"--config.data.path={small_demo_shards}",
                             f"--config.model.img_size={IMAGE_SIZE}", "--config.learning_rat=1"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "learning_rat" in result.stderr


def test_in_training_probe_learns_a_planted_signal(colour_csv):
    """Videos whose label is a colour cast: the probe on a random encoder's features separates them."""
    arch = dataclasses.replace(VIT_TINY, img_size=64)
    config = tiny_config("")
    mesh = sharding.make_mesh((-1, 1, 1), ("data", "fsdp", "tensor"), jax.devices())
    block = dict(config.evals.probe, csv=str(colour_csv), batch_size=8)
    evaluator = LinearProbeEvaluator("colour", block, config=config, settings=StepSettings.from_config(config, arch),
                                     mesh=mesh)
    state = types.SimpleNamespace(generator=Marlin.random_init(arch, seed=1, full=False).params)
    with sharding.activate(mesh, config.logical_axis_rules):
        scores = evaluator.evaluate(state, step=0).scalars
    assert set(scores) == {"probe/colour/auc", "probe/colour/acc"}
    assert scores["probe/colour/auc"] >= 0.9, scores


@pytest.mark.slow
def test_extraction_splits_a_batch_over_the_local_devices(tmp_path):
    """Four fake local devices give the features one device gives."""
    arch = MarlinArchitecture.from_dict(dict(VIT_TINY.to_dict(), img_size=32))
    model = Marlin.random_init(arch, seed=2, full=False)
    clips = np.random.default_rng(0).integers(0, 256, (6, 16, 32, 32, 3), np.uint8)
    np.save(tmp_path / "clips.npy", clips)
    script = ("import sys, numpy as np\n"
              "from marlin_jax import Marlin\nfrom marlin_jax.architectures import MarlinArchitecture, VIT_TINY\n"
              "arch = MarlinArchitecture.from_dict(dict(VIT_TINY.to_dict(), img_size=32))\n"
              "model = Marlin.random_init(arch, seed=2, full=False)\n"
              "assert model.feature_extractor.device_count == 4\n"
              "np.save(sys.argv[2], model.feature_extractor.features(np.load(sys.argv[1]), keep_seq=False))\n")
    env = run_env(devices=4)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "clips.npy"), str(tmp_path / "four.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "four.npy"), model.feature_extractor.features(clips, False),
                               atol=1e-5)
