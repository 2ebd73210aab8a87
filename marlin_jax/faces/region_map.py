"""Per-frame face-region maps drawn from the 468 Face Mesh landmarks, in the LaPa/FaRL label space.

The labels (`marlin_jax.face_labels`) are those of the face parser the official MARLIN uses (FaRL
trained on LaPa), which `marlin_jax.masking` reads. Right/left are the SUBJECT's right/left, as
there. MediaPipe's groups follow the same convention: its LEFT_EYE (landmarks 263..362) is the
subject's left eye, on the image's right in an unmirrored frontal photo (checked on
skimage.data.astronaut()).

Each region is filled from MediaPipe's landmark groups (`FaceLandmarksConnections`), painted in
this order so later regions win: hair, skin (the face oval), nose (convex hull of the NOSE group,
which is only lines), brows (the outline of each brow's two contours, thickened), eyes, upper and
lower lip (between the outer and inner lip contours) and the inner mouth (inside the inner contour).

Hair is not in the mesh and is approximated geometrically; see `_paint_hair`.
"""

import cv2
import numpy as np
from mediapipe.tasks.python.vision import FaceLandmarksConnections as Mesh

from marlin_jax.face_labels import REGION_LABELS

# Brows get at least this outline thickness (fraction of the face height), so they never vanish.
BROW_THICKNESS = 0.02
# Hair: the face oval grown by HAIR_GROWTH about its centroid and lifted by HAIR_LIFT face heights.
HAIR_GROWTH = 0.25
HAIR_LIFT = 0.12
# Fixed-point bits for cv2's sub-pixel polygon drawing.
_SHIFT = 4


def _chains(connections) -> list[np.ndarray]:
    """Splits a MediaPipe edge list into its paths (runs of edges, each starting where one ends)."""
    chains: list[list[int]] = []
    for edge in connections:
        if chains and chains[-1][-1] == edge.start:
            chains[-1].append(edge.end)
        else:
            chains.append([edge.start, edge.end])
    return [np.array(chain) for chain in chains]


def _outline(connections) -> np.ndarray:
    """One closed outline from a group drawn as two contours running the same way (eyes, brows)."""
    first, second = _chains(connections)
    return np.concatenate([first, second[::-1]])


_OVAL = _chains(Mesh.FACE_LANDMARKS_FACE_OVAL)[0]
_RIGHT_EYE = _outline(Mesh.FACE_LANDMARKS_RIGHT_EYE)
_LEFT_EYE = _outline(Mesh.FACE_LANDMARKS_LEFT_EYE)
_RIGHT_BROW = _outline(Mesh.FACE_LANDMARKS_RIGHT_EYEBROW)
_LEFT_BROW = _outline(Mesh.FACE_LANDMARKS_LEFT_EYEBROW)
_NOSE = np.unique([i for edge in Mesh.FACE_LANDMARKS_NOSE for i in (edge.start, edge.end)])
_LIP_CHAINS = _chains(Mesh.FACE_LANDMARKS_LIPS)


def _fixed_point(points: np.ndarray) -> np.ndarray:
    """Continuous crop coordinates -> cv2's fixed-point pixel-index coordinates."""
    return np.round((points - 0.5) * (1 << _SHIFT)).astype(np.int32)


def _fill(canvas: np.ndarray, points: np.ndarray, label: int) -> None:
    cv2.fillPoly(canvas, [_fixed_point(points)], label, lineType=cv2.LINE_8, shift=_SHIFT)


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2


def _lip_contours(points: np.ndarray, up: np.ndarray) -> dict[str, np.ndarray]:
    """The four lip contours (outer/inner x upper/lower), each running corner to corner.

    The LIPS group is four paths; paths sharing both corners form the outer or the inner contour.
    Which pair is outer (larger area) and which path is upper (higher along the face's `up`) is
    decided from the geometry rather than from the order MediaPipe happens to list them in.
    """
    pairs: dict[tuple[int, int], list[np.ndarray]] = {}
    for chain in _LIP_CHAINS:
        pairs.setdefault((chain[0], chain[-1]), []).append(points[chain])
    (first, second) = sorted(
        pairs.values(), key=lambda pair: -_area(np.concatenate([pair[0], pair[1][::-1]]))
    )
    contours = {}
    for name, (a, b) in (("outer", first), ("inner", second)):
        upper, lower = (a, b) if a.mean(0) @ up > b.mean(0) @ up else (b, a)
        contours[f"{name}_upper"], contours[f"{name}_lower"] = upper, lower
    return contours


def _paint_hair(
    canvas: np.ndarray, oval: np.ndarray, up: np.ndarray, eye_level: np.ndarray, face_height: float
) -> None:
    """Paints an approximate hair region: a cap around the top of the head.

    The face oval is scaled by 1 + HAIR_GROWTH about its centroid and shifted along the face's up
    direction by HAIR_LIFT face heights (face height = the oval's extent along `up`); the hair is
    the part of that grown oval on the upper side of the line through the eyes (perpendicular to
    `up`). The face is painted over it afterwards, so what stays is a band of about a quarter face
    height above the forehead that narrows down the temples to eye level, clipped to the crop.
    It is a geometric prior, not a segmentation: it marks hair on a bald head and misses long hair.
    """
    centroid = oval.mean(0)
    grown = centroid + (oval - centroid) * (1 + HAIR_GROWTH) + up * (HAIR_LIFT * face_height)
    across = np.array([up[1], -up[0]])
    reach = 4 * canvas.shape[0]
    upper_side = eye_level + reach * np.stack([-across, across, across + up, -across + up])
    cap, half_plane = np.zeros_like(canvas), np.zeros_like(canvas)
    _fill(cap, grown, 1)
    _fill(half_plane, upper_side, 1)
    canvas[(cap & half_plane).astype(bool)] = REGION_LABELS["hair"]


def _paint_brow(canvas: np.ndarray, outline: np.ndarray, label: int, thickness: int) -> None:
    _fill(canvas, outline, label)
    cv2.polylines(canvas, [_fixed_point(outline)], True, label, thickness=thickness,
                  lineType=cv2.LINE_8, shift=_SHIFT)


def region_map(points: np.ndarray, size: int) -> np.ndarray:
    """(468, 2) landmarks in crop pixels -> (size, size) uint8 region labels (REGION_LABELS)."""
    canvas = np.zeros((size, size), np.uint8)
    eye_level = (points[_RIGHT_EYE].mean(0) + points[_LEFT_EYE].mean(0)) / 2
    towards_eyes = eye_level - points[np.concatenate(_LIP_CHAINS)].mean(0)
    up = towards_eyes / np.linalg.norm(towards_eyes)
    oval = points[_OVAL]
    face_height = float(np.ptp(oval @ up))
    _paint_hair(canvas, oval, up, eye_level, face_height)
    _fill(canvas, oval, REGION_LABELS["skin"])
    _fill(canvas, cv2.convexHull(points[_NOSE].astype(np.float32))[:, 0], REGION_LABELS["nose"])
    brow_thickness = max(1, round(BROW_THICKNESS * face_height))
    _paint_brow(canvas, points[_RIGHT_BROW], REGION_LABELS["right_brow"], brow_thickness)
    _paint_brow(canvas, points[_LEFT_BROW], REGION_LABELS["left_brow"], brow_thickness)
    _fill(canvas, points[_RIGHT_EYE], REGION_LABELS["right_eye"])
    _fill(canvas, points[_LEFT_EYE], REGION_LABELS["left_eye"])
    lips = _lip_contours(points, up)
    _fill(canvas, np.concatenate([lips["outer_upper"], lips["inner_upper"][::-1]]),
          REGION_LABELS["upper_lip"])
    _fill(canvas, np.concatenate([lips["outer_lower"], lips["inner_lower"][::-1]]),
          REGION_LABELS["lower_lip"])
    _fill(canvas, np.concatenate([lips["inner_upper"], lips["inner_lower"][::-1]]),
          REGION_LABELS["inner_mouth"])
    return canvas
