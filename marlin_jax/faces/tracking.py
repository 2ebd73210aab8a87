"""Detect, then track: the face of each frame of a video, found the way MediaPipe's face-mesh graph finds it.

The detector (BlazeFace) runs on the first frame, again whenever the face is lost, and every
`redetect_every` frames. In between, the region of interest (ROI) the 468-point landmark model looks at
comes from the previous frame's landmarks, and the model's face-presence score says whether the face is
still there; below `min_tracking_presence` the detector runs on that same frame.

The landmark model's output moves with its ROI (by about a pixel between a BlazeFace ROI and MediaPipe's
own landmark-box ROI), and the crop geometry is that of the detector's box (`marlin_jax.faces.crop`). So
tracked frames mimic the detector: each detection measures where its box and eye line sit on the face's
landmarks (`DetectionCalibration`), the next frames' ROIs are built from the previous landmarks with that
calibration exactly as from a detection, and each tracked frame's crop box is placed on its own landmarks
with the calibration interpolated between the detections before and after it (`place_boxes`).
"""

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from mediapipe.tasks.python.vision import FaceLandmarksConnections as Mesh

from marlin_jax.faces.detection import FaceDetection, FaceDetector
from marlin_jax.faces.landmarks import FaceLandmarker, RotatedSquare, roi_from_box, roi_from_detection

# A detection the landmark model does not recognise as a face (presence below this) is dropped,
# e.g. BlazeFace boxes on near-black fade-in frames.
MIN_LANDMARK_PRESENCE = 0.5
# MediaPipe's FaceMesh default (min_tracking_confidence).
MIN_TRACKING_PRESENCE = 0.5
# On the ten sample videos, against the detector on every frame: with the detector on every 3rd frame the
# region maps agree to 0.975 and the landmarks to 0.26 px (median); every 4th, 0.969; every 8th, 0.955 and
# 0.60 px. The per-frame path agrees with itself, on the same videos moved by one pixel, to 0.949 and
# 0.69 px: what is left is mostly the detector's own jitter (benchmarks/faces_tracking_quality.py).
DEFAULT_REDETECT_EVERY = 3

_RIGHT_EYE = sorted({edge.start for edge in Mesh.FACE_LANDMARKS_RIGHT_EYE})
_LEFT_EYE = sorted({edge.start for edge in Mesh.FACE_LANDMARKS_LEFT_EYE})


@dataclasses.dataclass(frozen=True)
class FrameFace:
    """The face of one frame: (468, 2) float32 landmarks in source pixels, and the detection where the
    detector ran on this frame (else None)."""

    points: np.ndarray
    detection: FaceDetection | None = None


def _extent(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and longer side of the landmarks' axis-aligned bounding box."""
    low, high = points.min(axis=0), points.max(axis=0)
    return (low + high) / 2, float(np.max(high - low))


def _eye_angle(points: np.ndarray) -> float:
    eye_line = points[_LEFT_EYE].mean(axis=0) - points[_RIGHT_EYE].mean(axis=0)
    return float(np.arctan2(eye_line[1], eye_line[0]))


@dataclasses.dataclass(frozen=True)
class DetectionCalibration:
    """Where a detection sits on its face's landmarks.

    offset: (2,) detector box centre minus the landmarks' bounding-box centre, and side: the box's longer
    side, both in units of the landmarks' extent (longer bounding-box side); angle: the detector's eye line
    minus the landmarks' eye line, in radians.
    """

    offset: np.ndarray
    side: float
    angle: float

    @classmethod
    def measure(cls, face: FrameFace) -> "DetectionCalibration":
        box = face.detection.box
        centre, extent = _extent(face.points)
        box_centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        return cls(offset=(box_centre - centre) / extent, side=max(box[2] - box[0], box[3] - box[1]) / extent,
                   angle=roi_from_detection(face.detection).angle - _eye_angle(face.points))

    def towards(self, other: "DetectionCalibration", weight: float) -> "DetectionCalibration":
        """Linear interpolation: this one at weight 0, `other` at 1."""
        return DetectionCalibration(offset=self.offset + weight * (other.offset - self.offset),
                                    side=self.side + weight * (other.side - self.side),
                                    angle=self.angle + weight * (other.angle - self.angle))

    def box(self, points: np.ndarray) -> np.ndarray:
        """(4,) float64 square box x0, y0, x1, y1 where the detector would put it on a face with `points`."""
        centre, extent = _extent(points)
        centre = centre + self.offset * extent
        half = self.side * extent / 2
        return np.concatenate([centre - half, centre + half])

    def roi(self, points: np.ndarray) -> RotatedSquare:
        """The landmark model's ROI as a detection would give it on a face with `points`."""
        return roi_from_box(self.box(points), _eye_angle(points) + self.angle)


class FaceTracker:
    """Finds the face of each frame of ONE video; give it the frames in order.

    redetect_every=1 runs the detector on every frame: the per-frame path.
    """

    def __init__(self, detector: FaceDetector, landmarker: FaceLandmarker, *,
                 redetect_every: int = DEFAULT_REDETECT_EVERY,
                 min_tracking_presence: float = MIN_TRACKING_PRESENCE):
        if redetect_every < 1:
            raise ValueError(f"redetect_every must be a positive number of frames, got {redetect_every}")
        self._detector = detector
        self._landmarker = landmarker
        self._redetect_every = redetect_every
        self._min_tracking_presence = min_tracking_presence
        self._previous: FrameFace | None = None  # None: no face to follow
        self._calibration: DetectionCalibration | None = None  # of the last detection
        self._since_detection = 0  # frames since the last detection

    def find(self, frame: np.ndarray) -> FrameFace | None:
        """The face in `frame` ((H, W, 3) uint8 RGB, C-contiguous), or None."""
        self._since_detection += 1
        face = None
        if self._previous is not None and self._since_detection < self._redetect_every:
            face = self._follow(frame)
        if face is None:
            face = self._detect(frame)
        self._previous = face
        return face

    def _follow(self, frame: np.ndarray) -> FrameFace | None:
        landmarks = self._landmarker.landmarks(frame, self._calibration.roi(self._previous.points))
        if landmarks.presence < self._min_tracking_presence:
            return None
        return FrameFace(points=landmarks.points)

    def _detect(self, frame: np.ndarray) -> FrameFace | None:
        detection = self._detector.detect(frame)
        if detection is None:
            return None
        landmarks = self._landmarker.landmarks(frame, roi_from_detection(detection))
        if landmarks.presence < MIN_LANDMARK_PRESENCE:
            return None
        face = FrameFace(points=landmarks.points, detection=detection)
        self._calibration = DetectionCalibration.measure(face)
        self._since_detection = 0
        return face


def place_boxes(
    items: Iterable[tuple[Any, FrameFace | None]],
) -> Iterator[tuple[Any, FrameFace | None, np.ndarray | None]]:
    """(payload, face) of consecutive frames -> (payload, face, box): the detector's box where it ran.

    A tracked frame's box is placed on its landmarks with the calibration interpolated, by frame
    distance, between the detections before and after it in the same track (no frame without a face in
    between), or with the one before it when the track ends first. So a tracked frame comes out only
    when the next detection or the end of its track is reached: at most `redetect_every` frames later.
    Frames without a face get None.
    """
    waiting: list[tuple[Any, FrameFace]] = []  # tracked frames since the last detection
    calibration: DetectionCalibration | None = None
    for payload, face in items:
        if face is not None and face.detection is None:
            waiting.append((payload, face))
            continue
        following = DetectionCalibration.measure(face) if face is not None else None
        for step, (waiting_payload, waiting_face) in enumerate(waiting, start=1):
            placed = calibration if following is None else calibration.towards(following, step / (len(waiting) + 1))
            yield waiting_payload, waiting_face, placed.box(waiting_face.points)
        waiting.clear()
        calibration = following
        yield payload, face, None if face is None else face.detection.box
    for payload, face in waiting:
        yield payload, face, calibration.box(face.points)
