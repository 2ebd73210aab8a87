"""tf.data reads the shards data_prep writes (every CRC checked) and parses them as the README's spec says; we
read the TFRecord files TensorFlow writes. TensorFlow runs in its own interpreter (tests/tfdata_crossread.py),
so the project's install stays free of it; see the `tfdata_python` fixture."""

import hashlib
import json
import pathlib
import subprocess

import numpy as np
import pytest

from marlin_jax.data import codecs, schema
from marlin_jax.data.shards import load_manifest
from marlin_jax.data.tfrecord import read_records

pytestmark = pytest.mark.slow

SCRIPT = pathlib.Path(__file__).with_name("tfdata_crossread.py")
PAYLOADS = [b"", b"x" * 70000, bytes(range(256))]


@pytest.fixture(scope="module")
def demo_shards(small_demo_shards) -> list[pathlib.Path]:
    """The session's demo shards (train and val), read only."""
    return [small_demo_shards / shard["file"] for shard in load_manifest(small_demo_shards)["shards"]]


def _digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


def _as_tensorflow_parses_it(record: schema.ClipRecord) -> dict:
    """Our parse of a record in the script's output form: lists of values, bytes as digests."""
    return {
        schema.FRAMES: [_digest(frame) for frame in record.frames_jpeg],
        schema.REGION_MAPS: [_digest(region_map) for region_map in record.region_maps_png],
        schema.FACE_FOUND: record.face_found.astype(int).tolist(),
        schema.BOXES: record.boxes.ravel().tolist(),
        schema.NUM_FRAMES: [record.num_frames], schema.HEIGHT: [record.height], schema.WIDTH: [record.width],
        schema.FPS: [float(np.float32(record.fps))],
        schema.SOURCE_ID: [_digest(record.source_id.encode())],
        schema.SEGMENT_INDEX: [record.segment_index], schema.FIRST_FRAME: [record.first_frame],
        schema.SPLIT: [_digest(record.split.encode())],
    }


def _damaged_copy(shard: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    """The shard with one byte of its first record's data flipped (its framing header is 12 bytes)."""
    data = bytearray(shard.read_bytes())
    data[12 + 50] ^= 0xFF
    destination.write_bytes(bytes(data))
    return destination


def test_tfdata_reads_our_shards_and_we_read_its_files(demo_shards, tfdata_python, tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(schema.FEATURE_SPEC_DOC))
    (tmp_path / "payloads.json").write_text(json.dumps([payload.hex() for payload in PAYLOADS]))
    damaged = _damaged_copy(demo_shards[0], tmp_path / "damaged.tfrecord")
    command = [tfdata_python, str(SCRIPT), *map(str, demo_shards), "--spec", str(tmp_path / "spec.json"),
               "--payloads", str(tmp_path / "payloads.json"), "--corrupt", str(damaged),
               "--output", str(tmp_path / "tf")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "tf" / "records.json").read_text())

    ours = [schema.parse_clip(data) for shard in demo_shards for data in read_records(shard)]
    assert len(summary["records"]) == len(ours) == 6
    for record, parsed in zip(ours, summary["records"]):
        assert parsed == _as_tensorflow_parses_it(record), record.source_id
    # JPEG decoders differ slightly in IDCT and chroma upsampling, hence a mean, not exact equality.
    first_frames = np.load(tmp_path / "tf" / "first_frames.npy").astype(int)
    for record, theirs in zip(ours, first_frames):
        assert np.abs(theirs - codecs.decode_jpeg(record.frames_jpeg[0])).mean() < 1, record.source_id
    assert summary["corrupt_file_raised_data_loss"], "tf.data read a damaged record without a CRC error"
    assert read_records(tmp_path / "tf" / "tf_written.tfrecord") == PAYLOADS
