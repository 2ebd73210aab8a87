"""Face detection with MediaPipe's BlazeFace (short range) through the Tasks API."""

import atexit
import dataclasses
import weakref

import mediapipe as mp
import numpy as np
from mediapipe.tasks.python import BaseOptions, vision

from marlin_jax.faces.model_files import DETECTOR_MODEL, read_model_file

# BlazeFace keypoint order. Its "right eye" is the subject's right eye: on a frontal, unmirrored
# photo it has the smaller x (checked on skimage.data.astronaut()).
RIGHT_EYE, LEFT_EYE, NOSE_TIP, MOUTH_CENTRE, RIGHT_EAR, LEFT_EAR = range(6)


@dataclasses.dataclass(frozen=True)
class FaceDetection:
    """One detected face, in source-image pixels (continuous: pixel i spans [i, i+1)).

    box: (4,) float32 x0, y0, x1, y1 of the detector's box.
    keypoints: (6, 2) float32 x, y in the order RIGHT_EYE .. LEFT_EAR above.
    score: the detector's confidence.
    """

    box: np.ndarray
    keypoints: np.ndarray
    score: float


# Detectors whose FaceDetector was collected, waiting to be closed at a safe point: the next FaceDetector made or
# detection run, or exit. Closing one submits to a ThreadPoolExecutor (mediapipe's dispatcher), and a garbage
# collection can run inside another submit, which holds concurrent.futures' process-wide lock: a close from the
# finalizer itself would wait on that lock forever.
_released: list[vision.FaceDetector] = []
_alive: "weakref.WeakSet[FaceDetector]" = weakref.WeakSet()


def _close_released() -> None:
    while _released:
        _close(_released.pop())


@atexit.register
def _close_all() -> None:
    for face_detector in list(_alive):
        face_detector.close()
    _close_released()


def _close(detector: vision.FaceDetector) -> None:
    """Closes a detector, or forgets it when the interpreter is exiting.

    A detector still alive at exit makes mediapipe's own __del__ raise from a half-torn-down module,
    and by the time atexit hooks run its worker thread is gone, so close() fails too. Then the
    process is ending anyway: dropping the handle turns that __del__ into a no-op.
    """
    try:
        detector.close()
    except RuntimeError:
        detector._handle = None  # pylint: disable=protected-access


class FaceDetector:
    """Finds the most confident face in an RGB uint8 image."""

    def __init__(self, min_confidence: float = 0.5):
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_buffer=read_model_file(DETECTOR_MODEL)),
            running_mode=vision.RunningMode.IMAGE,
            min_detection_confidence=min_confidence,
        )
        _close_released()
        self._detector = vision.FaceDetector.create_from_options(options)
        self._finalizer = weakref.finalize(self, _released.append, self._detector)
        _alive.add(self)

    def close(self) -> None:
        """Releases MediaPipe's detector now; otherwise that happens after this object is collected."""
        if self._finalizer.detach() is not None:
            _close(self._detector)

    def detect(self, image: np.ndarray) -> FaceDetection | None:
        """Returns the most confident face in `image` ((H, W, 3) uint8 RGB), or None."""
        _close_released()
        height, width = image.shape[:2]
        # mp.Image reads the raw buffer as if it were C-contiguous: a strided array (e.g. PyAV
        # frames with padded rows) is silently misread, so copy those.
        mp_image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))
        detections = self._detector.detect(mp_image).detections
        if not detections:
            return None
        best = max(detections, key=lambda d: d.categories[0].score)
        bb = best.bounding_box
        box = np.array(
            [bb.origin_x, bb.origin_y, bb.origin_x + bb.width, bb.origin_y + bb.height], np.float32
        )
        keypoints = np.array([[k.x * width, k.y * height] for k in best.keypoints], np.float32)
        return FaceDetection(box=box, keypoints=keypoints, score=float(best.categories[0].score))
