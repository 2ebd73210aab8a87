"""Frames of a source, decoded in order, segments that bound record size, and frames encoded as an mp4.

Videos are decoded by `marlin_jax.video` and encoded here, both with PyAV (FFmpeg), decoding on `threads`
threads; YouTube Faces folders are read image by image in natural order (`1.10.jpg` after `1.9.jpg`; the
official loader sorts names as strings). Both may sit in a bucket (`etils.epath`; a remote video is read through
a file object).
"""

import fractions
import io
import itertools
import re
from collections.abc import Iterable, Iterator
from typing import TypeVar

import av
import cv2
import numpy as np
from etils import epath

from marlin_jax.video import decoded_frames

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# H.264 constant-quality factor of the videos made here: visually lossless on face crops, a few MB a minute at 224 px.
DEFAULT_CRF = 18
T = TypeVar("T")


def iter_video_frames(path: str, threads: int = 0) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB frames of the first video stream; `threads` 0 lets FFmpeg choose (one per core)."""
    for frame in decoded_frames(path, threads):
        yield frame.to_ndarray(format="rgb24")


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def iter_image_folder_frames(folder: str) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB frames from the images of a folder, in natural name order."""
    folder = epath.Path(folder)
    names = sorted((path.name for path in folder.iterdir() if path.suffix.lower() in _IMAGE_EXTENSIONS),
                   key=_natural_key)
    for name in names:
        image = cv2.imdecode(np.frombuffer((folder / name).read_bytes(), np.uint8), cv2.IMREAD_COLOR_RGB)
        if image is None:
            raise ValueError(f"cannot decode the image {folder / name}")
        yield image


def iter_segments(items: Iterator[T], segment_frames: int) -> Iterator[tuple[int, list[T]]]:
    """(first frame index, items) segments of `segment_frames` consecutive frames' items.

    A remainder shorter than half a segment joins the last segment, so no record is a stub: segments hold
    between `segment_frames // 2` and `segment_frames * 3 // 2` frames (all of a shorter source).
    Raises ValueError when there are no frames.
    """
    if segment_frames < 2:
        raise ValueError(f"segment_frames must be at least 2, got {segment_frames}")
    buffer: list[T] = []
    first = 0
    for item in items:
        buffer.append(item)
        if len(buffer) == segment_frames + segment_frames // 2:
            yield first, buffer[:segment_frames]
            first += segment_frames
            buffer = buffer[segment_frames:]
    if not buffer and first == 0:
        raise ValueError("no frames could be decoded")
    if buffer:
        yield first, buffer


def encode_mp4(frames: Iterable[np.ndarray], fps: float, crf: int = DEFAULT_CRF) -> bytes:
    """An H.264 mp4 (yuv420p) of (H, W, 3) uint8 RGB frames of one size with even sides, built in memory (so it can
    be written whole to a disk or a bucket). Frames are encoded as they come. Raises ValueError without frames."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("no frames to encode")
    if fps <= 0:
        raise ValueError(f"cannot encode a video at {fps} frames per second")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        # NTSC rates (30000/1001) come back from their float exactly; integer rates stay integers.
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in itertools.chain([first], frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()
