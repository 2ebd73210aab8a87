"""Damaged checkpoints, on the real files orbax writes.

A step folder holds one sub-folder per item (`params`, `opt_state`, `data_iterator`, `metadata`), each with a
`commit_success.txt`; the arrays live in OCDBT files (`manifest.ocdbt`, `d/<hash>`, `ocdbt.process_0/d/<hash>`).
Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save killed halfway leaves that
folder, never a half-written numbered one. Every file a restore reads fails loudly when removed or truncated; the
others (`_CHECKPOINT_METADATA`, the commit markers, `_sharding`) restore the same arrays without them, so a step
missing only those is intact. Resume falls back past damaged steps to the newest intact one, warning with each
name; pretraining and fine-tuning then reproduce the uninterrupted run, and export takes the newest intact step.
Pretraining damages copies of the session's reference run (tests/tiny_pretraining.py, conftest.py).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from marlin_jax.data.pipeline import make_pretrain_loader
from marlin_jax.training import checkpoints
from marlin_jax.interop import saved_models
from tiny_pretraining import (
    LOSSES,
    REFERENCE_RUN,
    REPO_ROOT,
    copy_run_until,
    read_metrics,
    run_env,
    run_train,
    without_timing,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return run_env()


@pytest.fixture(scope="module")
def shards(small_demo_shards) -> pathlib.Path:
    return small_demo_shards


@pytest.fixture(scope="module")
def reference(tiny_reference_run) -> pathlib.Path:
    """An uninterrupted run of 6 steps with a checkpoint after each (the session's; read only)."""
    return tiny_reference_run


def largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_falls_back_past_damaged_steps_and_reproduces_the_run(reference, shards, env, tmp_path):
    workdir = tmp_path / "run"
    copy_run_until(reference, workdir, last_step=4)
    saved = workdir / "checkpoints"
    # A kill while saving step 5 left its temporary folder without the optimiser and the data iterator.
    half_written = saved / "5.orbax-checkpoint-tmp"
    shutil.copytree(reference / "checkpoints" / "5", half_written)
    for item in ("opt_state", "data_iterator"):
        shutil.rmtree(half_written / item)
    truncate(largest_file(saved / "4" / "params"))
    largest_file(saved / "3" / "opt_state").unlink()
    for marker in [*(saved / "2").rglob("commit_success.txt"), saved / "2" / "_CHECKPOINT_METADATA"]:
        marker.unlink()  # not read by a restore: step 2 stays intact
    files_of = {step: sorted(p.relative_to(saved / str(step)) for p in (saved / str(step)).rglob("*"))
                for step in (3, 4)}

    result = run_train(workdir, shards, *REFERENCE_RUN, "--config.keep_checkpoints=2", env=env)

    assert f"checkpoint {half_written} was left half-written" in result.stderr
    for step in (4, 3):
        assert f"checkpoint step {step} in {saved} is damaged" in result.stderr, step
    assert f"resumed from step 2 in {workdir}" in result.stdout
    moved = {int(p.name.split("_")[0]): p for p in (workdir / checkpoints.DAMAGED_SUBDIR).iterdir()}
    assert sorted(moved) == [3, 4]
    for step, folder in moved.items():  # moved aside whole, never deleted
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == files_of[step]

    resumed, uninterrupted = read_metrics(workdir), read_metrics(reference)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 7))
    for step in range(3, 7):
        for key in LOSSES:
            assert resumed[step][key] == uninterrupted[step][key], (step, key)
    assert resumed[6]["val/loss"] == uninterrupted[6]["val/loss"]
    # Retention (keep 2) counted intact steps only; both restore to the uninterrupted run's parameters.
    assert sorted(p.name for p in saved.iterdir()) == ["5", "6"]
    for step in (5, 6):
        ours, theirs = saved_models.read_saved_model(workdir, step), saved_models.read_saved_model(reference, step)
        jax.tree_util.tree_map(np.testing.assert_array_equal, ours.generator, theirs.generator)


def test_when_no_step_restores_the_resume_stops_and_moves_nothing(reference, shards, env, tmp_path):
    workdir = tmp_path / "run"
    copy_run_until(reference, workdir, last_step=2)
    for step in (1, 2):
        truncate(largest_file(workdir / "checkpoints" / str(step) / "params"))

    result = run_train(workdir, shards, *REFERENCE_RUN, env=env, expect_rc=2)

    assert f"error: no checkpoint in {workdir / 'checkpoints'} restores (step 2: " in result.stderr
    assert "Nothing was moved or deleted" in result.stderr and "pass a new --workdir" in result.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    assert not (workdir / checkpoints.DAMAGED_SUBDIR).exists()
    assert sorted(read_metrics(workdir)) == [1, 2]


def _export(workdir: pathlib.Path, output: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marlin_jax.export", f"--workdir={workdir}", f"--output={output}",
                           *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_export_takes_the_newest_intact_step(reference, torch, tmp_path):
    workdir = tmp_path / "run"
    copy_run_until(reference, workdir, last_step=6)
    truncate(largest_file(workdir / "checkpoints" / "6" / "params"))

    result = _export(workdir, tmp_path / "exported")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint step 6 in {workdir / 'checkpoints'} is damaged" in result.stderr
    state = torch.load(tmp_path / "exported" / "marlin_vit_small_tiny_step5.pt", weights_only=True)
    expected = saved_models.read_saved_model(reference, 5).generator["encoder"]["norm"]["scale"]
    np.testing.assert_array_equal(state["encoder.norm.weight"].numpy(), expected)

    named = _export(workdir, tmp_path / "named", "--step=6")
    assert named.returncode == 2 and f"checkpoint step 6 in {workdir / 'checkpoints'} is damaged" in named.stderr


def test_a_data_iterator_resumed_twice_yields_the_uninterrupted_batches(shards):
    """A run preempted twice: restored at batch 8, checkpointed again at 12, restored again."""
    def loader():
        return make_pretrain_loader(shards, "train", 4, 0, worker_count=0, num_frames=16, temporal_sample_rate=2,
                                    patch_size=16, tubelet_size=2, shuffle_window=64)

    uninterrupted = loader()
    expected = [next(uninterrupted)["video"] for _ in range(20)]
    resumed, consumed = loader(), 0
    for checkpoint_at in (8, 12):
        for _ in range(checkpoint_at - consumed):
            next(resumed)
        state = json.loads(json.dumps(resumed.get_state()))  # as grain's orbax handler saves and reads it
        resumed, consumed = loader(), checkpoint_at
        resumed.set_state(state)
    for step in range(consumed, 20):
        np.testing.assert_array_equal(next(resumed)["video"], expected[step], err_msg=f"batch {step + 1}")


# --- fine-tuning ------------------------------------------------------------------------------------------

FINETUNE_CONFIG = str(REPO_ROOT / "configs/finetune/csv.py") + ":binary,tiny"
FINETUNE_RUN = ("--config.total_steps=4", "--config.checkpoint_every=1", "--config.keep_checkpoints=10",
                "--config.eval_every=4", "--config.log_every=1", "--config.select_metric=acc")


def _finetune(workdir: pathlib.Path, colour_csv: pathlib.Path, env) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "marlin_jax.finetune", f"--config={FINETUNE_CONFIG}",
                             f"--workdir={workdir}", f"--config.data.csv={colour_csv}", *FINETUNE_RUN],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_finetuning_resumes_past_a_damaged_step(colour_csv, env, tmp_path):
    reference, workdir = tmp_path / "reference", tmp_path / "run"
    _finetune(reference, colour_csv, env)
    copy_run_until(reference, workdir, last_step=3)  # validation runs at step 4 only: no best/ yet at step 3
    (workdir / "checkpoints" / "3" / "data_iterator" / "process_0-of-1.json").unlink()

    result = _finetune(workdir, colour_csv, env)

    assert f"checkpoint step 3 in {workdir / 'checkpoints'} is damaged" in result.stderr
    assert f"resumed from step 2 in {workdir}" in result.stdout
    resumed, uninterrupted = read_metrics(workdir), read_metrics(reference)
    assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 3, 4]
    for step in uninterrupted:
        assert without_timing(resumed[step]) == without_timing(uninterrupted[step]), step
    ours, theirs = (json.loads((w / "results.json").read_text()) for w in (workdir, reference))
    for key in ("acc", "auc", "selected_step", "val", "steps_run"):
        assert ours[key] == theirs[key], key
