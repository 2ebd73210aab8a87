"""Video files -> frames, and the three ways MARLIN picks a clip's frames, each named for its use.

Decoding is PyAV (FFmpeg) for every reader in the project: data_prep, fine-tuning and feature extraction.
Frames are counted by decoding them, not from the container's `nb_frames` (the official code reads it with
ffprobe, crashes where a container does not store it, often .webm/.mkv, and silently drops clips when OpenCV
decodes fewer frames than it claims). Decoded pixels equal OpenCV's (both are FFmpeg).

The samplers, with `span = clip_frames * sample_rate` (32 for the official 16 frames at stride 2):

- `pretraining_clip`: a stored clip of `available` frames gives `clip_frames` frames at stride `sample_rate`
  from a start drawn uniformly in [0, available - span] (the official `util.misc.sample_indexes`); a clip
  shorter than `span` but longer than `clip_frames` gives its first `clip_frames` frames; a shorter one gives
  every frame, the last repeated up to `clip_frames`.
- `finetuning_clip`: the official fine-tuning sampler (dataset/celebv_hq.py): a start drawn uniformly in
  [0, N - clip_frames * rate], where a video too short for the stride uses the largest rate that fits,
  N // clip_frames; a video of at most `clip_frames` frames is taken whole and padded with its last frame.
- `extraction_windows`: the official `extract_video` schedule. N <= 16: one clip, padded with the last frame;
  16 < N <= span: one clip of the first 16 frames; longer: clips of every `sample_rate`-th frame starting at
  0, stride * sample_rate, ... while start < N - span. The bound is strict, as in the official code: a clip
  that ends on the video's last frame, or one frame before, is not taken (a 64-frame video gives one clip).
  In the 16 < N <= 32 branch the official code computes a padded clip and then discards it, so a video whose
  metadata over-counts its frames there gives a clip shorter than 16 frames; here a clip is padded whenever
  fewer than 16 frames were decoded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import av
import numpy as np

from marlin_jax import storage

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")

logger = logging.getLogger(__name__)
Frame = TypeVar("Frame")


class VideoDecodeError(ValueError):
    """A video file that cannot be opened or decoded, or that has no frames."""


@contextlib.contextmanager
def _open(path) -> Iterator[av.container.InputContainer]:
    """An av container; local files by name (FFmpeg reads them itself), remote ones through a file object that
    fetches blocks as FFmpeg asks for them (`storage.readable_source`), closed with the container."""
    with contextlib.ExitStack() as stack:
        try:
            container = av.open(stack.enter_context(storage.readable_source(path)))
        except (av.FFmpegError, OSError) as error:
            raise VideoDecodeError(f"cannot open {path}: {_reason(error)}") from error
        with container:
            yield container


def _reason(error: Exception) -> str:
    # FFmpeg errors print as "[Errno N] reason: 'path'"; the path is already in our message.
    return getattr(error, "strerror", None) or str(error)


def decoded_frames(path, threads: int = 0) -> Iterator[av.VideoFrame]:
    """Every frame of the first video stream, in order; VideoDecodeError names the file and FFmpeg's reason.
    FFmpeg decodes on `threads` threads (0: one per core)."""
    with _open(path) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        try:
            yield from container.decode(stream)
        except av.FFmpegError as error:
            raise VideoDecodeError(f"cannot decode {path}: {_reason(error)}") from error


def video_fps(path) -> float:
    """Average frame rate of the first video stream; 0.0 when the container does not say."""
    with _open(path) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return float(rate) if rate else 0.0


def rgb_frame(frame: av.VideoFrame, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, resized to size x size when given. At the frame's own size the pixels are those
    OpenCV reads (swscale's unscaled conversion, whatever the interpolation flag)."""
    return frame.to_ndarray(format="rgb24", width=size, height=size, interpolation="BICUBIC")


def rgb_frames(path, size: int | None = None) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB frames of a video file, resized to size x size when given."""
    for frame in decoded_frames(path):
        yield rgb_frame(frame, size)


# --- pretraining ---------------------------------------------------------------------------------------------

def pretraining_clip(available: int, clip_frames: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """(clip_frames,) int64 indices into a stored clip of `available` frames (see the module docstring)."""
    if available < 1:
        raise ValueError(f"cannot sample a clip from {available} frames")
    if clip_frames < 1 or sample_rate < 1:
        raise ValueError(f"clip_frames and sample_rate must be positive, got {clip_frames} and {sample_rate}")
    span = clip_frames * sample_rate
    if available >= span:
        start = rng.integers(0, available - span + 1)
        return start + np.arange(clip_frames, dtype=np.int64) * sample_rate
    if available > clip_frames:
        return np.arange(clip_frames, dtype=np.int64)
    return np.minimum(np.arange(clip_frames, dtype=np.int64), available - 1)


# --- fine-tuning -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClipSettings:
    clip_frames: int = 16
    sample_rate: int = 2
    size: int = 224


def finetuning_clip(num_frames: int, settings: ClipSettings, rng: np.random.Generator) -> np.ndarray:
    """Frame indices (clip_frames,) of one fine-tuning clip of a `num_frames`-frame video."""
    length = settings.clip_frames
    if num_frames <= length:
        return np.minimum(np.arange(length), num_frames - 1)
    rate = min(settings.sample_rate, num_frames // length)
    start = rng.integers(0, num_frames - length * rate + 1)
    return start + rate * np.arange(length)


def read_finetuning_clip(path, settings: ClipSettings, rng: np.random.Generator) -> np.ndarray:
    """(clip_frames, size, size, 3) uint8 RGB; the whole video is decoded (N is the decoded count) and only the
    chosen frames are converted and resized (not cropped) to `size`. VideoDecodeError names a bad file."""
    frames = list(decoded_frames(path))
    if not frames:
        raise VideoDecodeError(f"{path} has no decodable frames")
    indices = finetuning_clip(len(frames), settings, rng)
    pixels = {index: rgb_frame(frames[index], settings.size) for index in set(indices.tolist())}
    return np.stack([pixels[index] for index in indices.tolist()])


# --- feature extraction --------------------------------------------------------------------------------------

def extraction_windows(frames: Iterable[Frame], to_array: Callable[[Frame], np.ndarray], clip_frames: int = 16,
                       sample_rate: int = 2, stride: int = 16) -> Iterator[np.ndarray]:
    """Clips (clip_frames, ...) of the module docstring's schedule, streamed: memory holds at most two clips.

    `to_array` runs only on the frames a clip can use. A clip starting at s is due once frame s + span exists
    (span = clip_frames * sample_rate), which is the official `start < N - span` without knowing N in advance.
    """
    span = clip_frames * sample_rate
    head: list[np.ndarray] = []
    recent: collections.deque[np.ndarray] = collections.deque(maxlen=clip_frames)
    count = 0
    for index, frame in enumerate(frames):
        count = index + 1
        if index >= span and (index - span) % (stride * sample_rate) == 0:
            yield np.stack(recent)
        if index < clip_frames or index % sample_rate == 0:
            array = to_array(frame)
            if index < clip_frames:
                head.append(array)
            if index % sample_rate == 0:
                recent.append(array)
    if 0 < count <= span:
        yield np.stack(head + head[-1:] * (clip_frames - len(head)))


def video_windows(path, clip_frames: int = 16, size: int | None = None, sample_rate: int = 2,
                  stride: int = 16) -> Iterator[np.ndarray]:
    """A video file -> its extraction clips (clip_frames, H, W, 3) uint8, resized to size x size when given."""
    frames = decoded_frames(path)
    first = next(frames, None)
    if first is None:
        raise VideoDecodeError(f"{path} has no decodable video frames")
    if size is not None and (first.width, first.height) != (size, size):
        logger.info("%s: resizing %dx%d frames to %dx%d", path, first.width, first.height, size, size)
    yield from extraction_windows(itertools.chain([first], frames), functools.partial(rgb_frame, size=size),
                                  clip_frames, sample_rate, stride)
