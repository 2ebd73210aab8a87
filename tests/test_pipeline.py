"""The grain pretraining pipeline: temporal sampling, clip contents, epochs, hosts, corrupt records, and exact
resume from a saved iterator state (in-process and with worker processes)."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from marlin_jax.storage import write_json
from data_prep.manifest import make_manifest
from data_prep.plan import ShardPlan
from data_prep.sources import Source
from marlin_jax import masking
from marlin_jax.data import codecs
from marlin_jax.data.pipeline import make_pretrain_loader
from marlin_jax.video import pretraining_clip
from marlin_jax.data.schema import ClipRecord, serialize_clip
from marlin_jax.data.shards import MANIFEST_NAME, shard_file_name
from marlin_jax.data.tfrecord import RecordWriter
from marlin_jax.data.transforms import DecodeClip

SIDE = 64  # small frames keep the tests fast; the pipeline does not depend on the size
PATCH = 16


def frame_image(source: int, index: int) -> np.ndarray:
    """A flat frame whose colour spells (source, index), robust to JPEG."""
    return np.broadcast_to(np.array([4 * (index % 64), 4 * (index // 64), 8 * source], np.uint8),
                           (SIDE, SIDE, 3)).copy()


def frame_identity(frame: np.ndarray) -> tuple[int, int]:
    red, green, blue = np.rint(frame.reshape(-1, 3).mean(axis=0)).astype(int)
    return int(round(blue / 8)), int(round(red / 4)) + 64 * int(round(green / 4))


def region_map(index: int) -> np.ndarray:
    labels = np.full((SIDE, SIDE), index % masking.NUM_LABELS, np.uint8)
    labels[:PATCH, :PATCH] = masking.NOSE
    return labels


def face_found(index: int) -> bool:
    return index % 5 != 4


def clip_record(source: int, num_frames: int) -> bytes:
    return serialize_clip(ClipRecord(
        frames_jpeg=[codecs.encode_jpeg(frame_image(source, i)) for i in range(num_frames)],
        region_maps_png=[codecs.encode_label_map(region_map(i)) for i in range(num_frames)],
        face_found=np.array([face_found(i) for i in range(num_frames)]),
        boxes=np.zeros((num_frames, 4), np.float32), height=SIDE, width=SIDE, fps=25.0,
        source_id=f"s{source}.mp4", segment_index=0, first_frame=0, split="train"))


def write_dataset(root: Path, shard_lengths: list[list[int]], *, complete: bool = True) -> dict[int, int]:
    """Shards of records with the given frame counts, and their manifest; returns source -> length."""
    root.mkdir(parents=True, exist_ok=True)
    shards, statuses, lengths = [], {}, {}
    for index, record_lengths in enumerate(shard_lengths):
        plan = ShardPlan(shard_file_name("train", index, len(shard_lengths)), "train", tuple(
            Source(f"s{len(lengths) + k}.mp4", "", "train") for k in range(len(record_lengths))))
        with RecordWriter(root / plan.file) as writer:
            for source, length in zip(plan.sources, record_lengths):
                number = len(lengths)
                writer.write(clip_record(number, length))
                lengths[number] = length
                statuses[source.source_id] = {"status": "ok", "num_frames": length, "num_records": 1,
                                              "stored_frames": length}
        shards.append(plan)
    done = {shard.file for shard in shards} if complete else set()
    write_json(root / MANIFEST_NAME, make_manifest(shards=shards, done_shards=done, statuses=statuses,
                                                   skipped=[], settings={}, input_dir="", fingerprint="",
                                                   versions={}))
    return lengths


def loader(data_dir, batch_size=4, seed=0, **kwargs):
    kwargs = {"process_index": 0, "process_count": 1, "worker_count": 0, "patch_size": PATCH,
              "shuffle_window": 8, **kwargs}
    return make_pretrain_loader(data_dir, "train", batch_size, seed, **kwargs)


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def clip_identities(batch: dict) -> list[tuple[int, list[int]]]:
    """(source, frame indices) of each clip of a batch."""
    clips = []
    for video in batch["video"]:
        ids = [frame_identity(frame) for frame in video]
        assert len({source for source, _ in ids}) == 1
        clips.append((ids[0][0], [index for _, index in ids]))
    return clips


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[int, int]]:
    root = tmp_path_factory.mktemp("clips")
    return root, write_dataset(root, [[40, 33, 64], [50, 90, 36], [48, 41], [70, 34, 45]])


# --- temporal sampling ------------------------------------------------------------------------------------

def test_long_clips_take_every_second_frame_from_any_valid_start():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(400):
        indices = pretraining_clip(40, 16, 2, rng)
        np.testing.assert_array_equal(np.diff(indices), 2)
        starts.add(int(indices[0]))
    assert starts == set(range(0, 40 - 32 + 1))
    np.testing.assert_array_equal(pretraining_clip(32, 16, 2, rng), np.arange(0, 32, 2))


def test_short_clips_take_the_first_frames_or_repeat_the_last():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(pretraining_clip(27, 16, 2, rng), np.arange(16))
    np.testing.assert_array_equal(pretraining_clip(17, 16, 2, rng), np.arange(16))
    np.testing.assert_array_equal(pretraining_clip(16, 16, 2, rng), np.arange(16))
    np.testing.assert_array_equal(pretraining_clip(15, 16, 2, rng), list(range(15)) + [14])
    np.testing.assert_array_equal(pretraining_clip(1, 16, 2, rng), np.zeros(16))
    with pytest.raises(ValueError, match="0 frames"):
        pretraining_clip(0, 16, 2, rng)


# --- what the loader yields -------------------------------------------------------------------------------

def test_batches_hold_sampled_clips_and_their_occupancy(dataset):
    root, lengths = dataset
    batches = take(loader(root), 3)
    for batch in batches:
        assert batch["video"].shape == (4, 16, SIDE, SIDE, 3) and batch["video"].dtype == np.uint8
        assert batch["occupancy"].shape == (4, 8, SIDE // PATCH, SIDE // PATCH, 11)
        assert batch["occupancy"].dtype == bool
        for (source, indices), occupancy in zip(clip_identities(batch), batch["occupancy"]):
            assert np.all(np.diff(indices) == 2) and indices[-1] < lengths[source]
            maps = np.stack([region_map(i) for i in indices])
            expected = masking.occupancy_from_region_maps(maps, PATCH, 2, np.array([face_found(i)
                                                                                    for i in indices]))
            np.testing.assert_array_equal(occupancy, expected)


def test_decoding_matches_decoding_every_map_of_previously_encoded_shards():
    # Shards written before used libpng's adaptive row filters; DecodeClip now reads only the tubelets' first
    # maps. Both must give the pixels, maps and occupancy of decoding everything.
    rng = np.random.default_rng(0)
    maps = [np.repeat(np.repeat(rng.integers(0, masking.NUM_LABELS, (8, 8)), 8, 0), 8, 1).astype(np.uint8)
            for _ in range(16)]
    found = np.array([index % 3 != 1 for index in range(16)])
    frames = [codecs.encode_jpeg(frame_image(1, index)) for index in range(16)]
    expected_occupancy = masking.occupancy_from_region_maps(np.stack(maps), PATCH, 2, has_map=found)
    previous_png = [cv2.imencode(".png", labels, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes() for labels in maps]
    for encoded in (previous_png, [codecs.encode_label_map(labels) for labels in maps]):
        np.testing.assert_array_equal([codecs.decode_label_map(data) for data in encoded], maps)
        clip = DecodeClip(PATCH, 2).map({"frames_jpeg": frames, "region_maps_png": encoded, "face_found": found})
        np.testing.assert_array_equal(clip["video"], [codecs.decode_jpeg(data) for data in frames])
        np.testing.assert_array_equal(clip["occupancy"], expected_occupancy)


def test_short_records_are_cut_or_padded(tmp_path):
    write_dataset(tmp_path, [[15, 27]])
    clips = [clip for batch in loader(tmp_path, 1, shuffle=False, num_epochs=1)
             for clip in clip_identities(batch)]
    assert clips == [(0, list(range(15)) + [14]), (1, list(range(16)))]


def test_epochs_see_every_record_once_each_in_new_orders(dataset):
    root, lengths = dataset
    sources = [clip[0] for batch in loader(root, 1, num_epochs=2) for clip in clip_identities(batch)]
    # Interleaving and the shuffle window blend neighbouring epochs, so count over both.
    assert sorted(sources) == sorted(2 * list(lengths))
    assert sources[:len(lengths)] != sources[len(lengths):]


def test_seed_decides_the_stream(dataset):
    root, _ = dataset
    same = [take(loader(root, seed=3), 2) for _ in range(2)]
    other = take(loader(root, seed=4), 2)
    for a, b in zip(*same):
        np.testing.assert_array_equal(a["video"], b["video"])
    assert any(not np.array_equal(a["video"], c["video"]) for a, c in zip(same[0], other))


def test_hosts_read_disjoint_shards(dataset):
    root, lengths = dataset
    seen = []
    for host in range(2):
        batches = loader(root, 2, process_index=host, process_count=2, num_epochs=1, shuffle=False)
        seen.append({clip[0] for batch in batches for clip in clip_identities(batch)})
        assert all(len(batch["video"]) == 1 for batch in
                   loader(root, 2, process_index=host, process_count=2, num_epochs=1))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(lengths)
    with pytest.raises(ValueError, match="not divisible"):
        loader(root, 3, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="fewer than the 8 processes"):
        loader(root, 8, process_index=0, process_count=8)


def _corrupt_counts(state) -> int:
    if isinstance(state, dict):
        return sum(value if key == "corrupt_records" else _corrupt_counts(value) for key, value in state.items())
    if isinstance(state, (list, tuple)):
        return sum(_corrupt_counts(value) for value in state)
    return 0


def test_corrupt_records_are_skipped_and_counted(tmp_path):
    write_dataset(tmp_path, [[40, 40, 40]])
    shard = tmp_path / shard_file_name("train", 0, 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the middle record's data
    shard.write_bytes(bytes(data))
    iterator = loader(tmp_path, 1, shuffle=False, num_epochs=1)
    assert [clip[0] for batch in iterator for clip in clip_identities(batch)] == [0, 2]
    assert _corrupt_counts(iterator.get_state()) == 1


def test_unfinished_build_is_refused(tmp_path):
    write_dataset(tmp_path, [[40]], complete=False)
    with pytest.raises(ValueError, match="unfinished"):
        loader(tmp_path)


# --- exact resume ---------------------------------------------------------------------------------------

def _assert_resumes_exactly(root: Path, worker_count: int, before: int, after: int) -> None:
    original = loader(root, worker_count=worker_count)
    take(original, before)
    state = json.loads(json.dumps(original.get_state()))  # as a checkpoint stores it
    expected = take(original, after)
    restored = loader(root, worker_count=worker_count)
    restored.set_state(state)
    resumed = take(restored, after)
    for got, want in zip(resumed, expected):
        np.testing.assert_array_equal(got["video"], want["video"])
        np.testing.assert_array_equal(got["occupancy"], want["occupancy"])
    if worker_count:
        original.close()
        restored.close()


def test_restored_state_replays_the_same_batches(dataset):
    root, _ = dataset
    _assert_resumes_exactly(root, worker_count=0, before=3, after=5)  # crosses an epoch (11 records)


@pytest.mark.slow
def test_restored_state_replays_the_same_batches_with_worker_processes(dataset):
    root, _ = dataset
    _assert_resumes_exactly(root, worker_count=2, before=3, after=4)
