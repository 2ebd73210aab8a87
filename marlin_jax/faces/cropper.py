"""Video -> MARLIN face crops and region maps: find the face (detect, then track), crop, draw the map.

Frames stream through: a frame is cropped as soon as its smoothed crop square is known (`smoothing // 2`
frames later), so a long or high-resolution video never has to sit in memory whole.
"""

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from marlin_jax.faces.crop import (
    OFFICIAL_BOX_SCALE,
    OFFICIAL_BOX_SHIFT,
    box_from_square,
    crop_square,
    square_from_box,
    to_crop_coordinates,
)
from marlin_jax.faces.detection import FaceDetector
from marlin_jax.faces.landmarks import NUM_LANDMARKS, FaceLandmarker
from marlin_jax.faces.region_map import region_map
from marlin_jax.faces.tracking import (DEFAULT_REDETECT_EVERY, MIN_TRACKING_PRESENCE, FaceTracker, FrameFace,
                                       place_boxes)

# On the sample videos a 5-frame window cut the frame-to-frame jitter of the crop centre 2-3x
# (to about 0.3-1.2 px of the 224 crop); wider windows gained little and drift further from the
# per-frame boxes.
DEFAULT_SMOOTHING = 5
# Frames before the first face wait for its crop square; `iter_video` holds at most this many.
DEFAULT_MAX_HELD_FRAMES = 64


class NoFaceError(ValueError):
    """No frame of the input has a face."""


@dataclasses.dataclass(frozen=True)
class FrameCrop:
    """The face crop of one frame; the fields of FaceCrops for a single frame."""

    frame: np.ndarray
    region_map: np.ndarray
    face_found: bool
    box: np.ndarray
    landmarks: np.ndarray
    detected: bool


@dataclasses.dataclass(frozen=True)
class FaceCrops:
    """Face crops of T frames.

    frames: (T, S, S, 3) uint8 RGB crops.
    region_maps: (T, S, S) uint8 labels (REGION_LABELS); all 0 on frames without a face.
    face_found: (T,) bool, a face was found in this frame: BlazeFace detected one (or the landmark
        model kept following it) and the landmark model confirmed it. Elsewhere the crop box was
        carried over from the last such frame.
    boxes: (T, 4) float32 crop squares x0, y0, x1, y1 in source pixels (may leave the frame).
    landmarks: (T, 468, 2) float32 Face Mesh landmarks in source pixels; NaN without a face.
    detected: (T,) bool, the detector ran on this frame (with tracking, on some frames only).
    """

    frames: np.ndarray
    region_maps: np.ndarray
    face_found: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    detected: np.ndarray

    @classmethod
    def stack(cls, crops: Sequence[FrameCrop]) -> "FaceCrops":
        if not crops:
            raise ValueError("no frame crops to stack")
        return cls(frames=np.stack([c.frame for c in crops]), region_maps=np.stack([c.region_map for c in crops]),
                   face_found=np.array([c.face_found for c in crops]), boxes=np.stack([c.box for c in crops]),
                   landmarks=np.stack([c.landmarks for c in crops]), detected=np.array([c.detected for c in crops]))


class FaceCropper:
    """Crops faces the way MARLIN's pre-processing does and draws their region maps.

    size: side of the square crops (MARLIN: 224).
    smoothing: centred moving-average window, in frames, over the crop squares' centre and side;
        1 keeps the official per-frame squares, which jitter by a few pixels from frame to frame.
    box_scale, box_shift: crop square from the detector's box (see marlin_jax.faces.crop).
    min_detection_confidence: BlazeFace score threshold.
    tracking: run the detector only when needed and follow the face with the landmark model in
        between (see marlin_jax.faces.tracking); False runs the detector on every frame.
    redetect_every, min_tracking_presence: with tracking, the detector runs at least every
        `redetect_every` frames, and wherever the landmark model's face presence drops below
        `min_tracking_presence`.

    The models load once, in the constructor. Pickling carries only the settings above and the
    models load again where it is unpickled, so it can be sent to worker processes. One instance
    per thread: the landmark interpreter is not thread-safe.
    """

    def __init__(
        self,
        size: int = 224,
        smoothing: int = DEFAULT_SMOOTHING,
        box_scale: float = OFFICIAL_BOX_SCALE,
        box_shift: float = OFFICIAL_BOX_SHIFT,
        min_detection_confidence: float = 0.5,
        tracking: bool = True,
        redetect_every: int = DEFAULT_REDETECT_EVERY,
        min_tracking_presence: float = MIN_TRACKING_PRESENCE,
    ):
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        if smoothing < 1 or smoothing % 2 == 0:
            raise ValueError(f"smoothing must be a positive odd number of frames, got {smoothing}")
        if redetect_every < 1:
            raise ValueError(f"redetect_every must be a positive number of frames, got {redetect_every}")
        self.size = size
        self.smoothing = smoothing
        self.box_scale = box_scale
        self.box_shift = box_shift
        self.min_detection_confidence = min_detection_confidence
        self.tracking = tracking
        self.redetect_every = redetect_every
        self.min_tracking_presence = min_tracking_presence
        self._load_models()

    def _load_models(self) -> None:
        self._detector = FaceDetector(self.min_detection_confidence)
        self._landmarker = FaceLandmarker()

    def __getstate__(self) -> dict:
        return {name: value for name, value in vars(self).items() if not name.startswith("_")}

    def __setstate__(self, settings: dict) -> None:
        vars(self).update(settings)
        self._load_models()

    def process_image(self, image: np.ndarray) -> FaceCrops:
        """(H, W, 3) uint8 RGB -> FaceCrops with T = 1. Raises NoFaceError without a face."""
        _check_uint8_rgb(image, ndim=3, what="image", shape="(H, W, 3)")
        return self.process_video(image[None])

    def process_video(self, frames: np.ndarray) -> FaceCrops:
        """(T, H, W, 3) uint8 RGB -> FaceCrops. Raises NoFaceError if no frame has a face."""
        _check_uint8_rgb(frames, ndim=4, what="frames", shape="(T, H, W, 3)")
        # The frames are in memory already, so frames before the first face may all wait for it.
        crops = FaceCrops.stack(list(self.iter_video(frames, max_held_frames=len(frames))))
        if not crops.face_found.any():
            raise NoFaceError(f"no face found in any of the {len(frames)} frame(s)")
        return crops

    def iter_video(self, frames: Iterable[np.ndarray],
                   max_held_frames: int = DEFAULT_MAX_HELD_FRAMES) -> Iterator[FrameCrop]:
        """Crops (H, W, 3) uint8 RGB frames of one video as they come, in order.

        A frame comes out once its crop square is final: after the next detection (at most
        `redetect_every` frames on) and `smoothing // 2` more frames, or at the end. A frame without
        a face takes the crop square of the last frame with one; frames before the first face take
        the first face's square if it comes within `max_held_frames` frames (they are held until
        then), else a centred square of the whole frame. Raises ValueError on a frame that is not
        uint8 RGB or differs in size from the first.
        """
        tracker = FaceTracker(self._detector, self._landmarker,
                              redetect_every=self.redetect_every if self.tracking else 1,
                              min_tracking_presence=self.min_tracking_presence)
        faces = place_boxes((frame, tracker.find(frame)) for frame in _checked_frames(frames))
        squares = ((frame, face, None if box is None else square_from_box(box, self.box_scale, self.box_shift))
                   for frame, face, box in faces)
        for frame, face, square in smooth_squares(fill_missing(squares, max_held_frames), self.smoothing):
            yield self._crop(frame, face, square)

    def _crop(self, frame: np.ndarray, face: FrameFace | None, square: np.ndarray) -> FrameCrop:
        labels = np.zeros((self.size, self.size), np.uint8)
        landmarks = np.full((NUM_LANDMARKS, 2), np.nan, np.float32)
        if face is not None:
            labels = region_map(to_crop_coordinates(face.points, square, self.size), self.size)
            landmarks = face.points
        # The tracker gives up on a frame only after the detector found nothing there.
        detected = face is None or face.detection is not None
        return FrameCrop(frame=crop_square(frame, square, self.size), region_map=labels, face_found=face is not None,
                         box=box_from_square(square), landmarks=landmarks, detected=detected)


Item = tuple[np.ndarray, FrameFace | None, np.ndarray | None]


def fill_missing(items: Iterable[Item], max_held: int) -> Iterator[Item]:
    """Gives each (frame, face, square) without a square (None) the square of the last frame with one.

    Frames before the first square take the first square, if it comes within `max_held` frames (they
    wait for it), else the centred square of their frame. The official code has no box yet there and
    crops a 2x2-pixel patch at the origin.
    """
    held: collections.deque = collections.deque()
    last = None
    for frame, face, square in items:
        last = square if square is not None else last
        if last is None:
            held.append((frame, face))
            if len(held) > max_held:
                frame, face = held.popleft()
                yield frame, face, _centred_square(frame)
            continue
        while held:
            yield *held.popleft(), last
        yield frame, face, last
    for frame, face in held:
        yield frame, face, _centred_square(frame)


def _centred_square(frame: np.ndarray) -> np.ndarray:
    height, width = frame.shape[:2]
    return np.array([width / 2, height / 2, min(height, width) / 2])


def smooth_squares(items: Iterable[Item], window: int) -> Iterator[Item]:
    """Replaces each (frame, face, square)'s square by the centred moving average over `window` frames.

    `window` is odd (1 = unchanged). Near the ends the window shrinks symmetrically (frame t averages
    t-r..t+r with r limited by both ends), so the first and last frames keep their own squares and
    nothing lags behind. An item comes out `window // 2` items after it went in (or at the end).
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smoothing window must be a positive odd number of frames, got {window}")
    radius = window // 2
    recent: collections.deque = collections.deque(maxlen=window)  # squares of the latest items
    pending: collections.deque = collections.deque()  # items not yet given out, oldest first
    count = 0

    def smoothed(index: int, reach: int) -> Item:
        first_recent = count - len(recent)
        frame, face, _ = pending.popleft()
        squares = [recent[i - first_recent] for i in range(index - reach, index + reach + 1)]
        return frame, face, np.mean(squares, axis=0)

    for item in items:
        recent.append(item[2])
        pending.append(item)
        count += 1
        if len(pending) > radius:
            index = count - 1 - radius
            yield smoothed(index, min(index, radius))
    while pending:
        index = count - len(pending)
        yield smoothed(index, min(index, count - 1 - index, radius))


def _checked_frames(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The frames, C-contiguous (cv2 and MediaPipe need it), after checking type and size."""
    shape = None
    for frame in frames:
        _check_uint8_rgb(frame, ndim=3, what="frame", shape="(H, W, 3)")
        if shape is not None and frame.shape != shape:
            raise ValueError(f"frame size changes within the video: {shape[:2]} then {frame.shape[:2]}")
        shape = frame.shape
        yield np.ascontiguousarray(frame)


def _check_uint8_rgb(array: np.ndarray, ndim: int, what: str, shape: str) -> None:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{what} must be a numpy array {shape} uint8 RGB, got {type(array).__name__}")
    if array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
        raise ValueError(f"{what} must be {shape} uint8 RGB, got {array.dtype} {array.shape}")
    if array.size == 0:
        raise ValueError(f"{what} is empty: shape {array.shape}")
