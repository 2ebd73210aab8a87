"""The training harness around the steps: startup checks that fail before anything compiles, the in-training
linear probe, and extraction over every local device."""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import subprocess
import sys
import types

import av
import jax
import numpy as np
import pytest

from data_prep.demo_videos import make_demo_dataset
from marlin_jax import Marlin
from marlin_jax.architectures import VIT_SMALL, VIT_TINY, MarlinArchitecture
from marlin_jax.config_files import load_config
from marlin_jax.pretraining.evaluators import LinearProbeEvaluator
from marlin_jax.pretraining.step import StepSettings
from marlin_jax.pretraining.trainer import train_and_evaluate
from marlin_jax.training import sharding

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs/pretrain/marlin_vit_small.py") + ":tiny"


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> pathlib.Path:
    output = tmp_path_factory.mktemp("demo")
    make_demo_dataset(output, num_videos=4, workers=1)
    return output / "shards"


def tiny(data_path, **fields):
    config = load_config(TINY_CONFIG)
    config.data.path = str(data_path)
    for key, value in fields.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


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
def test_config_mistakes_fail_before_anything_compiles(demo_shards, tmp_path, monkeypatch, fields, message):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(jax, "jit", no_compiling)
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny(demo_shards, **fields), tmp_path)


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


def test_an_unknown_config_key_is_named_by_the_command_line(demo_shards, tmp_path):
    result = subprocess.run([sys.executable, "-m", "marlin_jax.train", f"--config={TINY_CONFIG}",
                             f"--workdir={tmp_path}", f"--config.data.path={demo_shards}", "--config.learning_rat=1"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "learning_rat" in result.stderr


def write_video(path: pathlib.Path, frames: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_in_training_probe_learns_a_planted_signal(tmp_path):
    """Videos whose label is a colour cast: the probe on a random encoder's features separates them."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(48):
        label, split = index % 2, ("train",) * 4 + ("val", "test")
        frames = rng.uniform(30, 200, size=(20, 64, 64, 3))
        frames[..., 2 if label else 0] += 50
        name = f"videos/{index:02d}.mp4"
        write_video(tmp_path / name, np.clip(frames, 0, 255).astype(np.uint8))
        rows.append([name, split[(index // 2) % 6], label])
    with (tmp_path / "probe.csv").open("w", newline="") as file:
        csv.writer(file).writerows([["path", "split", "label"], *rows])
    arch = dataclasses.replace(VIT_TINY, img_size=64)
    config = load_config(str(REPO_ROOT / "configs/pretrain/marlin_vit_small.py") + ":tiny")
    mesh = sharding.make_mesh((-1, 1, 1), ("data", "fsdp", "tensor"), jax.devices())
    block = dict(config.evals.probe, csv=str(tmp_path / "probe.csv"), batch_size=8)
    evaluator = LinearProbeEvaluator("colour", block, config=config, settings=StepSettings.from_config(config, arch),
                                     mesh=mesh)
    state = types.SimpleNamespace(generator=Marlin.random_init(arch, seed=1, full=False).params)
    with sharding.activate(mesh, config.logical_axis_rules):
        scores = evaluator.evaluate(state, step=0).scalars
    assert set(scores) == {"probe/colour/auc", "probe/colour/acc"}
    assert scores["probe/colour/auc"] >= 0.9, scores


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
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "clips.npy"), str(tmp_path / "four.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "four.npy"), model.feature_extractor.features(clips, False),
                               atol=1e-5)
