"""Video -> MARLIN face crops and region maps: detection, landmarks, crop, map, per frame."""

import dataclasses

import numpy as np

from marlin_jax.faces.crop import (
    OFFICIAL_BOX_SCALE,
    OFFICIAL_BOX_SHIFT,
    box_from_square,
    crop_square,
    fill_missing,
    smooth_squares,
    square_from_box,
    to_crop_coordinates,
)
from marlin_jax.faces.detection import FaceDetector
from marlin_jax.faces.landmarks import FaceLandmarker
from marlin_jax.faces.region_map import region_map

# A detection the landmark model does not recognise as a face (presence below this) is dropped,
# e.g. BlazeFace boxes on near-black fade-in frames.
MIN_LANDMARK_PRESENCE = 0.5
# On the sample videos a 5-frame window cut the frame-to-frame jitter of the crop centre 2-3x
# (to about 0.3-1.2 px of the 224 crop); wider windows gained little and drift further from the
# per-frame boxes.
DEFAULT_SMOOTHING = 5


class NoFaceError(ValueError):
    """No frame of the input has a face."""


@dataclasses.dataclass(frozen=True)
class FaceCrops:
    """Face crops of T frames.

    frames: (T, S, S, 3) uint8 RGB crops.
    region_maps: (T, S, S) uint8 labels (REGION_LABELS); all 0 on frames without a face.
    face_found: (T,) bool, a face was found in this frame: BlazeFace detected one and the landmark
        model confirmed it. Elsewhere the crop box was carried over from the last such frame.
    boxes: (T, 4) float32 crop squares x0, y0, x1, y1 in source pixels (may leave the frame).
    """

    frames: np.ndarray
    region_maps: np.ndarray
    face_found: np.ndarray
    boxes: np.ndarray


@dataclasses.dataclass(frozen=True)
class _FrameFaces:
    """What the models found per frame: squares (T, 3), found (T,), landmarks list (or None)."""

    squares: np.ndarray
    found: np.ndarray
    landmarks: list[np.ndarray | None]


class FaceCropper:
    """Crops faces the way MARLIN's pre-processing does and draws their region maps.

    size: side of the square crops (MARLIN: 224).
    smoothing: centred moving-average window, in frames, over the crop squares' centre and side;
        1 keeps the official per-frame squares, which jitter by a few pixels from frame to frame.
    box_scale, box_shift: crop square from the detector's box (see marlin_jax.faces.crop).
    min_detection_confidence: BlazeFace score threshold.

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
    ):
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        if smoothing < 1 or smoothing % 2 == 0:
            raise ValueError(f"smoothing must be a positive odd number of frames, got {smoothing}")
        self.size = size
        self.smoothing = smoothing
        self.box_scale = box_scale
        self.box_shift = box_shift
        self.min_detection_confidence = min_detection_confidence
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
        faces = self._find_faces(frames)
        if not faces.found.any():
            raise NoFaceError(f"no face found in any of the {len(frames)} frame(s)")
        squares = smooth_squares(fill_missing(faces.squares, faces.found), self.smoothing)
        crops = np.stack([crop_square(np.ascontiguousarray(frame), square, self.size)
                          for frame, square in zip(frames, squares)])
        maps = np.zeros((len(frames), self.size, self.size), np.uint8)
        for t, points in enumerate(faces.landmarks):
            if points is not None:
                maps[t] = region_map(to_crop_coordinates(points, squares[t], self.size), self.size)
        return FaceCrops(frames=crops, region_maps=maps, face_found=faces.found,
                         boxes=box_from_square(squares))

    def _find_faces(self, frames: np.ndarray) -> _FrameFaces:
        squares = np.zeros((len(frames), 3))
        found = np.zeros(len(frames), bool)
        landmarks: list[np.ndarray | None] = [None] * len(frames)
        for t, frame in enumerate(frames):
            # One contiguous copy for views such as frames[..., ::-1] (cv2 and MediaPipe need it).
            frame = np.ascontiguousarray(frame)
            detection = self._detector.detect(frame)
            if detection is None:
                continue
            face = self._landmarker.landmarks(frame, detection)
            if face.presence < MIN_LANDMARK_PRESENCE:
                continue
            squares[t] = square_from_box(detection.box, self.box_scale, self.box_shift)
            found[t] = True
            landmarks[t] = face.points
        return _FrameFaces(squares=squares, found=found, landmarks=landmarks)


def _check_uint8_rgb(array: np.ndarray, ndim: int, what: str, shape: str) -> None:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{what} must be a numpy array {shape} uint8 RGB, got {type(array).__name__}")
    if array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
        raise ValueError(f"{what} must be {shape} uint8 RGB, got {array.dtype} {array.shape}")
    if array.size == 0:
        raise ValueError(f"{what} is empty: shape {array.shape}")
