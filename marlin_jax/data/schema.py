"""The `tf.train.Example` schema of one stored face clip (a whole video, or one segment of a long one).

Built and parsed with tensorflow-datasets' copy of the protos, so nothing here needs TensorFlow; TensorFlow
reads the same records with `tf.io.parse_single_example` and `FEATURE_SPEC_DOC` below.

| key                 | type          | what                                                            |
|---------------------|---------------|-----------------------------------------------------------------|
| video/frames        | bytes  x T    | JPEG, RGB, face crops of `height` x `width`                     |
| video/region_maps   | bytes  x T    | PNG, 8-bit grey, face-region labels 0..10 (`marlin_jax.masking`)|
| video/face_found    | int64  x T    | 1 where a face was found in the frame, else 0 (map is all 0)   |
| video/boxes         | float  x 4T   | per-frame face box as `FaceCropper` reports it, row-major (T,4) |
| video/num_frames    | int64         | T                                                               |
| video/height, width | int64         | crop size in pixels                                             |
| video/fps           | float         | source frame rate; 0 when unknown (image-folder datasets)       |
| video/source_id     | bytes         | the source, relative to the input dir (a file, or person/n)     |
| video/segment_index | int64         | which segment of the source this record is (0 for most)         |
| video/first_frame   | int64         | index of this record's first frame in the source                |
| video/split         | bytes         | "train" or "val"                                                |
"""

import dataclasses

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

FRAMES = "video/frames"
REGION_MAPS = "video/region_maps"
FACE_FOUND = "video/face_found"
BOXES = "video/boxes"
NUM_FRAMES = "video/num_frames"
HEIGHT = "video/height"
WIDTH = "video/width"
FPS = "video/fps"
SOURCE_ID = "video/source_id"
SEGMENT_INDEX = "video/segment_index"
FIRST_FRAME = "video/first_frame"
SPLIT = "video/split"

# For a `tf.io.parse_single_example` reader: key -> (kind, length), length None meaning variable.
FEATURE_SPEC_DOC = {
    FRAMES: ("bytes", None), REGION_MAPS: ("bytes", None), FACE_FOUND: ("int64", None),
    BOXES: ("float", None), NUM_FRAMES: ("int64", 1), HEIGHT: ("int64", 1), WIDTH: ("int64", 1),
    FPS: ("float", 1), SOURCE_ID: ("bytes", 1), SEGMENT_INDEX: ("int64", 1), FIRST_FRAME: ("int64", 1),
    SPLIT: ("bytes", 1),
}


@dataclasses.dataclass(frozen=True)
class ClipRecord:
    """One stored clip, frames and maps still encoded."""

    frames_jpeg: list[bytes]
    region_maps_png: list[bytes]
    face_found: np.ndarray  # (T,) bool
    boxes: np.ndarray  # (T, 4) float32
    height: int
    width: int
    fps: float
    source_id: str
    segment_index: int
    first_frame: int
    split: str

    @property
    def num_frames(self) -> int:
        return len(self.frames_jpeg)

    def __post_init__(self):
        count = len(self.frames_jpeg)
        if count == 0:
            raise ValueError(f"{self.source_id}: a clip record needs at least one frame")
        if (len(self.region_maps_png) != count or self.face_found.shape != (count,)
                or self.boxes.shape != (count, 4)):
            raise ValueError(f"{self.source_id}: per-frame fields disagree on the frame count: {count} frames, "
                             f"{len(self.region_maps_png)} maps, face_found {self.face_found.shape}, "
                             f"boxes {self.boxes.shape}")


def _bytes(*values: bytes) -> tf_feature_pb2.Feature:
    return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=values))


def _ints(*values: int) -> tf_feature_pb2.Feature:
    return tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=values))


def _floats(*values: float) -> tf_feature_pb2.Feature:
    return tf_feature_pb2.Feature(float_list=tf_feature_pb2.FloatList(value=values))


def serialize_clip(record: ClipRecord) -> bytes:
    """A `ClipRecord` as serialized `tf.train.Example` bytes."""
    features = {
        FRAMES: _bytes(*record.frames_jpeg),
        REGION_MAPS: _bytes(*record.region_maps_png),
        FACE_FOUND: _ints(*record.face_found.astype(np.int64).tolist()),
        BOXES: _floats(*record.boxes.astype(np.float32).ravel().tolist()),
        NUM_FRAMES: _ints(record.num_frames),
        HEIGHT: _ints(record.height),
        WIDTH: _ints(record.width),
        FPS: _floats(record.fps),
        SOURCE_ID: _bytes(record.source_id.encode()),
        SEGMENT_INDEX: _ints(record.segment_index),
        FIRST_FRAME: _ints(record.first_frame),
        SPLIT: _bytes(record.split.encode()),
    }
    example = tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=features))
    # deterministic: the features are a protobuf map, which is otherwise written in an order that changes from
    # process to process; sorted, a clip gives the same bytes in any worker, so rebuilt shards are identical.
    return example.SerializeToString(deterministic=True)


def parse_clip(data: bytes) -> ClipRecord:
    """Serialized `tf.train.Example` bytes -> `ClipRecord`; ValueError when a field is missing or malformed."""
    example = tf_example_pb2.Example.FromString(data)
    feature = example.features.feature
    missing = [key for key in FEATURE_SPEC_DOC if key not in feature]
    if missing:
        raise ValueError(f"clip record lacks the features {missing}")

    def single(key: str, kind: str):
        values = getattr(feature[key], kind).value
        if len(values) != 1:
            raise ValueError(f"clip record feature {key} must hold one value, got {len(values)}")
        return values[0]

    record = ClipRecord(
        frames_jpeg=list(feature[FRAMES].bytes_list.value),
        region_maps_png=list(feature[REGION_MAPS].bytes_list.value),
        face_found=np.asarray(feature[FACE_FOUND].int64_list.value, dtype=np.int64) != 0,
        boxes=np.asarray(feature[BOXES].float_list.value, dtype=np.float32).reshape(-1, 4),
        height=single(HEIGHT, "int64_list"),
        width=single(WIDTH, "int64_list"),
        fps=single(FPS, "float_list"),
        source_id=single(SOURCE_ID, "bytes_list").decode(),
        segment_index=single(SEGMENT_INDEX, "int64_list"),
        first_frame=single(FIRST_FRAME, "int64_list"),
        split=single(SPLIT, "bytes_list").decode(),
    )
    if single(NUM_FRAMES, "int64_list") != record.num_frames:
        raise ValueError(f"{record.source_id}: num_frames says {single(NUM_FRAMES, 'int64_list')} but the "
                         f"record holds {record.num_frames} frames")
    return record
