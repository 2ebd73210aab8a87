"""data_prep: sources and splits, segmenting, a real build, failures, resume after an interruption, TFRecord
checksums (the TensorFlow cross-read is tests/test_tfdata_crossread.py)."""

import json
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from data_prep import frames as frame_io
from data_prep.build_state import BuildConfig
from data_prep.local_build import build_dataset
from data_prep.demo_videos import make_demo_dataset, write_mp4
from data_prep.sources import plan_sources, sorted_group_split
from marlin_jax import masking
from marlin_jax.data import codecs
from marlin_jax.data.schema import parse_clip
from marlin_jax.data.tfrecord import CorruptRecordError, RecordReader, RecordWriter, read_records
from marlin_jax.faces import FrameCrop

CROP = 224


class FakeCropper:
    """Resizes whole frames to the crop size, labels a fixed square skin; dark frames have no face."""

    def iter_video(self, frames: Iterator[np.ndarray]) -> Iterator[FrameCrop]:
        for frame in frames:
            found = bool(frame.mean() > 60)
            labels = np.zeros((CROP, CROP), np.uint8)
            if found:
                labels[48:176, 48:176] = masking.SKIN
                labels[80:96, 64:96] = masking.RIGHT_EYE
            yield FrameCrop(frame=cv2.resize(frame, (CROP, CROP), interpolation=cv2.INTER_AREA), region_map=labels,
                            face_found=found, box=np.array([0, 0, frame.shape[1], frame.shape[0]], np.float32),
                            landmarks=np.full((468, 2), np.nan, np.float32), detected=True)


class CountingCropper(FakeCropper):
    """Counts videos, and raises KeyboardInterrupt (like Ctrl-C) at frame 20 of video `interrupt_at` (0-based)."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls = 0
        self.interrupt_at = interrupt_at

    def iter_video(self, frames: Iterator[np.ndarray]) -> Iterator[FrameCrop]:
        interrupt = self.calls == self.interrupt_at
        self.calls += 1
        for index, crop in enumerate(super().iter_video(frames)):
            if interrupt and index == 20:
                raise KeyboardInterrupt
            yield crop


def gradient_video(num_frames: int, side: int, brightness: int) -> np.ndarray:
    ramp = np.linspace(0, 1, side)[None, :, None] * np.ones((side, 1, 3))
    return np.stack([(ramp * brightness + t).clip(0, 255).astype(np.uint8) for t in range(num_frames)])


def shard_records(out: Path, manifest: dict) -> list:
    return [parse_clip(data) for shard in manifest["shards"] for data in read_records(out / shard["file"])]


def by_source(manifest: dict) -> dict:
    return {entry["source_id"]: entry for entry in manifest["sources"]}


# --- sources, splits and segments -------------------------------------------------------------------------

def _make_ytf(root: Path) -> None:
    for person in ("Alice", "Bob", "Carol"):
        for video in ("0", "1"):
            folder = root / "frame_images_DB" / person / video
            folder.mkdir(parents=True)
            for k in range(12):  # names sort wrongly as strings: 1.10.jpg before 1.2.jpg
                frame = np.full((48, 48, 3), 40 + 10 * k, np.uint8)
                cv2.imwrite(str(folder / f"{video}.{k}.jpg"), frame)


def test_ytf_layout_reads_frames_in_natural_order_and_honours_split_csvs(tmp_path):
    _make_ytf(tmp_path / "ytf")
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "train_set.csv").write_text("path,len\nAlice/0,12\nAlice/1,12\nBob/0,12\n")
    (csv_dir / "val_set.csv").write_text("path,len\nCarol/0,12\nCarol/1,12\nDave/0,50\n")
    config = BuildConfig(str(tmp_path / "ytf"), str(tmp_path / "out"), layout="ytf", workers=1,
                         split_csv_dir=str(csv_dir), shard_size=2)
    manifest = build_dataset(config, cropper_factory=FakeCropper)

    assert manifest["complete"]
    assert {s["source_id"]: s["split"] for s in manifest["sources"]} == {
        "Alice/0": "train", "Alice/1": "train", "Bob/0": "train", "Carol/0": "val", "Carol/1": "val"}
    assert sorted(map(tuple, (s.values() for s in manifest["skipped"]))) == [
        ("Bob/1", "not listed in the split CSVs"),
        ("Dave/0", "listed in val_set.csv but not found in the input")]
    for record in shard_records(tmp_path / "out", manifest):
        brightness = [codecs.decode_jpeg(frame).mean() for frame in record.frames_jpeg]
        assert record.num_frames == 12 and record.fps == 0.0
        np.testing.assert_allclose(brightness, 40 + 10 * np.arange(12), atol=2)


def test_sorted_split_keeps_people_together_and_is_exact():
    ids = [f"{person}/{n}" for person in ("A", "B", "C", "D", "E") for n in range(3)]
    splits = sorted_group_split(ids, "ytf", val_fraction=0.4)
    val_people = {sid.split("/")[0] for sid, split in splits.items() if split == "val"}
    assert val_people == {"C", "E"}  # two of five, evenly spaced
    assert all(splits[f"{p}/{n}"] == splits[f"{p}/0"] for p in "ABCDE" for n in range(3))
    assert sorted_group_split(ids, "videos", 0.0) == {sid: "train" for sid in ids}
    with pytest.raises(ValueError, match="val_fraction"):
        sorted_group_split(ids, "ytf", 1.0)


def test_a_small_corpus_still_gets_a_val_group():
    ten = [f"video_{n}.mp4" for n in range(10)]  # the default 5% of 10 files is less than one file
    splits = sorted_group_split(ten, "videos", 0.05)
    assert [sid for sid, split in splits.items() if split == "val"] == ["video_9.mp4"]
    assert sorted_group_split(ten[:1], "videos", 0.05) == {"video_0.mp4": "train"}  # one group stays in train
    assert "val" not in sorted_group_split(ten, "videos", 0.0).values()
    many = [f"video_{n:03d}.mp4" for n in range(100)]  # enough files: the exact evenly spaced share, as before
    assert sum(split == "val" for split in sorted_group_split(many, "videos", 0.05).values()) == 5


def test_plan_sources_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        plan_sources(tmp_path / "missing", "videos")
    with pytest.raises(ValueError, match="no videos sources"):
        plan_sources(tmp_path, "videos")
    with pytest.raises(ValueError, match="frame_images_DB"):
        plan_sources(tmp_path, "ytf")
    with pytest.raises(ValueError, match="layout"):
        plan_sources(tmp_path, "images")


def test_segments_cover_every_frame_once_and_avoid_stubs():
    segments = list(frame_io.iter_segments(iter(range(90)), 32))
    assert [(first, len(seg)) for first, seg in segments] == [(0, 32), (32, 32), (64, 26)]
    assert [t for _, seg in segments for t in seg] == list(range(90))
    assert [len(s) for _, s in frame_io.iter_segments(iter(range(47)), 32)] == [47]
    assert [len(s) for _, s in frame_io.iter_segments(iter(range(48)), 32)] == [32, 16]
    with pytest.raises(ValueError, match="no frames"):
        list(frame_io.iter_segments(iter([]), 32))


# --- a build over real videos -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_build(samples_dir, tmp_path_factory):
    """Three real videos, a corrupt file and a faceless video, built with the real FaceCropper."""
    from marlin_jax.faces import FaceCropper

    root = tmp_path_factory.mktemp("real")
    videos = root / "videos"
    (videos / "wild").mkdir(parents=True)
    for name, folder in (("video05.mp4", "wild"), ("cropped04.mp4", "."), ("cropped05.mp4", ".")):
        (videos / folder / name).symlink_to(samples_dir / name)
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    write_mp4(videos / "faceless.mp4", gradient_video(24, 128, 200), fps=30)
    cropper = FaceCropper()
    config = BuildConfig(str(videos), str(root / "out"), workers=1, shard_size=2, segment_frames=32,
                         val_fraction=0.0)
    return root, build_dataset(config, cropper_factory=lambda: cropper), cropper


def test_real_build_manifest_records_successes_and_failures(real_build):
    root, manifest, _ = real_build
    sources = by_source(manifest)
    assert manifest["complete"] and manifest["shards_done"] == len(manifest["shards"]) == 3
    assert {sid: s["status"] for sid, s in sources.items()} == {
        "wild/video05.mp4": "ok", "cropped04.mp4": "ok", "cropped05.mp4": "ok",
        "corrupt.mp4": "failed", "faceless.mp4": "failed"}
    reasons = {f["source_id"]: f["reason"] for f in manifest["failures"]}
    assert reasons["corrupt.mp4"].startswith("VideoDecodeError: cannot open")
    assert "Invalid data" in reasons["corrupt.mp4"]
    assert reasons["faceless.mp4"].startswith("NoFaceError")
    assert sources["wild/video05.mp4"]["num_records"] == 3  # 90 frames at segment_frames=32: 32 + 32 + 26
    assert manifest["splits"]["train"]["frames"] == 90 + 15 + 27
    assert manifest["versions"]["packages"]["av"] == av.__version__
    assert set(manifest["versions"]["face_models_sha256"]) == {"face_detection_short_range.tflite",
                                                                "face_landmark.tflite"}
    leftovers = sorted(p.name for p in (root / "out").iterdir())
    assert leftovers == sorted(["manifest.json"] + [s["file"] for s in manifest["shards"]])


def test_real_build_records_hold_the_croppers_output(real_build, samples_dir):
    root, manifest, cropper = real_build
    records = {(r.source_id, r.segment_index): r for r in shard_records(root / "out", manifest)}
    assert sorted(records) == [("cropped04.mp4", 0), ("cropped05.mp4", 0), ("wild/video05.mp4", 0),
                               ("wild/video05.mp4", 1), ("wild/video05.mp4", 2)]
    assert [records["wild/video05.mp4", i].first_frame for i in range(3)] == [0, 32, 64]
    raw = np.stack(list(frame_io.iter_video_frames(str(samples_dir / "cropped05.mp4"))))
    expected = cropper.process_video(raw)
    record = records["cropped05.mp4", 0]
    frames = np.stack([codecs.decode_jpeg(data) for data in record.frames_jpeg])
    maps = np.stack([codecs.decode_label_map(data) for data in record.region_maps_png])
    assert frames.shape == (27, CROP, CROP, 3) and record.fps == 30.0
    assert np.abs(frames.astype(int) - expected.frames).mean() < 2.5  # JPEG at quality 95
    np.testing.assert_array_equal(maps, expected.region_maps)  # PNG is lossless
    np.testing.assert_array_equal(record.face_found, expected.face_found)
    np.testing.assert_allclose(record.boxes, expected.boxes)
    assert by_source(manifest)["cropped05.mp4"]["frames_with_face"] == expected.face_found.sum()


# --- resume -----------------------------------------------------------------------------------------------

def _resume_inputs(root: Path) -> Path:
    videos = root / "videos"
    videos.mkdir()
    for index in range(5):
        brightness = 5 if index == 2 else 140 + 20 * index  # video 2 is too dark: no face
        write_mp4(videos / f"v{index}.mp4", gradient_video(40, 64, brightness), fps=25)
    return videos


def test_interrupted_build_resumes_without_loss_or_duplicates(tmp_path):
    videos = _resume_inputs(tmp_path)
    config = BuildConfig(str(videos), str(tmp_path / "out"), workers=1, shard_size=2, segment_frames=16,
                         val_fraction=0.0)
    # 40 frames -> 3 segments (16, 16, 8) per video; frame 20 of the 4th source is in its 2nd segment: shard 0
    # is done, shard 1 has one finished source and one half-written part.
    interrupted = CountingCropper(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(config, cropper_factory=lambda: interrupted)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["shards_done"] == 1
    assert sorted(p.name for p in out.glob("*.tfrecord")) == [manifest["shards"][0]["file"]]
    assert not list(out.rglob("*.tmp"))  # the half-written part was removed
    # What a hard kill would leave: half-written files under temporary names.
    (out / (manifest["shards"][1]["file"] + ".tmp")).write_bytes(b"partial shard")
    (out / "_work" / "train" / "half.tfrecord.tmp").write_bytes(b"partial part")

    resumed = CountingCropper()
    manifest = build_dataset(config, cropper_factory=lambda: resumed)
    assert resumed.calls == 2  # only the interrupted source and the one never started
    assert manifest["complete"] and not (out / "_work").exists() and not list(out.rglob("*.tmp"))

    fresh = build_dataset(BuildConfig(str(videos), str(tmp_path / "fresh"), workers=1, shard_size=2,
                                      segment_frames=16, val_fraction=0.0), cropper_factory=FakeCropper)
    for shard in fresh["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "fresh" / shard["file"]).read_bytes()
    assert manifest["sources"] == [{**s, "seconds": m["seconds"]} for s, m in zip(fresh["sources"],
                                                                                  manifest["sources"])]
    keys = [(r.source_id, r.segment_index) for r in shard_records(out, manifest)]
    assert len(keys) == len(set(keys)) == 4 * 3


def test_finished_build_is_left_alone_and_other_settings_are_refused(tmp_path):
    videos = _resume_inputs(tmp_path)
    config = BuildConfig(str(videos), str(tmp_path / "out"), workers=1, shard_size=2, segment_frames=16)
    build_dataset(config, cropper_factory=FakeCropper)
    again = CountingCropper()
    manifest = build_dataset(config, cropper_factory=lambda: again)
    assert again.calls == 0 and manifest["complete"]
    with pytest.raises(ValueError, match="other sources or settings"):
        build_dataset(BuildConfig(str(videos), str(tmp_path / "out"), workers=1, shard_size=3,
                                  segment_frames=16), cropper_factory=FakeCropper)


# --- the demo, through worker processes and the real cropper ----------------------------------------------

@pytest.mark.slow
def test_demo_dataset_builds_with_worker_processes(tmp_path):
    manifest = make_demo_dataset(tmp_path, num_videos=4, workers=2)
    assert manifest["complete"] and not manifest["failures"]
    assert sum(split["ok"] for split in manifest["splits"].values()) == 4
    for entry in manifest["sources"]:
        assert 40 <= entry["num_frames"] <= 64 and entry["frames_with_face"] == entry["num_frames"]
    record = shard_records(tmp_path / "shards", manifest)[0]
    maps = np.stack([codecs.decode_label_map(data) for data in record.region_maps_png])
    assert {masking.SKIN, masking.NOSE, masking.LEFT_EYE, masking.RIGHT_EYE} <= set(np.unique(maps))


# --- TFRecord framing ---------------------------------------------------------------------------------------

def _write(path: Path, records: list[bytes]) -> list[int]:
    """Writes records; returns each record's start offset."""
    with RecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    starts = np.cumsum([0] + [16 + len(r) for r in records])
    return starts.tolist()


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_reader_round_trips_and_resumes_from_offset(tmp_path):
    records = [bytes([i]) * (i * 37) for i in range(6)]
    _write(tmp_path / "a.tfrecord", records)
    assert read_records(tmp_path / "a.tfrecord") == records
    reader = RecordReader(tmp_path / "a.tfrecord")
    head = [next(reader), next(reader)]
    assert head + list(RecordReader(tmp_path / "a.tfrecord", reader.offset)) == records


def test_corrupt_data_is_detected_counted_and_skipped(tmp_path):
    records = [f"record {i}".encode() * 50 for i in range(5)]
    starts = _write(tmp_path / "a.tfrecord", records)
    _flip_byte(tmp_path / "a.tfrecord", starts[2] + 12 + 100)  # inside record 2's data
    reader = RecordReader(tmp_path / "a.tfrecord")
    assert list(reader) == records[:2] + records[3:] and reader.corrupt_records == 1
    with pytest.raises(CorruptRecordError, match="data checksum"):
        read_records(tmp_path / "a.tfrecord")


def test_corrupt_length_or_truncation_skips_the_rest_of_the_file(tmp_path):
    records = [f"record {i}".encode() * 50 for i in range(5)]
    starts = _write(tmp_path / "a.tfrecord", records)
    _flip_byte(tmp_path / "a.tfrecord", starts[3] + 1)  # record 3's length field
    reader = RecordReader(tmp_path / "a.tfrecord")
    assert list(reader) == records[:3] and reader.corrupt_records == 1
    with pytest.raises(CorruptRecordError, match="length checksum"):
        read_records(tmp_path / "a.tfrecord")
    _write(tmp_path / "b.tfrecord", records)
    (tmp_path / "b.tfrecord").write_bytes((tmp_path / "b.tfrecord").read_bytes()[:starts[4] + 20])
    reader = RecordReader(tmp_path / "b.tfrecord")
    assert list(reader) == records[:4] and reader.corrupt_records == 1
