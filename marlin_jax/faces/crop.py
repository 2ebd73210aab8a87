"""MARLIN's face crop: a square around the detector's box, zero padded, resized to `size`.

The official pipeline (RetinaFace) crops the square centred on the detection box with side
max(w, h), pads with zeros where it leaves the frame and resizes it to 224. BlazeFace, the detector
used here, draws a tighter box that sits lower on the face, so the square is calibrated to the
official framing: side = OFFICIAL_BOX_SCALE * max(w, h), centre moved up by
OFFICIAL_BOX_SHIFT * max(w, h). Both were measured by running BlazeFace on the five official crops
in the MARLIN sample videos (each frame of those IS the official square): per video, the median
official-side / BlazeFace-side was 1.10 to 1.27 (median 1.20) and the median upward offset of the
official centre 0.04 to 0.13 BlazeFace sides (median 0.09). scale=1, shift=0 gives the official rule
applied to BlazeFace's own box.

A square is (centre x, centre y, half side) in source pixels (continuous: pixel i spans [i, i+1)).
"""

import cv2
import numpy as np

OFFICIAL_BOX_SCALE = 1.2
OFFICIAL_BOX_SHIFT = 0.09


def square_from_box(
    box: np.ndarray, scale: float = OFFICIAL_BOX_SCALE, shift: float = OFFICIAL_BOX_SHIFT
) -> np.ndarray:
    """(4,) detector box x0, y0, x1, y1 -> (3,) crop square (centre x, centre y, half side)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2 - shift * side, scale * side / 2], np.float64)


def box_from_square(square: np.ndarray) -> np.ndarray:
    """(..., 3) squares -> (..., 4) float32 boxes x0, y0, x1, y1."""
    centre, half = square[..., :2], square[..., 2:]
    return np.concatenate([centre - half, centre + half], axis=-1).astype(np.float32)


def crop_square(image: np.ndarray, square: np.ndarray, size: int) -> np.ndarray:
    """The square of `image` resized to (size, size, 3); zeros where it leaves the frame.

    One bilinear warp does the official pad-then-resize (cv2.resize's default INTER_LINEAR, same
    pixel-centre alignment) without materialising the padded square.
    """
    cx, cy, half = square
    scale = 2 * half / size
    # Output pixel index u has its centre at u + 0.5 and samples source coordinate
    # x0 + (u + 0.5) * scale, whose pixel index is that minus 0.5.
    to_source = np.array(
        [[scale, 0, cx - half + 0.5 * scale - 0.5], [0, scale, cy - half + 0.5 * scale - 0.5]]
    )
    return cv2.warpAffine(
        image,
        to_source,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def to_crop_coordinates(points: np.ndarray, square: np.ndarray, size: int) -> np.ndarray:
    """(N, 2) source-pixel points -> the same points in the (size x size) crop of `square`."""
    cx, cy, half = square
    return (points - np.array([cx - half, cy - half])) * (size / (2 * half))
