"""Tests for marlin_jax.faces: detection, landmarks, the official crop, region maps (CPU)."""

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from marlin_jax import masking
from marlin_jax.faces import REGION_LABELS, FaceCropper, FaceCrops, NoFaceError
from marlin_jax.faces.crop import (
    OFFICIAL_BOX_SCALE,
    OFFICIAL_BOX_SHIFT,
    crop_square,
    fill_missing,
    smooth_squares,
    to_crop_coordinates,
)
from marlin_jax.faces.detection import LEFT_EYE, MOUTH_CENTRE, NOSE_TIP, RIGHT_EYE, FaceDetector
from marlin_jax.faces.landmarks import FaceLandmarker
from mediapipe.tasks.python.vision import FaceLandmarksConnections

MESH_RIGHT_EYE = sorted({e.start for e in FaceLandmarksConnections.FACE_LANDMARKS_RIGHT_EYE})
MESH_LEFT_EYE = sorted({e.start for e in FaceLandmarksConnections.FACE_LANDMARKS_LEFT_EYE})


@pytest.fixture(scope="module")
def cropper() -> FaceCropper:
    return FaceCropper()


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def rotated_astronaut(degrees: float) -> np.ndarray:
    image = skimage.data.astronaut()
    return cv2.warpAffine(image, cv2.getRotationMatrix2D((256, 256), degrees, 1.0), (512, 512))


def square_of(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2])


def read_frames(path: Path, count: int) -> np.ndarray:
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(count), container.decode(video=0))]
    return np.stack(frames)


def test_astronaut_one_face_square_crop_from_detection_box(cropper, detector):
    image = skimage.data.astronaut()
    crops = cropper.process_image(image)
    assert isinstance(crops, FaceCrops)
    assert crops.frames.shape == (1, 224, 224, 3) and crops.frames.dtype == np.uint8
    assert crops.region_maps.shape == (1, 224, 224) and crops.region_maps.dtype == np.uint8
    assert crops.face_found.tolist() == [True]
    assert crops.boxes.shape == (1, 4) and crops.boxes.dtype == np.float32

    x0, y0, x1, y1 = detector.detect(image).box
    side = max(x1 - x0, y1 - y0)
    bx0, by0, bx1, by1 = crops.boxes[0]
    assert bx1 - bx0 == pytest.approx(by1 - by0)
    assert bx1 - bx0 == pytest.approx(OFFICIAL_BOX_SCALE * side, abs=1e-3)
    assert (bx0 + bx1) / 2 == pytest.approx((x0 + x1) / 2, abs=1e-3)
    assert (by0 + by1) / 2 == pytest.approx((y0 + y1) / 2 - OFFICIAL_BOX_SHIFT * side, abs=1e-3)
    # The crop shows that square of the source (up to the float32 rounding of `boxes`).
    expected = crop_square(image, square_of(crops.boxes[0]), 224)
    assert np.abs(crops.frames[0].astype(int) - expected).max() <= 1


def test_official_rule_without_calibration(detector):
    image = skimage.data.astronaut()
    box = FaceCropper(box_scale=1.0, box_shift=0.0).process_image(image).boxes[0]
    np.testing.assert_allclose(box, detector.detect(image).box, atol=1e-3)  # BlazeFace boxes are square


def test_crop_square_matches_pad_then_resize():
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    x0, y0, half = -20, 30, 50  # leaves the frame on the left and at the bottom
    padded = np.zeros((2 * half, 2 * half, 3), np.uint8)
    padded[: 120 - y0, -x0:] = image[y0:, : x0 + 2 * half]
    official = cv2.resize(padded, (224, 224))
    ours = crop_square(image, np.array([x0 + half, y0 + half, half]), 224)
    # The outermost output pixels differ where the square edge lies inside the image: resizing the
    # cut-out replicates its edge, the warp reads the real neighbouring pixels.
    assert np.abs(ours.astype(int) - official.astype(int))[1:-1, 1:-1].max() <= 1


@pytest.mark.parametrize("degrees", [0, 25])
def test_landmark_eyes_match_detector_eye_keypoints(detector, degrees):
    image = rotated_astronaut(degrees)
    detection = detector.detect(image)
    points = FaceLandmarker().landmarks(image, detection).points
    iod = np.linalg.norm(detection.keypoints[LEFT_EYE] - detection.keypoints[RIGHT_EYE])
    for eye, keypoint in ((MESH_RIGHT_EYE, RIGHT_EYE), (MESH_LEFT_EYE, LEFT_EYE)):
        error = np.linalg.norm(points[eye].mean(0) - detection.keypoints[keypoint])
        assert error < 0.15 * iod


@pytest.mark.parametrize("degrees", [0, 25])
def test_eye_nose_mouth_labels_sit_on_detector_keypoints(cropper, detector, degrees):
    image = rotated_astronaut(degrees)
    crops = cropper.process_image(image)
    labels = crops.region_maps[0]
    keypoints = to_crop_coordinates(detector.detect(image).keypoints, square_of(crops.boxes[0]), 224)
    iod = np.linalg.norm(keypoints[LEFT_EYE] - keypoints[RIGHT_EYE])
    rows, cols = np.mgrid[:224, :224]
    centres = np.stack([cols + 0.5, rows + 0.5], -1)
    for name, own, other in (("right_eye", RIGHT_EYE, LEFT_EYE), ("left_eye", LEFT_EYE, RIGHT_EYE)):
        pixels = centres[labels == REGION_LABELS[name]]
        distances = np.linalg.norm(pixels - keypoints[own], axis=1)
        assert distances.min() < 0.12 * iod
        centroid = pixels.mean(0)
        assert np.linalg.norm(centroid - keypoints[own]) < 0.2 * iod
        assert np.linalg.norm(centroid - keypoints[own]) < np.linalg.norm(centroid - keypoints[other])
    nose_x, nose_y = keypoints[NOSE_TIP].astype(int)
    assert labels[nose_y, nose_x] == REGION_LABELS["nose"]
    mouth_x, mouth_y = keypoints[MOUTH_CENTRE].astype(int)
    radius = int(0.15 * iod)
    around_mouth = labels[mouth_y - radius: mouth_y + radius + 1, mouth_x - radius: mouth_x + radius + 1]
    mouth_labels = {REGION_LABELS[n] for n in ("upper_lip", "inner_mouth", "lower_lip")}
    assert mouth_labels <= set(np.unique(around_mouth).tolist())


def test_subject_right_eye_is_on_image_left_for_a_frontal_photo(cropper):
    labels = cropper.process_image(skimage.data.astronaut()).region_maps[0]
    for right, left in (("right_eye", "left_eye"), ("right_brow", "left_brow")):
        right_x = np.nonzero(labels == REGION_LABELS[right])[1].mean()
        left_x = np.nonzero(labels == REGION_LABELS[left])[1].mean()
        assert right_x < 112 < left_x


def test_region_map_layout(cropper):
    labels = cropper.process_image(skimage.data.astronaut()).region_maps[0]
    present = set(np.unique(labels).tolist())
    assert present == set(REGION_LABELS.values())
    row_of = {name: np.nonzero(labels == value)[0].mean() for name, value in REGION_LABELS.items()}
    assert row_of["hair"] < row_of["right_brow"] < row_of["right_eye"] < row_of["nose"]
    assert row_of["nose"] < row_of["upper_lip"] < row_of["inner_mouth"] < row_of["lower_lip"]
    hair_rows = np.nonzero(labels == REGION_LABELS["hair"])[0]
    skin_rows = np.nonzero(labels == REGION_LABELS["skin"])[0]
    assert hair_rows.min() < skin_rows.min()
    assert 0.02 < (labels == REGION_LABELS["hair"]).mean() < 0.3
    # Brows are thick enough to survive a 16-px patch grid and to be seen at all.
    assert (labels == REGION_LABELS["right_brow"]).sum() > 200


def test_region_labels_fill_the_label_range_fasking_reads():
    # masking.occupancy_from_region_maps keeps one bit per label in [0, NUM_LABELS).
    assert sorted(REGION_LABELS.values()) == list(range(masking.NUM_LABELS))


def test_blank_image_raises_no_face_error(cropper):
    with pytest.raises(NoFaceError):
        cropper.process_image(np.zeros((256, 256, 3), np.uint8))
    assert issubclass(NoFaceError, ValueError)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((64, 64, 3), np.float32),
        np.zeros((64, 64), np.uint8),
        np.zeros((64, 64, 4), np.uint8),
        np.zeros((2, 64, 64, 3), np.uint8),
        np.zeros((0, 64, 3), np.uint8),
        [[[0, 0, 0]]],
    ],
)
def test_process_image_rejects_bad_input(cropper, bad):
    with pytest.raises(ValueError, match="image"):
        cropper.process_image(bad)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((0, 64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8), np.zeros((2, 64, 64, 3), int)],
)
def test_process_video_rejects_bad_input(cropper, bad):
    with pytest.raises(ValueError, match="frames"):
        cropper.process_video(bad)


def test_strided_frames_give_the_same_crop(cropper):
    # MediaPipe misreads non-contiguous buffers (PyAV pads rows of odd-width video, e.g. 470 px).
    image = skimage.data.astronaut()[:, :-1]
    assert not image.flags["C_CONTIGUOUS"]
    strided = cropper.process_image(image)
    contiguous = cropper.process_image(np.ascontiguousarray(image))
    np.testing.assert_array_equal(strided.boxes, contiguous.boxes)
    np.testing.assert_array_equal(strided.region_maps, contiguous.region_maps)


def test_frames_without_face_reuse_a_box_and_have_no_map():
    face, blank = skimage.data.astronaut(), np.zeros((512, 512, 3), np.uint8)
    shifted = np.roll(face, 40, axis=1)
    crops = FaceCropper(smoothing=1).process_video(np.stack([blank, face, blank, shifted, blank]))
    assert crops.face_found.tolist() == [False, True, False, True, False]
    np.testing.assert_array_equal(crops.boxes[0], crops.boxes[1])  # before the first face: the first
    np.testing.assert_array_equal(crops.boxes[2], crops.boxes[1])  # carried over
    np.testing.assert_array_equal(crops.boxes[4], crops.boxes[3])
    assert crops.boxes[3, 0] == pytest.approx(crops.boxes[1, 0] + 40, abs=2)
    assert not crops.region_maps[[0, 2, 4]].any()
    assert crops.region_maps[[1, 3]].any(axis=(1, 2)).all()


def test_fill_missing_and_smoothing_helpers():
    squares = np.arange(15, dtype=float).reshape(5, 3)
    found = np.array([False, False, True, False, True])
    np.testing.assert_array_equal(fill_missing(squares, found), squares[[2, 2, 2, 2, 4]])
    np.testing.assert_array_equal(smooth_squares(squares, 1), squares)
    linear = np.linspace(0, 40, 30)[:, None] * np.ones(3)
    np.testing.assert_allclose(smooth_squares(linear, 5), linear)  # no lag on steady motion
    with pytest.raises(ValueError):
        smooth_squares(squares, 4)


def test_smoothing_reduces_jitter():
    rng = np.random.default_rng(0)
    path = np.stack([np.linspace(100, 160, 60), np.full(60, 80.0), np.full(60, 50.0)], 1)
    noisy = path + rng.normal(0, 2, path.shape)
    raw_jitter = np.diff(noisy[:, :2], axis=0).std()
    smooth_jitter = np.diff(smooth_squares(noisy, 5)[:, :2], axis=0).std()
    assert smooth_jitter < 0.5 * raw_jitter


def test_pickles_cheaply_and_works_after(cropper):
    payload = pickle.dumps(cropper)
    assert len(payload) < 1000
    copy = pickle.loads(payload)
    image = skimage.data.astronaut()
    np.testing.assert_array_equal(copy.process_image(image).frames, cropper.process_image(image).frames)


def test_sample_video_finds_faces_and_smoothing_steadies_the_box(cropper, samples_dir):
    frames = read_frames(samples_dir / "video01.mp4", 48)
    smoothed = cropper.process_video(frames)
    assert smoothed.frames.shape == (48, 224, 224, 3)
    assert smoothed.face_found.mean() > 0.9
    assert smoothed.region_maps[smoothed.face_found].any(axis=(1, 2)).all()
    raw = FaceCropper(smoothing=1).process_video(frames)
    centre_steps = {name: np.diff((c.boxes[:, :2] + c.boxes[:, 2:]) / 2, axis=0)
                    for name, c in (("raw", raw), ("smoothed", smoothed))}
    assert centre_steps["smoothed"].std() < 0.7 * centre_steps["raw"].std()


def test_official_crop_video_is_framed_like_the_official_crop(cropper, samples_dir):
    frames = read_frames(samples_dir / "cropped01.mp4", 32)
    crops = cropper.process_video(frames)
    assert crops.face_found.mean() > 0.9
    x0, y0, x1, y1 = crops.boxes.T
    overlap = (np.minimum(x1, 224) - np.maximum(x0, 0)) * (np.minimum(y1, 224) - np.maximum(y0, 0))
    iou = overlap / ((x1 - x0) * (y1 - y0) + 224 * 224 - overlap)
    assert np.median(iou) > 0.85
