"""MARLIN features of many videos: clips gathered across videos into batches split over this host's devices.

    from marlin_jax import Marlin
    model = Marlin.from_file("marlin_vit_base_ytf", "marlin_vit_base_ytf.encoder.pt")
    features = model.extract_video("face_clip.mp4")                          # (clips, 768)
    for result in extract_videos(model, paths):                              # many videos, streamed
        ...

Clips follow `marlin_jax.video.extraction_windows` (the official `extract_video` schedule). The official code
asserts 224x224 frames; here frames of another size are resized (not cropped) to the model's `img_size`
square with swscale's bicubic filter, which distorts non-square videos: pass `crop_face=True` for raw
footage. With `crop_face`, each clip's frames are cropped by `FaceCropper`, whose crop squares are smoothed
over the clip's frames (the official crops every frame on its own); a clip in which no frame has a face
fails the whole video (the official crops an empty corner instead).

On several hosts (`jax.process_count() > 1`) `extract_to_directory` gives each host every
`process_count`-th video of the sorted list, so each video is done exactly once and the hosts together write
what one host would.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
import tqdm
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from marlin_jax import storage
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.model import encode_clips
from marlin_jax.video import VIDEO_SUFFIXES, video_windows

REDUCTIONS = ("none", "mean", "max")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExtractionOptions:
    """How clips are cut from a video and what comes back per video.

    keep_seq: per-clip token features (clips, tokens, D) instead of mean-pooled (clips, D).
    reduction: "none" keeps one row per clip; "mean" / "max" reduce over clips, as the official extract_video.
    batch_size: clips per jitted call, gathered across videos and split over this host's devices; a last
        partial batch is padded to the next power of two (at least one clip per device), so XLA compiles at most
        1 + log2(batch_size) shapes. None: default_batch_size(this host's devices).
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


def default_batch_size(devices: Sequence[jax.Device]) -> int:
    """1 per CPU device, where a batch of 4 ran slower per clip than single clips (the (B, heads, tokens,
    tokens) attention logits outgrow the caches, benchmarks/extract_throughput.py); 8 per GPU/TPU chip."""
    per_device = 1 if devices[0].platform == "cpu" else 8
    return per_device * len(devices)


# The clips of a batch split over the mesh's one axis; the model's "batch" activations follow them, so that
# TPU attention runs on each chip's own clips (see marlin_jax.model.attention).
EXTRACTION_AXIS_RULES = (("batch", "batch"),)


def extraction_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """One axis over one host's devices: `FeatureExtractor` passes `jax.local_devices()`, `python -m
    marlin_jax.aot` the first host's chips of a TPU slice."""
    return Mesh(np.asarray(devices), ("batch",))


def extraction_shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(encoder parameters: replicated, clips: split over the batch axis)."""
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))


class FeatureExtractor:
    """The encoder replicated on this host's devices; a batch of clips is split over them.

    Only local devices take part, so hosts extract independently (no collectives) whatever their number.
    """

    def __init__(self, architecture: MarlinArchitecture, encoder_params):
        self.architecture = architecture
        self.mesh = extraction_mesh(jax.local_devices())
        params_sharding, self._clip_sharding = extraction_shardings(self.mesh)
        self.params = jax.device_put(encoder_params, params_sharding)

    @classmethod
    def of(cls, model) -> FeatureExtractor:
        """A `FeatureExtractor` as is, a `Marlin`'s own (built once per model), or one for anything with
        `.architecture` and `.params["encoder"]`."""
        if isinstance(model, FeatureExtractor):
            return model
        if hasattr(model, "feature_extractor"):
            return model.feature_extractor
        return cls(model.architecture, model.params["encoder"])

    @property
    def device_count(self) -> int:
        return self.mesh.size

    def encode(self, clips, keep_seq: bool) -> jax.Array:
        """(B, T, H, W, 3) clips (uint8, or floats in [0, 1]), B a multiple of the device count -> features,
        asynchronously: (B, D), or (B, N, D) with keep_seq."""
        clips = jax.device_put(clips, self._clip_sharding)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(EXTRACTION_AXIS_RULES):
            return encode_clips(self.params, clips, self.architecture, keep_seq)

    def features(self, clips, keep_seq: bool) -> np.ndarray:
        """Any number of clips -> host features (padded to a multiple of the device count, then cut back)."""
        count = len(clips)
        padding = -count % self.device_count
        if padding:
            clips = np.concatenate([np.asarray(clips), np.zeros((padding, *clips.shape[1:]), clips.dtype)])
        return np.asarray(jax.device_get(self.encode(clips, keep_seq)))[:count]


@dataclasses.dataclass(frozen=True)
class VideoFeatures:
    """The features of one video, or why there are none."""

    path: epath.Path
    features: np.ndarray | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ExtractionSummary:
    written: list[epath.Path]
    failed: list[tuple[epath.Path, str]]


@functools.cache
def _face_cropper(size: int):
    # Imported here: MediaPipe's import and model load cost about a second, wasted without --crop-face.
    from marlin_jax.faces import FaceCropper
    return FaceCropper(size=size)


def model_windows(path, arch: MarlinArchitecture, options: ExtractionOptions) -> Iterator[np.ndarray]:
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

    def __init__(self, extractor: FeatureExtractor, options: ExtractionOptions):
        self._extractor = extractor
        self._keep_seq = options.keep_seq
        devices = extractor.device_count
        batch_size = options.batch_size or default_batch_size(extractor.mesh.devices.tolist())
        self._batch_size = -(-batch_size // devices) * devices
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
        count, devices = len(self._clips), self._extractor.device_count
        padded = min(self._batch_size, max(devices, 1 << (count - 1).bit_length()))
        padded = -(-padded // devices) * devices
        clips = np.stack(self._clips + [np.zeros_like(self._clips[0])] * (padded - count))
        result = self._extractor.encode(clips, self._keep_seq)
        self._collect()
        self._in_flight = (result, self._owners)
        self._clips, self._owners = [], []

    def _collect(self) -> None:
        if self._in_flight is None:
            return
        result, owners = self._in_flight
        self._in_flight = None
        for row, owner in zip(np.asarray(jax.device_get(result)), owners):
            if owner in self._pending:
                self._rows[owner].append(row)
                self._pending[owner] -= 1


def _reduce(features: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "mean":
        return features.mean(axis=0)
    if reduction == "max":
        return features.max(axis=0)
    return features


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


def extract_videos(model, paths: Sequence, options: ExtractionOptions = ExtractionOptions(),
                   progress: bool = False) -> Iterator[VideoFeatures]:
    """Features of each video, in the order they finish; a video that fails comes back with its error.

    `model`: a `Marlin` or a `FeatureExtractor`."""
    extractor = FeatureExtractor.of(model)
    paths = [epath.Path(p) for p in paths]
    batcher = _ClipBatcher(extractor, options)
    with tqdm.tqdm(total=len(paths), unit="video", disable=not progress) as bar:
        for index, path in enumerate(paths):
            error = _feed_video(batcher, index, model_windows(path, extractor.architecture, options))
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


def extract_video_features(model, path, crop_face: bool = False, keep_seq: bool = False, sample_rate: int = 2,
                           stride: int = 16, reduction: str = "none", batch_size: int | None = None) -> np.ndarray:
    """One video -> (clips, D), (clips, tokens, D) with keep_seq, or one clip's shape with reduction "mean"/"max".

    `marlin_pytorch`'s `Marlin.extract_video`. Raises VideoDecodeError for an unreadable or empty video,
    NoFaceError (crop_face) for a clip without a face. `model`: a `Marlin` or a `FeatureExtractor`.
    """
    options = ExtractionOptions(crop_face=crop_face, keep_seq=keep_seq, sample_rate=sample_rate, stride=stride,
                                reduction=reduction, batch_size=batch_size)
    extractor = FeatureExtractor.of(model)
    batcher = _ClipBatcher(extractor, options)
    for window in model_windows(path, extractor.architecture, options):
        batcher.add(0, window)
    batcher.close(0)
    batcher.flush()
    (_, features), = batcher.pop_finished()
    return _reduce(features, options.reduction)


def find_videos(inputs: Sequence) -> list[tuple[epath.Path, str]]:
    """Inputs (files, or folders searched recursively for VIDEO_SUFFIXES) -> (video, relative .npy path).

    A folder's videos keep their sub-folders; a file given directly lands at the top. Two videos that would
    write the same .npy, or one video reached twice, are an error.
    """
    found: list[tuple[epath.Path, str]] = []
    for item in map(epath.Path, inputs):
        if item.is_dir():
            found += [(video, str(video.relative_to(item).with_name(f"{video.stem}.npy")))
                      for video in storage.files_under(item) if video.suffix.lower() in VIDEO_SUFFIXES]
        elif item.is_file():
            found.append((item, f"{item.stem}.npy"))
        else:
            raise ValueError(f"input {item} is neither a video file nor a folder")
    owners: dict[str, epath.Path] = {}
    for video, output in found:
        if output in owners:
            raise ValueError(f"{owners[output]} and {video} would both write {output}")
        owners[output] = video
    if len({_identity(video) for video, _ in found}) < len(found):
        raise ValueError("a video is named twice among the inputs (a folder and a file or sub-folder in it?)")
    return found


def _identity(path: epath.Path) -> str:
    return str(path) if storage.is_remote(path) else str(path.resolve())


def extract_to_directory(model, inputs: Sequence, output_dir,
                         options: ExtractionOptions = ExtractionOptions(), progress: bool = True) -> ExtractionSummary:
    """Writes one `<stem>.npy` per video under output_dir; bad videos are logged and skipped.

    With several JAX processes each takes every process_count-th video (of the sorted list) and writes it.
    """
    videos = find_videos(inputs)
    if not videos:
        raise ValueError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    videos = videos[jax.process_index()::jax.process_count()]
    outputs = {video: epath.Path(output_dir) / relative for video, relative in videos}
    written, failed = [], []
    for result in extract_videos(model, [video for video, _ in videos], options, progress):
        if result.error is not None:
            logger.warning("skipped %s: %s", result.path, result.error)
            failed.append((result.path, result.error))
            continue
        save_npy(outputs[result.path], result.features)
        written.append(outputs[result.path])
    return ExtractionSummary(written=written, failed=failed)


def save_npy(path: epath.Path, array: np.ndarray) -> None:
    """Writes the array under its final name only when complete (`storage.write_once`), so no reader sees half
    of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with storage.write_once(path) as file:
        np.save(file, array)
