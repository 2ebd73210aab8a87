"""data_prep on a full disk (a real, small tmpfs): a clear error naming the path and the space needed, finished
shards untouched, nothing half-written left behind, and a rerun after space is freed completes the build."""

import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skimage_data

from data_prep.atomic import DiskFullError, atomic_path
from data_prep.builder import BuildConfig, build_dataset
from data_prep.demo import render_video, write_mp4
from marlin_jax.data.shards import load_manifest

DISK_BYTES = 8 * 2**20
NUM_VIDEOS = 6


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("needs `mount` to make a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"needs a small tmpfs; mounting one was refused (needs root where mounts are permitted): "
                    f"{mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


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


def test_the_error_survives_a_worker_process_boundary():
    error = DiskFullError(28, "no space left for /data/shards/_work/train/a.tfrecord (0.0 MB free there)")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is DiskFullError and str(again) == str(error)
