"""468-point Face Mesh landmarks from MediaPipe's face_landmark.tflite, run with LiteRT.

The model sees a 192x192 crop of a region of interest (ROI) built the way MediaPipe's legacy
FaceMesh builds it from a BlazeFace detection: centred on the detector's box, 1.5x its longer side,
rotated so the line from the subject's right eye to their left eye is horizontal. Between
detections, `marlin_jax.faces.tracking` builds the same ROI from the previous frame's landmarks.
"""

import dataclasses

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from marlin_jax.faces.detection import LEFT_EYE, RIGHT_EYE, FaceDetection
from marlin_jax.faces.model_files import LANDMARK_MODEL, read_model_file

NUM_LANDMARKS = 468
INPUT_SIDE = 192
ROI_SCALE = 1.5


@dataclasses.dataclass(frozen=True)
class FaceLandmarks:
    """points: (468, 2) float32 x, y in source-image pixels; presence: P(face in the ROI)."""

    points: np.ndarray
    presence: float


@dataclasses.dataclass(frozen=True)
class RotatedSquare:
    """A square of side `side` px centred on `centre` (x, y), its x axis at `angle` radians."""

    centre: np.ndarray
    side: float
    angle: float

    def _local_to_source_linear(self, local_side: float) -> np.ndarray:
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        return np.array([[cos, -sin], [sin, cos]]) * (self.side / local_side)

    def to_source(self, local: np.ndarray, local_side: float) -> np.ndarray:
        """Maps (N, 2) points of a local_side x local_side view of the square to source pixels."""
        return (local - local_side / 2) @ self._local_to_source_linear(local_side).T + self.centre

    def source_from_local_affine(self, local_side: int) -> np.ndarray:
        """(2, 3) affine taking local pixel indices to source pixel indices (cv2 convention)."""
        # Pixel index i is centred at continuous coordinate i + 0.5 in both images.
        offset = self.to_source(np.full((1, 2), 0.5), local_side)[0] - 0.5
        return np.concatenate([self._local_to_source_linear(local_side), offset[:, None]], axis=1)


def roi_from_box(box: np.ndarray, angle: float) -> RotatedSquare:
    """The landmark model's ROI for a face box x0, y0, x1, y1 whose eye line is at `angle` radians."""
    x0, y0, x1, y1 = box
    return RotatedSquare(centre=np.array([(x0 + x1) / 2, (y0 + y1) / 2]),
                         side=ROI_SCALE * max(x1 - x0, y1 - y0), angle=angle)


def roi_from_detection(detection: FaceDetection) -> RotatedSquare:
    """The landmark model's ROI for a detection (see the module docstring)."""
    eye_line = detection.keypoints[LEFT_EYE] - detection.keypoints[RIGHT_EYE]
    return roi_from_box(detection.box, float(np.arctan2(eye_line[1], eye_line[0])))


class FaceLandmarker:
    """Runs the Face Mesh model on one thread (throughput comes from one process per core)."""

    def __init__(self):
        self._interpreter = Interpreter(model_content=read_model_file(LANDMARK_MODEL), num_threads=1)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        outputs = {d["shape"][-1]: d["index"] for d in self._interpreter.get_output_details()}
        self._points_output = outputs[NUM_LANDMARKS * 3]
        self._presence_output = outputs[1]

    def landmarks(self, image: np.ndarray, roi: RotatedSquare) -> FaceLandmarks:
        """Landmarks of the face in the `roi` of `image` ((H, W, 3) uint8 RGB)."""
        crop = cv2.warpAffine(
            image,
            roi.source_from_local_affine(INPUT_SIDE),
            (INPUT_SIDE, INPUT_SIDE),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        self._interpreter.set_tensor(self._input, crop[None] / np.float32(255))
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._points_output).reshape(NUM_LANDMARKS, 3)
        logit = float(self._interpreter.get_tensor(self._presence_output).ravel()[0])
        points = roi.to_source(raw[:, :2].astype(np.float64), INPUT_SIDE).astype(np.float32)
        return FaceLandmarks(points=points, presence=float(1 / (1 + np.exp(-logit))))
