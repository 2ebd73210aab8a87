"""Elastic resume: a run checkpointed on 8 fake CPU devices, mesh (8,1,1), resumes on 4 devices with a (2,2,1)
mesh at the same global batch, and its losses continue those of the uninterrupted 8-device run, the data-iterator
position included. The resumed run changes everything a restore has to place anew at once: the device count (8 to
4), the data-parallel width (8 to 2) and the parameters' layout (replicated to sharded over fsdp). A global batch
that cannot split over the devices or the processes is refused, naming the value to pass, before any data is read
or anything compiles."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from marlin_jax.config_files import load_config
from marlin_jax.pretraining.trainer import train_and_evaluate
from marlin_jax.training import sharding
from tiny_pretraining import (
    LOSSES,
    REPO_ROOT,
    TINY_CONFIG,
    copy_run_until,
    read_metrics,
    run_env,
    run_train,
)

pytestmark = pytest.mark.slow

RUN = ("--config.total_steps=4", "--config.checkpoint_every=2", "--config.batch_size=8",
       "--config.evals.val.every=0")


@pytest.fixture(scope="module")
def eight_devices(small_demo_shards, tmp_path_factory) -> pathlib.Path:
    """The uninterrupted run on 8 devices, data-parallel."""
    workdir = tmp_path_factory.mktemp("eight")
    run_train(workdir, small_demo_shards, *RUN, "--config.mesh.shape=(8,1,1)", env=run_env(devices=8))
    return workdir


def test_a_run_from_8_devices_continues_on_4_with_fsdp(eight_devices, small_demo_shards, tmp_path):
    mesh = (2, 2, 1)
    workdir = tmp_path / "four"
    copy_run_until(eight_devices, workdir, last_step=2)

    result = run_train(workdir, small_demo_shards, *RUN, f"--config.mesh.shape=({','.join(map(str, mesh))})",
                       env=run_env(devices=4))

    assert f"resumed from step 2 in {workdir}" in result.stdout
    resolved = json.loads((workdir / "config.json").read_text())["resolved"]
    assert resolved["device_count"] == 4 and tuple(resolved["mesh"].values()) == mesh
    resumed, uninterrupted = read_metrics(workdir), read_metrics(eight_devices)
    assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 3, 4]
    # Summing over 4 devices instead of 8 changes the last float32 bit: rec_loss (~0.3) moves by 3e-8, d_loss (~-7)
    # by 5e-7 to 1e-6 (one or two units in its last place), so 1e-6 is relative beyond a magnitude of 1.
    for step, key in [(3, key) for key in LOSSES] + [(4, key) for key in (*LOSSES, "val/loss")]:
        expected = uninterrupted[step][key]
        assert abs(resumed[step][key] - expected) <= 1e-6 * max(1.0, abs(expected)), (step, key)


def _fail_on_compile(*args, **kwargs):
    raise AssertionError("compiled before the config was checked")


def test_a_batch_that_does_not_split_over_the_devices_is_named_before_compiling(tmp_path):
    """Batch 6 on 4 devices (say, a run from 6 devices resumed on 4): refused before the data is read (the data
    folder does not exist) and before anything compiles."""
    script = (
        "import jax, sys\n"
        "from marlin_jax.config_files import load_config\n"
        "from marlin_jax.pretraining.trainer import train_and_evaluate\n"
        "def fail_on_compile(*args, **kwargs):\n"
        "    raise AssertionError('compiled before the config was checked')\n"
        "jax.jit = fail_on_compile\n"
        f"config = load_config({TINY_CONFIG!r})\n"
        "config.data.path, config.batch_size = sys.argv[1], 6\n"
        "try:\n"
        "    train_and_evaluate(config, sys.argv[2])\n"
        "except ValueError as error:\n"
        "    print(error)\n")
    env = run_env(devices=4)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "no_data"), str(tmp_path / "work")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ("config.batch_size=6 does not split over the mesh's data x fsdp axes "
                                     "(4 x 1 = 4 devices) and 1 process(es); pass a multiple of 4")


def test_a_batch_that_does_not_split_over_the_processes_is_named_before_compiling(monkeypatch, tmp_path):
    monkeypatch.setattr(jax, "jit", _fail_on_compile)
    # The processes are those whose devices the mesh spans (sharding.process_count); three, as on three hosts.
    monkeypatch.setattr(sharding, "process_count", lambda mesh: 3)
    config = load_config(TINY_CONFIG)
    config.data.path = str(tmp_path / "no_data")
    with pytest.raises(ValueError, match=r"config.batch_size=4 does not split .* and 3 process\(es\); pass a "
                                         r"multiple of 3"):
        train_and_evaluate(config, tmp_path / "work")
