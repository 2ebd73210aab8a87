"""Frames of a source, decoded in order, and segments that bound record size.

Videos are decoded by `marlin_jax.video` (PyAV), with FFmpeg's frame/slice threading on `threads` threads; YouTube Faces folders
are read image by image in natural order (`1.10.jpg` after `1.9.jpg`; the official loader sorts names as
strings). Both may sit in a bucket (`etils.epath`; a remote video is read through a file object).
"""

import re
from collections.abc import Iterator
from typing import TypeVar

import cv2
import numpy as np
from etils import epath

from marlin_jax.video import decoded_frames

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
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
