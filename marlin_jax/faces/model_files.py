"""The MediaPipe model files shipped in `assets/` (provenance and hashes: assets/SOURCE.md)."""

from importlib import resources

DETECTOR_MODEL = "face_detection_short_range.tflite"
LANDMARK_MODEL = "face_landmark.tflite"


def read_model_file(name: str) -> bytes:
    """Returns the bytes of a shipped model file; read as bytes so a zipped install works too."""
    return (resources.files("marlin_jax.faces.assets") / name).read_bytes()
