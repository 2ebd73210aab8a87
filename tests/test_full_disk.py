"""data_prep and training on a full disk (a real, small tmpfs): a clear error naming the path and the space needed,
finished shards and checkpoints untouched, nothing half-written left behind, and a rerun after space is freed
completes the build, or the run as the uninterrupted one does."""

import pickle
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from skimage import data as skimage_data

from marlin_jax.storage import DiskFullError, atomic_path
from data_prep.build_state import BuildConfig
from data_prep.local_build import build_dataset
from data_prep.demo_videos import render_video, write_mp4
from marlin_jax.data.shards import load_manifest
from marlin_jax.interop import saved_models
from marlin_jax.training import loop
from marlin_jax.training.checkpoints import CheckpointDiskFullError
from marlin_jax.training.run_control import NonFiniteLossError
from tiny_pretraining import read_metrics, run_env, run_train, without_timing

REPO_ROOT = Path(__file__).resolve().parents[1]
DISK_BYTES = 8 * 2**20
NUM_VIDEOS = 6


# These tests fail, never skip, where no tmpfs can be mounted: what they check is promised, and CI runs them.
NEEDS_MOUNT = ("needs to mount a small tmpfs, which takes root: run the tests as root (CI does), or as a user "
               "inside a user and mount namespace: `unshare --user --map-root-user --mount python -m pytest ...`")


def _tmpfs(mount_point: Path, size: int) -> Iterator[Path]:
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.fail(f"{NEEDS_MOUNT}; `mount` is not installed")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.fail(f"{NEEDS_MOUNT}; mount said: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    yield from _tmpfs(tmp_path / "disk", DISK_BYTES)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Short demo videos (a camera moving over a portrait), so that the real face cropper runs fast."""
    folder = tmp_path_factory.mktemp("videos")
    for index in range(NUM_VIDEOS):
        frames = render_video(skimage_data.astronaut(), 12, 160, np.random.default_rng(index))
        write_mp4(folder / f"video_{index}.mp4", frames)
    return folder


def _build(videos: Path, output: Path) -> dict:
    config = BuildConfig(str(videos), str(output), workers=1, val_fraction=0.0, shard_size=2, image_size=112)
    return build_dataset(config)


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory) -> dict[str, bytes]:
    """The shards of an unhindered build, by file name."""
    output = tmp_path_factory.mktemp("reference")
    manifest = _build(videos, output)
    assert manifest["complete"] and len(manifest["shards"]) == NUM_VIDEOS // 2
    return {shard["file"]: (output / shard["file"]).read_bytes() for shard in manifest["shards"]}


def _fill(disk: Path, leave_free: int) -> Path:
    ballast = disk / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(disk).free - leave_free))
    return ballast


# Free space, in source-sized units: too little for the first source, for assembling the first shard, and
# for the shards after the first.
@pytest.mark.parametrize("free_sources", [0.5, 2.5, 4.5])
def test_full_disk_stops_with_a_clear_error_and_a_rerun_finishes(videos, reference, small_disk, free_sources):
    source_bytes = sum(map(len, reference.values())) // NUM_VIDEOS
    ballast = _fill(small_disk, int(free_sources * source_bytes))
    output = small_disk / "shards"

    with pytest.raises(DiskFullError) as caught:
        _build(videos, output)
    message = str(caught.value)
    assert f"no space left for {output}/" in message and "B free there" in message
    assert "rerun the same command" in message
    if free_sources > 1:
        assert "need about" in message and "B more" in message
    assert not list(output.rglob("*.tmp"))
    done = [shard["file"] for shard in load_manifest(output)["shards"] if shard["status"] == "done"]
    assert (len(done) > 0) == (free_sources > 4)
    for name in done:
        assert (output / name).read_bytes() == reference[name]

    ballast.unlink()
    manifest = _build(videos, output)
    assert manifest["complete"] and manifest["splits"]["train"]["ok"] == NUM_VIDEOS
    assert {shard["file"]: (output / shard["file"]).read_bytes() for shard in manifest["shards"]} == reference
    assert not (output / "_work").exists()


def test_a_write_that_does_not_fit_leaves_the_old_file_and_no_temporary(small_disk):
    target = small_disk / "manifest.json"
    target.write_text("old")
    _fill(small_disk, 64 * 1024)
    with pytest.raises(DiskFullError, match=f"no space left for {target} .* needs more than"):
        with atomic_path(target) as temp:
            temp.write_bytes(b"x" * (1024 * 1024))
    assert target.read_text() == "old" and not list(small_disk.glob("*.tmp"))


def test_the_build_command_reports_a_full_disk_in_one_line(videos, reference, small_disk):
    _fill(small_disk, sum(map(len, reference.values())) // NUM_VIDEOS // 2)
    output = small_disk / "shards"
    result = subprocess.run([sys.executable, "-m", "data_prep.build", f"--input={videos}", f"--output={output}",
                             "--workers=1", "--val_fraction=0", "--shard_size=2", "--image_size=112"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left for {output}/"), result.stderr[-3000:]
    assert "rerun the same command" in errors[0]


class _ManagerWhoseSaveFailed:
    """A checkpoint manager whose background save failed on a full disk, as orbax reports it."""

    def __init__(self, directory: Path):
        self.directory = directory

    def wait_until_finished(self):
        raise ValueError(f"RESOURCE_EXHAUSTED: Error writing local file \"{self.directory}/4.orbax-checkpoint-tmp/x\": "
                         "No space left on device [os_error_code='28']")


def test_a_checkpoint_save_that_failed_first_is_the_full_disk_reported(tmp_path):
    """The checkpoint save of a step failed in the background; a later write (best/) then found the disk full and
    raised first. The loop reports the checkpoint save's error, which names what a rerun resumes from; a failure
    that is not a full disk stays the one reported."""
    manager = _ManagerWhoseSaveFailed(tmp_path)
    trainer = types.SimpleNamespace(state=None, split_state=lambda state: ({}, {}))
    best_failed = CheckpointDiskFullError(28, f"no space left to write a checkpoint in {tmp_path / 'best'}")
    with pytest.raises(CheckpointDiskFullError, match=f"write a checkpoint in {tmp_path} ") as raised:
        loop._raise_a_failed_background_save(manager, trainer, best_failed)
    assert raised.value.__cause__ is best_failed
    loop._raise_a_failed_background_save(manager, trainer, NonFiniteLossError("non-finite values at step 2"))


def test_the_error_survives_a_worker_process_boundary():
    error = DiskFullError(28, "no space left for /data/shards/_work/train/a.tfrecord (0.0 MB free there)")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is DiskFullError and str(again) == str(error)


# --- checkpoints ------------------------------------------------------------------------------------------
# A tiny pretraining run (tests/tiny_pretraining.py) checkpointing every 2 of its 6 steps. It logs only its last
# step, so that between a checkpoint save failing in the background and the next save (where orbax raises its
# error) nothing else writes to the full disk. The cadences do not change what a run computes: the session's
# reference run (a checkpoint every step, all kept) is the uninterrupted run these runs must end as.

CHECKPOINT_DISK_BYTES = 32 * 2**20
TRAIN_RUN = ("--config.checkpoint_every=2", "--config.log_every=10", "--config.evals.val.every=0")
PAGE = 4096  # tmpfs allocates whole pages


@pytest.fixture
def checkpoint_disk(tmp_path) -> Iterator[Path]:
    yield from _tmpfs(tmp_path / "checkpoint_disk", CHECKPOINT_DISK_BYTES)


def _tmpfs_bytes(folder: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


# keep: config.keep_checkpoints. fits: how many checkpoints and best/ saves the free space holds (plus half a
# checkpoint). With keep 1 the save of step 4 needs room for steps 2 and 4 and fails in the background; the next
# save raises it. With keep 2 steps 2 and 4 and the best model fit, and the last save (step 6, which needs room
# for three checkpoints until it commits) fails after the loop.
@pytest.mark.slow
@pytest.mark.parametrize("keep,fits,finished", [(1, (1, 0), [2]), (2, (2, 1), [2, 4])])
def test_full_disk_while_checkpointing_stops_clearly_and_a_rerun_finishes(small_demo_shards, tiny_reference_run,
                                                                          checkpoint_disk, keep, fits, finished):
    shards, env, reference = small_demo_shards, run_env(), tiny_reference_run
    (best_step,) = (reference / "best").iterdir()
    checkpoint, best = _tmpfs_bytes(reference / "checkpoints" / "6"), _tmpfs_bytes(best_step)
    ballast = _fill(checkpoint_disk, fits[0] * checkpoint + fits[1] * best + checkpoint // 2)
    workdir, run = checkpoint_disk / "run", (*TRAIN_RUN, f"--config.keep_checkpoints={keep}")

    failed = run_train(workdir, shards, *run, env=env, expect_rc=2, timeout=300)

    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, failed.stderr[-3000:]
    message = errors[0]
    assert message.startswith(f"error: no space left to write a checkpoint in {workdir / 'checkpoints'} (")
    assert "B free there): one takes about" in message
    assert f"{', '.join(map(str, finished))}) are intact" in message and "rerun the same command" in message
    assert sorted(ocp.path.step.checkpoint_steps(workdir / "checkpoints")) == finished
    for step in finished:  # intact, and kept by retention although a newer save had started (keep 1)
        ours, theirs = saved_models.read_saved_model(workdir, step), saved_models.read_saved_model(reference, step)
        jax.tree_util.tree_map(np.testing.assert_array_equal, ours.generator, theirs.generator)

    ballast.unlink()
    rerun = run_train(workdir, shards, *run, env=env, timeout=300)
    assert "was left half-written by a save that did not finish; removing it" in rerun.stderr
    assert f"resumed from step {finished[-1]} in {workdir}" in rerun.stdout, rerun.stdout[-3000:]
    assert without_timing(read_metrics(workdir)[6]) == without_timing(read_metrics(reference)[6])
    ours, theirs = saved_models.read_saved_model(workdir), saved_models.read_saved_model(reference)
    assert ours.step == theirs.step == 6
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours.generator, theirs.generator)
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
