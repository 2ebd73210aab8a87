"""The shard build as an Apache Beam pipeline (DirectRunner): the same shards (byte for byte) and manifest as the
local builder, from a local folder and from a bucket (a local Cloud Storage emulator, tests/gcs_emulator.py), bad
videos recorded without failing the job, one face-model load per worker, the grain pipeline reading the shards,
a rerun after a failed job, and the command line. Needs the `[beam]` extra.

To fit the suite's time budget (about a minute on 2 cores) the builds are small (112 px crops, 8 videos) and the
local and multi-process Beam builds run once for the module."""

import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from gcs_emulator import gcs_emulator  # noqa: F401 - the fixture

pytest.importorskip("apache_beam", reason="the Beam build needs the [beam] extra: pip install -e '.[beam]'")

from data_prep.beam_pipeline import build_with_beam  # noqa: E402
from data_prep.build_state import WORK_DIR, BuildConfig
from data_prep.local_build import build_dataset  # noqa: E402
from data_prep.demo_videos import synthesize_videos, write_mp4  # noqa: E402
from marlin_jax.data.pipeline import make_pretrain_loader  # noqa: E402
from marlin_jax.data.tfrecord import read_records  # noqa: E402
from marlin_jax.faces import FaceCropper, FrameCrop  # noqa: E402

pytestmark = pytest.mark.slow

CROP = 112  # small crops keep the test fast; the pipeline does not depend on the size
NUM_DEMO_VIDEOS = 6
MULTI_PROCESS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def make_inputs(videos: Path) -> None:
    """The demo videos, a file that is no video and a video without a face."""
    synthesize_videos(videos, num_videos=NUM_DEMO_VIDEOS)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    ramp = np.linspace(0, 200, 128, dtype=np.uint8)[None, :, None]
    write_mp4(videos / "faceless.mp4", np.broadcast_to(ramp, (24, 128, 128, 3)).copy())


def config_for(videos: Path | str, output: Path | str) -> BuildConfig:
    return BuildConfig(str(videos), str(output), workers=1, val_fraction=0.2, shard_size=2, segment_frames=32,
                       image_size=CROP)


def shard_records(output: Path, manifest: dict) -> dict[str, list[bytes]]:
    """Each shard's records, as stored (the bytes: a clip serializes the same in any process)."""
    return {shard["file"]: read_records(output / shard["file"]) for shard in manifest["shards"]}


def without_timing(manifest: dict) -> dict:
    sources = [{key: value for key, value in entry.items() if key != "seconds"} for entry in manifest["sources"]]
    return {**{key: value for key, value in manifest.items() if key != "updated"}, "sources": sources}


def without_places(manifest: dict) -> dict:
    """`without_timing`, also without where the sources were: the input folder, and the file named in a failure's
    reason (FFmpeg's message names the path it was given, a local file's; a stream from a bucket has none)."""
    manifest = without_timing(manifest)
    sources = [{**entry, "reason": entry["reason"].split(":")[0]} if "reason" in entry else entry
               for entry in manifest["sources"]]
    failures = [{**entry, "reason": entry["reason"].split(":")[0]} for entry in manifest["failures"]]
    return {**manifest, "input_dir": None, "sources": sources, "failures": failures}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The same videos built locally and by DirectRunner with two worker processes."""
    root = tmp_path_factory.mktemp("beam")
    make_inputs(root / "videos")
    local = build_dataset(config_for(root / "videos", root / "local"),
                          cropper_factory=functools.partial(FaceCropper, size=CROP))
    beam, counters = build_with_beam(config_for(root / "videos", root / "beam"), "DirectRunner", MULTI_PROCESS)
    return root, local, beam, counters


def test_beam_build_equals_the_local_build(builds):
    root, local, beam, _ = builds
    assert beam["complete"] and not (root / "beam" / WORK_DIR).exists()
    assert without_timing(beam) == without_timing(local)
    assert sorted(path.name for path in (root / "beam").iterdir()) == sorted(
        ["manifest.json"] + [shard["file"] for shard in local["shards"]])
    records = shard_records(root / "beam", beam)
    assert records == shard_records(root / "local", local)
    assert sum(map(len, records.values())) == beam["splits"]["train"]["records"] + beam["splits"]["val"]["records"]
    for shard in local["shards"]:  # so the shard files too are equal, byte for byte
        assert (root / "beam" / shard["file"]).read_bytes() == (root / "local" / shard["file"]).read_bytes()


def test_bad_videos_are_recorded_and_the_job_goes_on(builds):
    _, _, beam, counters = builds
    reasons = {failure["source_id"]: failure["reason"] for failure in beam["failures"]}
    assert sorted(reasons) == ["broken.mp4", "faceless.mp4"]
    assert reasons["broken.mp4"].startswith("VideoDecodeError: cannot open") and "Invalid data" in reasons["broken.mp4"]
    assert reasons["faceless.mp4"].startswith("NoFaceError")
    ok = [entry for entry in beam["sources"] if entry["status"] == "ok"]
    assert len(ok) == NUM_DEMO_VIDEOS and all(entry["num_records"] >= 1 for entry in ok)
    assert counters["sources_processed"] == NUM_DEMO_VIDEOS + 2 and counters["sources_failed"] == 2


def test_face_models_load_once_per_worker(builds):
    _, _, _, counters = builds
    assert 1 <= counters["face_model_loads"] <= 2  # two worker processes, eight videos


def test_grain_pipeline_reads_the_beam_shards(builds):
    root, _, beam, _ = builds
    loader = make_pretrain_loader(root / "beam", "train", 2, seed=0, process_index=0, process_count=1,
                                  worker_count=0, num_epochs=1)
    batches = list(loader)
    assert beam["splits"]["train"]["records"] >= 4
    assert len(batches) == beam["splits"]["train"]["records"] // 2  # one clip per record, a last odd one dropped
    assert batches[0]["video"].shape == (2, 16, CROP, CROP, 3)
    assert batches[0]["occupancy"].shape == (2, 8, CROP // 16, CROP // 16, 11)
    assert batches[0]["video"].mean() > 20  # face crops, not black frames


def test_beam_build_from_and_into_a_bucket(builds, gcs_emulator):  # noqa: F811 - the fixture
    """The cluster case: sources in a bucket, shards into it, workers in other processes (a local Cloud Storage)."""
    root, local, _, _ = builds
    bucket = gcs_emulator.create_bucket("beam-test")
    for path in sorted((root / "videos").iterdir()):
        (epath.Path(bucket) / "videos" / path.name).write_bytes(path.read_bytes())
    manifest, _ = build_with_beam(config_for(f"{bucket}/videos", f"{bucket}/shards"), "DirectRunner", MULTI_PROCESS)
    assert manifest["input_dir"] == f"{bucket}/videos"
    assert without_places(manifest) == without_places(local)
    output = epath.Path(bucket) / "shards"
    assert sorted(path.name for path in output.iterdir()) == sorted(
        ["manifest.json"] + [shard["file"] for shard in local["shards"]])
    for shard in local["shards"]:
        assert (output / shard["file"]).read_bytes() == (root / "local" / shard["file"]).read_bytes()


class CrashingCropper(FaceCropper):
    """A FaceCropper whose worker dies (an exception that is not a bad video) at its `crash_at`-th video."""

    def __init__(self, crash_at: int, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at
        self.videos = 0

    def iter_video(self, frames: Iterator[np.ndarray], *args, **kwargs) -> Iterator[FrameCrop]:
        self.videos += 1
        if self.videos == self.crash_at:
            raise RuntimeError("worker lost")
        return super().iter_video(frames, *args, **kwargs)


def test_rerun_after_a_failed_job_gives_the_same_shards(builds):
    root, local, _, _ = builds
    config = config_for(root / "videos", root / "rerun")
    with pytest.raises(Exception, match="worker lost"):
        build_with_beam(config, "DirectRunner", IN_PROCESS,
                        cropper_factory=functools.partial(CrashingCropper, crash_at=3, size=CROP))
    assert not json.loads((root / "rerun" / "manifest.json").read_text())["complete"]
    # Two videos were cropped before the crash (and the broken file too when it came first): their statuses
    # are kept, and the rerun processes only the others.
    finished = len(list((root / "rerun" / WORK_DIR).glob("*/*.json")))
    assert 2 <= finished <= 3
    manifest, counters = build_with_beam(config, "DirectRunner", IN_PROCESS)
    assert counters["sources_processed"] == NUM_DEMO_VIDEOS + 2 - finished
    assert without_timing(manifest) == without_timing(local)
    assert shard_records(root / "rerun", manifest) == shard_records(root / "local", local)


def run_build_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.build", *args], capture_output=True, text=True,
                          timeout=300)


def test_command_line(builds):
    root, _, beam, _ = builds
    videos, output = str(root / "videos"), str(root / "beam")
    done = run_build_command("--runner=DirectRunner", "--direct_num_workers=1", f"--input={videos}",
                             f"--output={output}", "--val_fraction=0.2", "--shard_size=2", "--segment_frames=32",
                             f"--image_size={CROP}")  # already complete: nothing to run
    assert done.returncode == 0, done.stderr[-3000:]
    train, val = beam["splits"]["train"], beam["splits"]["val"]
    assert (f"build complete: train {train['ok']} sources, {train['records']} records, {train['shards']} shards, "
            f"val {val['ok']} sources, {val['records']} records, {val['shards']} shards; 2 source(s) failed"
            ) in done.stdout
    refused = run_build_command(f"--input={videos}", f"--output={output}", "--direct_num_workers=1")
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: unknown flags: --direct_num_workers=1 (Beam pipeline options need --runner)")
    # A mistyped build flag must not be dropped as an unknown Beam option.
    refused = run_build_command("--runner=DirectRunner", f"--input={videos}", f"--output={output}", "--shard_sise=3")
    assert refused.returncode == 2 and "--shard_sise=3: neither a build option" in refused.stderr
    assert "nor a pipeline option of DirectRunner" in refused.stderr
    refused = run_build_command("--runner=DataflowRunner", f"--input={videos}", "--output=gs://bucket/shards")
    assert refused.returncode == 2 and "bucket paths" in refused.stderr
