"""Video files -> MARLIN features: PyAV decoding, the official window schedule, windows of many videos batched.

    from marlin_jax import Marlin
    from marlin_jax.video_features import extract_video_features
    model = Marlin.from_file("marlin_vit_base_ytf", "marlin_vit_base_ytf.encoder.pt")
    features = extract_video_features(model, "face_clip.mp4")     # (clips, 768)

Clip (window) schedule: that of `marlin_pytorch`'s `Marlin.extract_video`. A video of N decoded frames gives
clips of `clip_frames` (16) frames:
- N <= 16: one clip, all frames, padded to 16 by repeating the last frame;
- 16 < N <= 16 * sample_rate: one clip, the first 16 frames (consecutive, not subsampled);
- longer: clips of every `sample_rate`-th frame, starting at 0, stride * sample_rate, 2 * stride * sample_rate,
  ... while start < N - 16 * sample_rate. The bound is strict, as in the official code: a clip that ends on
  the video's last frame, or one frame before, is not taken (at the defaults a 64-frame video gives one clip).

Differences from the official implementation:
- Frames are counted by decoding them (PyAV), not from the container's `nb_frames` (ffprobe). The official
  code crashes where a container does not store `nb_frames` (often .webm/.mkv), reads the first stream even
  when it is audio, and silently drops clips when OpenCV decodes fewer frames than `nb_frames` claims.
- In the 16 < N <= 32 branch the official code computes a padded clip and then discards it, so a video whose
  metadata over-counts its frames there gives a clip shorter than 16 frames. Here a clip is padded whenever
  fewer than 16 frames were decoded.
- The official code asserts 224x224 frames. Here frames of another size are resized (not cropped) to the
  model's `img_size` square with swscale's bicubic filter, which distorts non-square videos: pass
  `crop_face=True` for raw footage. With `crop_face`, each clip's frames are cropped by `FaceCropper`, whose
  crop squares are smoothed over the clip's frames (the official crops every frame on its own); a clip in
  which no frame has a face fails the whole video (the official crops an empty corner instead).
Decoded pixels equal OpenCV's (both are FFmpeg), and are scaled to [0, 1] as frame / 255.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import av
import jax
import numpy as np
import tqdm

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.model import encode_clips

if TYPE_CHECKING:  # marlin.py's Marlin.extract_video imports this module
    from marlin_jax.marlin import Marlin

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
REDUCTIONS = ("none", "mean", "max")

logger = logging.getLogger(__name__)
Frame = TypeVar("Frame")


class VideoDecodeError(ValueError):
    """A video file that cannot be opened or decoded, or that has no frames."""


@dataclasses.dataclass(frozen=True)
class ExtractionOptions:
    """How clips are cut from a video and what comes back per video.

    keep_seq: per-clip token features (clips, tokens, D) instead of mean-pooled (clips, D).
    reduction: "none" keeps one row per clip; "mean" / "max" reduce over clips, as the official extract_video.
    batch_size: clips per jitted call, gathered across videos; a last partial batch is padded to the next power
        of two, so XLA compiles at most 1 + log2(batch_size) shapes. None: default_batch_size().
    """

    crop_face: bool = False
    keep_seq: bool = False
    sample_rate: int = 2
    stride: int = 16
    reduction: str = "none"
    batch_size: int | None = None

    def __post_init__(self):
        counts = {"sample_rate": self.sample_rate, "stride": self.stride}
        if self.batch_size is not None:
            counts["batch_size"] = self.batch_size
        for name, value in counts.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")


def default_batch_size() -> int:
    """1 on CPU, where a batch of 4 ran slower per clip than single clips (the (B, heads, tokens, tokens)
    attention logits outgrow the caches, benchmarks/extract_throughput.py); 8 on GPU/TPU."""
    return 1 if jax.default_backend() == "cpu" else 8


@dataclasses.dataclass(frozen=True)
class VideoFeatures:
    """The features of one video, or why there are none."""

    path: pathlib.Path
    features: np.ndarray | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ExtractionSummary:
    written: list[pathlib.Path]
    failed: list[tuple[pathlib.Path, str]]


def decoded_frames(path: str | pathlib.Path) -> Iterator[av.VideoFrame]:
    """Every frame of the first video stream, in order; VideoDecodeError names the file and FFmpeg's reason."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as error:
        raise VideoDecodeError(f"cannot open {path}: {_reason(error)}") from error
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            yield from container.decode(stream)
        except av.FFmpegError as error:
            raise VideoDecodeError(f"cannot decode {path}: {_reason(error)}") from error


def _reason(error: Exception) -> str:
    # FFmpeg errors print as "[Errno N] reason: 'path'"; the path is already in our message.
    return getattr(error, "strerror", None) or str(error)


def schedule_windows(frames: Iterable[Frame], to_array: Callable[[Frame], np.ndarray], clip_frames: int = 16,
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


def rgb_frame(frame: av.VideoFrame, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, resized to size x size when given. At the frame's own size the pixels are those
    OpenCV reads (swscale's unscaled conversion, whatever the interpolation flag)."""
    return frame.to_ndarray(format="rgb24", width=size, height=size, interpolation="BICUBIC")


def video_windows(path: str | pathlib.Path, clip_frames: int = 16, size: int | None = None, sample_rate: int = 2,
                  stride: int = 16) -> Iterator[np.ndarray]:
    """A video file -> its clips (clip_frames, H, W, 3) uint8, frames resized to size x size when size is given."""
    frames = decoded_frames(path)
    first = next(frames, None)
    if first is None:
        raise VideoDecodeError(f"{path} has no decodable video frames")
    if size is not None and (first.width, first.height) != (size, size):
        logger.info("%s: resizing %dx%d frames to %dx%d", path, first.width, first.height, size, size)
    yield from schedule_windows(itertools.chain([first], frames), functools.partial(rgb_frame, size=size),
                                clip_frames, sample_rate, stride)


@functools.cache
def _face_cropper(size: int):
    # Imported here: MediaPipe's import and model load cost about a second, wasted without --crop-face.
    from marlin_jax.faces import FaceCropper
    return FaceCropper(size=size)


def model_windows(path: str | pathlib.Path, arch: MarlinArchitecture,
                  options: ExtractionOptions) -> Iterator[np.ndarray]:
    """Clips ready for the model: (num_frames, img_size, img_size, 3) uint8, face-cropped if asked."""
    size = None if options.crop_face else arch.img_size
    windows = video_windows(path, arch.num_frames, size, options.sample_rate, options.stride)
    if not options.crop_face:
        yield from windows
        return
    from marlin_jax.faces import NoFaceError
    cropper = _face_cropper(arch.img_size)
    for index, window in enumerate(windows):
        try:
            crops = cropper.process_video(window)
        except NoFaceError as error:
            raise NoFaceError(f"{path}, clip {index}: {error}") from error
        yield crops.frames


class _ClipBatcher:
    """Gathers clips of many videos into fixed-size batches and returns each video's rows once all are back.

    A batch runs asynchronously: its result is read only after the next batch is dispatched, so decoding and
    face cropping for the next batch overlap the model.
    """

    def __init__(self, model: Marlin, options: ExtractionOptions):
        self._params = model.device_params["encoder"]
        self._arch = model.architecture
        self._keep_seq = options.keep_seq
        self._batch_size = options.batch_size or default_batch_size()
        self._clips: list[np.ndarray] = []
        self._owners: list[int] = []
        self._in_flight: tuple[jax.Array, list[int]] | None = None
        self._rows: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._pending: collections.Counter[int] = collections.Counter()
        self._closed: list[int] = []

    def add(self, video: int, clip: np.ndarray) -> None:
        self._clips.append(clip)
        self._owners.append(video)
        self._pending[video] += 1
        if len(self._clips) == self._batch_size:
            self._dispatch()

    def close(self, video: int) -> None:
        """No more clips will come for this video."""
        self._closed.append(video)

    def discard(self, video: int) -> None:
        """Forget a failed video's clips, queued or in flight."""
        keep = [i for i, owner in enumerate(self._owners) if owner != video]
        self._clips = [self._clips[i] for i in keep]
        self._owners = [self._owners[i] for i in keep]
        self._rows.pop(video, None)
        self._pending.pop(video, None)

    def flush(self) -> None:
        if self._clips:
            self._dispatch()
        self._collect()

    def pop_finished(self) -> list[tuple[int, np.ndarray]]:
        done = [video for video in self._closed if not self._pending[video]]
        self._closed = [video for video in self._closed if self._pending[video]]
        return [(video, np.stack(self._rows.pop(video))) for video in done]

    def _dispatch(self) -> None:
        count = len(self._clips)
        padded = min(self._batch_size, 1 << (count - 1).bit_length())
        clips = np.stack(self._clips + [np.zeros_like(self._clips[0])] * (padded - count))
        result = encode_clips(self._params, clips, self._arch, self._keep_seq)
        self._collect()
        self._in_flight = (result, self._owners)
        self._clips, self._owners = [], []

    def _collect(self) -> None:
        if self._in_flight is None:
            return
        result, owners = self._in_flight
        self._in_flight = None
        for row, owner in zip(np.asarray(result), owners):
            if owner in self._pending:
                self._rows[owner].append(row)
                self._pending[owner] -= 1


def _reduce(features: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "mean":
        return features.mean(axis=0)
    if reduction == "max":
        return features.max(axis=0)
    return features


def extract_videos(model: Marlin, paths: Sequence[str | pathlib.Path], options: ExtractionOptions = ExtractionOptions(),
                   progress: bool = False) -> Iterator[VideoFeatures]:
    """Features of each video, in the order they finish; a video that fails comes back with its error."""
    paths = [pathlib.Path(p) for p in paths]
    batcher = _ClipBatcher(model, options)
    with tqdm.tqdm(total=len(paths), unit="video", disable=not progress) as bar:
        for index, path in enumerate(paths):
            error = _feed_video(batcher, index, model_windows(path, model.architecture, options))
            if error is None:
                batcher.close(index)
            else:
                batcher.discard(index)
                yield VideoFeatures(path, None, error)
            bar.update(1)
            for done, features in batcher.pop_finished():
                yield VideoFeatures(paths[done], _reduce(features, options.reduction))
        batcher.flush()
        for done, features in batcher.pop_finished():
            yield VideoFeatures(paths[done], _reduce(features, options.reduction))


def _feed_video(batcher: _ClipBatcher, index: int, windows: Iterator[np.ndarray]) -> str | None:
    """Hands a video's clips to the batcher; returns why reading the video failed, or None."""
    while True:
        # Only reading the video is guarded: an error from the model call must not pass as a bad video.
        try:
            window = next(windows, None)
        except ValueError as error:  # VideoDecodeError, NoFaceError, a cropper's input check
            return str(error)
        if window is None:
            return None
        batcher.add(index, window)


def extract_video_features(model: Marlin, path: str | pathlib.Path, crop_face: bool = False, keep_seq: bool = False,
                           sample_rate: int = 2, stride: int = 16, reduction: str = "none",
                           batch_size: int | None = None) -> np.ndarray:
    """One video -> (clips, D), (clips, tokens, D) with keep_seq, or one clip's shape with reduction "mean"/"max".

    `marlin_pytorch`'s `Marlin.extract_video`, on the schedule of the module docstring. Raises
    VideoDecodeError for an unreadable or empty video, NoFaceError (crop_face) for a clip without a face.
    """
    options = ExtractionOptions(crop_face=crop_face, keep_seq=keep_seq, sample_rate=sample_rate, stride=stride,
                                reduction=reduction, batch_size=batch_size)
    batcher = _ClipBatcher(model, options)
    for window in model_windows(path, model.architecture, options):
        batcher.add(0, window)
    batcher.close(0)
    batcher.flush()
    (_, features), = batcher.pop_finished()
    return _reduce(features, reduction)


def find_videos(inputs: Sequence[str | pathlib.Path]) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Inputs (files, or folders searched recursively for VIDEO_SUFFIXES) -> (video, relative .npy path).

    A folder's videos keep their sub-folders; a file given directly lands at the top. Two videos that would
    write the same .npy, or one video reached twice, are an error.
    """
    found: list[tuple[pathlib.Path, pathlib.Path]] = []
    for item in map(pathlib.Path, inputs):
        if item.is_dir():
            found += [(video, video.relative_to(item).with_name(f"{video.stem}.npy"))
                      for video in sorted(item.rglob("*"))
                      if video.suffix.lower() in VIDEO_SUFFIXES and video.is_file()]
        elif item.is_file():
            found.append((item, pathlib.Path(f"{item.stem}.npy")))
        else:
            raise ValueError(f"input {item} is neither a video file nor a folder")
    owners: dict[pathlib.Path, pathlib.Path] = {}
    for video, output in found:
        if output in owners:
            raise ValueError(f"{owners[output]} and {video} would both write {output}")
        owners[output] = video
    if len({video.resolve() for video, _ in found}) < len(found):
        raise ValueError("a video is named twice among the inputs (a folder and a file or sub-folder in it?)")
    return found


def extract_to_directory(model: Marlin, inputs: Sequence[str | pathlib.Path], output_dir: str | pathlib.Path,
                         options: ExtractionOptions = ExtractionOptions(), progress: bool = True) -> ExtractionSummary:
    """Writes one `<stem>.npy` per video under output_dir; bad videos are logged and skipped."""
    videos = find_videos(inputs)
    if not videos:
        raise ValueError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    outputs = {video: pathlib.Path(output_dir) / relative for video, relative in videos}
    written, failed = [], []
    for result in extract_videos(model, [video for video, _ in videos], options, progress):
        if result.error is not None:
            logger.warning("skipped %s: %s", result.path, result.error)
            failed.append((result.path, result.error))
            continue
        _save_npy(outputs[result.path], result.features)
        written.append(outputs[result.path])
    return ExtractionSummary(written=written, failed=failed)


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
    # Written beside, then renamed: an interrupted run never leaves a truncated .npy behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        np.save(file, array)
    partial.replace(path)
