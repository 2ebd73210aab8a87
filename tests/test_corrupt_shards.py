"""Shards damaged after data_prep: the pretraining pipeline skips and counts every damaged record (bad
checksums, a truncated tail, bytes that do not parse, frames that do not decode), never yields one, counts
the same with and without worker processes, and still resumes exactly."""

import hashlib
import json
import pathlib

import numpy as np
import pytest

from marlin_jax.data import codecs
from marlin_jax.data.pipeline import make_pretrain_loader
from marlin_jax.data.record_dataset import (CorruptDataError, RecordCounts, check_corrupt_fraction,
                                            corrupt_record_counts)
from marlin_jax.data.schema import parse_clip, serialize_clip
from marlin_jax.data.shards import load_manifest, shard_file_name
from marlin_jax.data.tfrecord import RecordReader, frame_record, read_records
from test_pipeline import clip_identities, write_dataset
from tiny_pretraining import make_small_demo


def _records_with_offsets(path: pathlib.Path) -> list[tuple[int, bytes]]:
    reader, records = RecordReader(path, strict=True), []
    while True:
        start = reader.offset
        try:
            records.append((start, reader.read_next()))
        except StopIteration:
            return records


def _frame_key(frame: np.ndarray) -> str:
    return hashlib.sha1(frame.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def damaged_demo(tmp_path_factory) -> tuple[pathlib.Path, dict[str, str]]:
    """The demo at 32 px (2 shards x 2 records): bytes flipped inside shard 0's first record, shard 1 cut inside its last.

    Returns the shard folder and, for every frame of the two intact records, which record it belongs to.
    """
    shards = make_small_demo(tmp_path_factory.mktemp("demo"), num_videos=4, val_fraction=0)
    manifest = load_manifest(shards)
    assert [shard["num_records"] for shard in manifest["shards"]] == [2, 2]
    first, second = (shards / shard["file"] for shard in manifest["shards"])
    (first_start, first_bad), (_, first_good) = _records_with_offsets(first)
    (_, second_good), (second_last_start, _) = _records_with_offsets(second)

    data = bytearray(first.read_bytes())
    middle = first_start + 12 + len(first_bad) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:second_last_start + 1000])

    intact = {}
    for name, record in (("shard0/record1", first_good), ("shard1/record0", second_good)):
        for jpeg in parse_clip(record).frames_jpeg:
            intact[_frame_key(codecs.decode_jpeg(jpeg))] = name
    return shards, intact


def _demo_loader(shards: pathlib.Path, worker_count: int):
    """Batches of one clip, read in a fixed order: shards one after the other, shard 0 first."""
    return make_pretrain_loader(shards, "train", 1, seed=0, process_index=0, process_count=1,
                                worker_count=worker_count, shuffle=False, cycle_length=1)


def _source_record(video: np.ndarray, intact: dict[str, str]) -> str:
    names = {intact.get(_frame_key(frame), "not an intact record") for frame in video}
    assert len(names) == 1, names
    return names.pop()


@pytest.mark.parametrize("worker_count", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_damaged_demo_shards_yield_only_intact_records_and_count_the_rest(damaged_demo, worker_count):
    shards, intact = damaged_demo
    loader = _demo_loader(shards, worker_count)
    try:
        batches = [next(loader) for _ in range(8)]
        counts = corrupt_record_counts(loader)
    finally:
        loader.close()
    sources = [_source_record(batch["video"][0], intact) for batch in batches]
    assert set(sources) == {"shard0/record1", "shard1/record0"}
    assert all(set(batch) == {"video", "occupancy"} for batch in batches)
    # Without workers the records come as [bad, good | good, bad] over and over: 8 clips carry 1, 0, 2, 0,
    # 2, 0, 2, 0 corrupt records. With two, worker i reads shard i over and over ([bad, good] and
    # [good, bad]) and batches alternate between them: 1, 0, 1, 1, 1, 1, 1, 1. Either way only the damaged
    # record after the last clip is not counted yet.
    assert counts == RecordCounts(corrupt=7, read=15, records_per_epoch=4)


def test_resume_on_damaged_shards_replays_batches_and_counts(damaged_demo):
    """In one process; test_pipeline resumes the same pipeline with worker processes."""
    shards, _ = damaged_demo
    original = _demo_loader(shards, worker_count=0)
    restored = _demo_loader(shards, worker_count=0)
    try:
        for _ in range(3):
            next(original)
        state = json.loads(json.dumps(original.get_state()))  # as a checkpoint stores it
        saved_counts = corrupt_record_counts(original)
        assert saved_counts.corrupt > 0
        expected = [next(original) for _ in range(3)]
        restored.set_state(state)
        assert corrupt_record_counts(restored) == saved_counts
        for got, want in zip([next(restored) for _ in range(3)], expected):
            np.testing.assert_array_equal(got["video"], want["video"])
        assert corrupt_record_counts(restored) == corrupt_record_counts(original)
    finally:
        original.close()
        restored.close()


def test_records_that_pass_the_checksum_but_do_not_parse_or_decode_are_skipped(tmp_path):
    write_dataset(tmp_path, [[20, 21, 22, 23, 24, 25]])
    shard = tmp_path / shard_file_name("train", 0, 1)
    records = read_records(shard)
    missing_keys = records[1].replace(b"video/fps", b"video/fpz")
    undecodable = parse_clip(records[2])
    undecodable.frames_jpeg[5] = b"\xff\xd8 not a jpeg"
    replaced = [records[0], b"\x0b not a protobuf \xff" * 3, missing_keys, serialize_clip(undecodable),
                records[3], records[4], records[5]]
    # Cut inside the 6th record: it and the 7th are lost, and the manifest says there should be 7.
    data = b"".join(frame_record(record) for record in replaced)
    shard.write_bytes(data[:len(data) - len(frame_record(records[5])) - 40])
    _set_manifest_records(tmp_path, 7)

    loader = make_pretrain_loader(tmp_path, "train", 1, 0, process_index=0, process_count=1, worker_count=0,
                                  shuffle=False, num_epochs=2, patch_size=16)
    sources = [source for batch in loader for source, _ in clip_identities(batch)]
    # Epoch 1: good, 3 unreadable, good, 2 lost; epoch 2 the same, but no clip follows its lost tail.
    assert sources == [0, 3, 0, 3]
    assert corrupt_record_counts(loader) == RecordCounts(corrupt=8, read=12, records_per_epoch=7)


def _set_manifest_records(root: pathlib.Path, num_records: int) -> None:
    manifest = load_manifest(root)
    manifest["shards"][0]["num_records"] = num_records
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_corrupt_fraction_stops_only_past_the_limit():
    check_corrupt_fraction(1, 100, 0.01)
    check_corrupt_fraction(0, 0, 0.0)
    # One damaged record in the first 10 read is 10%, but only 0.1% of an epoch of 1,000.
    check_corrupt_fraction(1, 10, 0.01, records_per_epoch=1000)
    with pytest.raises(CorruptDataError, match=r"config.data.max_corrupt_fraction=0.01"):
        check_corrupt_fraction(2, 100, 0.01)
    with pytest.raises(CorruptDataError, match="11 of 500 records"):
        check_corrupt_fraction(11, 500, 0.01, records_per_epoch=1000)
    with pytest.raises(ValueError, match="must be in"):
        check_corrupt_fraction(0, 10, 1.5)


def test_counts_need_the_counting_loader(tmp_path):
    with pytest.raises(TypeError, match="make_pretrain_loader"):
        corrupt_record_counts(iter([]))
