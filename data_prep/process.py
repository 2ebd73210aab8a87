"""One source -> its clip records in a part file, plus a JSON status: the unit of work of a build.

Frames stream from the decoder through the face cropper, which holds only the few it still needs, and are
encoded as they come out; a segment gathers only the encoded crops for its record. So memory stays small
whatever the source's length or resolution.

The part file appears (renamed into place, or its upload finalised) only once every segment is written, and
the status file after it, so a status file is the proof that the source is finished. A source that cannot be
decoded, or shows no face in any frame, gets a `failed` status with the reason and no part file; any other
exception is a bug and propagates.
"""

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Protocol

import av
import cv2
import numpy as np
from etils import epath

from data_prep import frames as frame_io
from data_prep.sources import Source
from marlin_jax import storage
from marlin_jax.data import codecs
from marlin_jax.data.schema import ClipRecord, serialize_clip
from marlin_jax.data.tfrecord import RecordWriter
from marlin_jax.faces import FrameCrop, NoFaceError
from marlin_jax.video import video_fps

# A build gets its parallelism from worker processes, one per core; FFmpeg's own threads would only compete with
# them (and cost about 10% more CPU per frame even alone).
DECODE_THREADS = 1
# What a broken, unreadable or faceless source raises (NoFaceError and marlin_jax.video's VideoDecodeError, which a
# missing or unreadable video file gives, are ValueErrors). OSError is left out on purpose: a full disk must stop
# the build.
SOURCE_ERRORS = (av.FFmpegError, ValueError, cv2.error)


class Cropper(Protocol):
    def iter_video(self, frames: Iterator[np.ndarray]) -> Iterator[FrameCrop]: ...


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    layout: str
    segment_frames: int
    jpeg_quality: int


def status_path(part_path: epath.Path) -> epath.Path:
    return part_path.with_suffix(".json")


def read_status(part_path: epath.Path) -> dict | None:
    """The finished source's status, or None when it is not finished."""
    path = status_path(part_path)
    return json.loads(path.read_text()) if path.is_file() else None


def process_source(source: Source, part_path: epath.Path, cropper: Cropper, settings: EncodeSettings) -> dict:
    """Crops, encodes and writes one source; returns (and stores next to the part) its status."""
    start = time.perf_counter()
    part_path.parent.mkdir(parents=True, exist_ok=True)
    counts = {"num_frames": 0, "num_records": 0, "stored_frames": 0, "frames_with_face": 0,
              "segments_without_face": 0}
    try:
        with storage.write_once(part_path) as file, RecordWriter(file) as writer:
            _write_segments(source, cropper, settings, writer, counts)
            if counts["num_records"] == 0:
                raise NoFaceError("no face found in any frame")
        status = {"status": "ok", **counts}
    except SOURCE_ERRORS as error:
        part_path.unlink(missing_ok=True)
        status = {"status": "failed", "reason": f"{type(error).__name__}: {error}", **counts}
    status = {"source_id": source.source_id, "split": source.split, **status,
              "seconds": round(time.perf_counter() - start, 3)}
    storage.write_json(status_path(part_path), status)
    return status


@dataclasses.dataclass(frozen=True)
class _EncodedFrame:
    jpeg: bytes
    png: bytes
    face_found: bool
    box: np.ndarray
    size: tuple[int, int]


def _encoded(crops: Iterator[FrameCrop], jpeg_quality: int) -> Iterator[_EncodedFrame]:
    """Each crop encoded as it comes. A segment then holds kilobytes per frame; holding the crops instead
    tripled the worker's memory on 720p video, each kept crop splitting a freed full-size frame."""
    for crop in crops:
        yield _EncodedFrame(jpeg=codecs.encode_jpeg(crop.frame, jpeg_quality),
                            png=codecs.encode_label_map(crop.region_map), face_found=bool(crop.face_found),
                            box=np.asarray(crop.box, dtype=np.float32), size=crop.frame.shape[:2])


def _write_segments(source: Source, cropper: Cropper, settings: EncodeSettings, writer: RecordWriter,
                    counts: dict) -> None:
    if settings.layout == "videos":
        fps = video_fps(source.path)
        frames = frame_io.iter_video_frames(source.path, threads=DECODE_THREADS)
    else:
        fps, frames = 0.0, frame_io.iter_image_folder_frames(source.path)
    encoded = _encoded(cropper.iter_video(frames), settings.jpeg_quality)
    for segment_index, (first_frame, segment) in enumerate(frame_io.iter_segments(encoded,
                                                                                  settings.segment_frames)):
        counts["num_frames"] += len(segment)
        frames_with_face = sum(frame.face_found for frame in segment)
        if not frames_with_face:
            counts["segments_without_face"] += 1
            continue
        writer.write(serialize_clip(_clip_record(source, segment, fps, segment_index, first_frame)))
        counts["num_records"] += 1
        counts["stored_frames"] += len(segment)
        counts["frames_with_face"] += frames_with_face


def _clip_record(source: Source, segment: list[_EncodedFrame], fps: float, segment_index: int,
                 first_frame: int) -> ClipRecord:
    height, width = segment[0].size
    return ClipRecord(
        frames_jpeg=[frame.jpeg for frame in segment],
        region_maps_png=[frame.png for frame in segment],
        face_found=np.array([frame.face_found for frame in segment]),
        boxes=np.stack([frame.box for frame in segment]),
        height=height, width=width, fps=fps, source_id=source.source_id, segment_index=segment_index,
        first_frame=first_frame, split=source.split)
