"""Orbax checkpoints of this project: loading through the facade and `python -m marlin_jax.export`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from marlin_jax import Marlin
from marlin_jax.architectures import VIT_TINY
from marlin_jax.training import checkpoints

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_training_checkpoint(workdir: pathlib.Path, model: Marlin, step: int) -> None:
    """The params + metadata items exactly as the trainer's manager writes them."""
    manager = checkpoints.make_manager(workdir / checkpoints.CHECKPOINT_SUBDIR, async_save=False)
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave({"generator": model.params, "discriminator": model.discriminator_params}),
        metadata=ocp.args.JsonSave({"architecture": model.architecture.to_dict(), "model_name": "tiny_run",
                                    "step": step})))
    manager.wait_until_finished()
    manager.close()


@pytest.fixture
def trained_workdir(tmp_path) -> tuple[pathlib.Path, Marlin]:
    model = Marlin.random_init(VIT_TINY, seed=21)
    write_training_checkpoint(tmp_path / "run", model, step=7)
    return tmp_path / "run", model


def test_facade_loads_an_orbax_workdir(trained_workdir):
    workdir, model = trained_workdir
    loaded = Marlin.from_file(VIT_TINY, workdir)
    clip = np.random.default_rng(0).random((1, 3, 16, 64, 64), dtype=np.float32)
    np.testing.assert_array_equal(loaded.extract_features(clip, False), model.extract_features(clip, False))


def test_facade_refuses_a_checkpoint_of_another_architecture(trained_workdir):
    workdir, _ = trained_workdir
    with pytest.raises(ValueError, match="trained with architecture"):
        Marlin.from_file("marlin_vit_small_ytf", workdir)


@pytest.mark.slow
def test_export_cli_writes_files_marlin_pytorch_loads(trained_workdir, marlin_pytorch, torch, tmp_path):
    workdir, model = trained_workdir
    result = subprocess.run([sys.executable, "-m", "marlin_jax.export", f"--workdir={workdir}",
                             f"--output={tmp_path / 'exported'}"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    stem = tmp_path / "exported" / "tiny_run_step7"
    for suffix in (".pt", ".yaml", ".safetensors"):
        assert stem.with_suffix(suffix).is_file(), suffix
    marlin_pytorch.config.register_model_from_yaml("tiny_run_export", str(stem.with_suffix(".yaml")))
    torch_model = marlin_pytorch.Marlin.from_file("tiny_run_export", str(stem.with_suffix(".pt"))).eval()
    clip = np.random.default_rng(1).random((1, 3, 16, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = torch_model.extract_features(torch.from_numpy(clip), keep_seq=True).numpy()
    np.testing.assert_allclose(model.extract_features(clip, True), expected, atol=1e-4)


def test_export_of_an_empty_workdir_says_so(tmp_path):
    with pytest.raises(ValueError, match="holds no orbax checkpoint"):
        Marlin.from_checkpoint(tmp_path)
    result = subprocess.run([sys.executable, "-m", "marlin_jax.export", f"--workdir={tmp_path}",
                             f"--output={tmp_path / 'out'}"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "holds no orbax checkpoint" in result.stderr
