"""Tests for marlin_jax.faces: detection, landmarks, the official crop, region maps (CPU)."""

import concurrent.futures.thread
import gc
import pickle
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from marlin_jax import masking
from marlin_jax.faces import REGION_LABELS, FaceCropper, FaceCrops, NoFaceError
from marlin_jax.faces import detection as detection_module
from marlin_jax.faces.crop import OFFICIAL_BOX_SCALE, OFFICIAL_BOX_SHIFT, crop_square, to_crop_coordinates
from marlin_jax.faces.cropper import fill_missing, smooth_squares
from marlin_jax.faces.detection import LEFT_EYE, MOUTH_CENTRE, NOSE_TIP, RIGHT_EYE, FaceDetection, FaceDetector
from marlin_jax.faces.landmarks import FaceLandmarker, roi_from_detection
from marlin_jax.faces.tracking import FaceTracker, FrameFace, place_boxes
from mediapipe.tasks.python.vision import FaceLandmarksConnections

MESH_RIGHT_EYE = sorted({e.start for e in FaceLandmarksConnections.FACE_LANDMARKS_RIGHT_EYE})
MESH_LEFT_EYE = sorted({e.start for e in FaceLandmarksConnections.FACE_LANDMARKS_LEFT_EYE})


@pytest.fixture(scope="module")
def cropper() -> FaceCropper:
    return FaceCropper()


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def test_a_detector_collected_during_an_executor_submit_is_closed_later_without_deadlock():
    """A garbage collection can run inside ThreadPoolExecutor.submit, which holds concurrent.futures' process-wide
    lock (a private name, held here to stand for that moment), and closing MediaPipe's detector submits too: the
    collected detector must wait to be closed, not block on that lock (data_prep hung there with one worker)."""
    waiting = []

    def collect_inside_submit():
        gc.collect()  # detectors left unreachable by earlier tests in this process are queued now, not below
        detector = FaceDetector()  # closes them first
        detector.itself = detector  # a cycle: only the collector frees it
        del detector
        with concurrent.futures.thread._global_shutdown_lock:
            gc.collect()
        waiting.append(len(detection_module._released))
        next_detector = FaceDetector()  # closes the collected one first
        waiting.append(len(detection_module._released))
        next_detector.close()

    worker = threading.Thread(target=collect_inside_submit, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "closing a collected detector waited on the executor's lock"
    assert waiting[0] >= 1 and waiting[1] == 0, waiting


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
    points = FaceLandmarker().landmarks(image, roi_from_detection(detection)).points
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


def squares_after(stage, squares, *args) -> list:
    """The squares a streaming stage gives to items (frame number, None, square)."""
    items = [(t, None, None if square is None else np.asarray(square, float)) for t, square in enumerate(squares)]
    out = list(stage(iter(items), *args))
    assert [t for t, _, _ in out] == list(range(len(squares)))  # every frame once, in order
    return [square for _, _, square in out]


def test_fill_missing_carries_the_last_square_and_gives_leading_frames_the_first():
    squares = [None, None, [1, 1, 1], None, [2, 2, 2], None]
    np.testing.assert_array_equal(squares_after(fill_missing, squares, 10), [[1] * 3] * 4 + [[2] * 3] * 2)


def test_fill_missing_holds_at_most_max_held_frames_then_centres_the_square():
    frame = np.zeros((40, 100, 3), np.uint8)
    items = [(frame, None, None)] * 3 + [(frame, None, np.array([7.0, 7.0, 7.0]))]
    out = [square for _, _, square in fill_missing(iter(items), 1)]
    np.testing.assert_array_equal(out, [[50, 20, 20], [50, 20, 20], [7, 7, 7], [7, 7, 7]])


def test_smooth_squares_is_a_centred_window_shrinking_at_the_ends():
    squares = np.arange(21, dtype=float).reshape(7, 3) ** 2
    expected = [squares[max(0, t - r): t + r + 1].mean(0)
                for t, r in enumerate(min(t, 6 - t, 2) for t in range(7))]
    np.testing.assert_allclose(squares_after(smooth_squares, squares, 5), expected)
    np.testing.assert_array_equal(squares_after(smooth_squares, squares, 1), squares)
    linear = np.linspace(0, 40, 30)[:, None] * np.ones(3)
    np.testing.assert_allclose(squares_after(smooth_squares, linear, 5), linear)  # no lag on steady motion
    with pytest.raises(ValueError):
        list(smooth_squares(iter([]), 4))


def test_smoothing_reduces_jitter():
    rng = np.random.default_rng(0)
    path = np.stack([np.linspace(100, 160, 60), np.full(60, 80.0), np.full(60, 50.0)], 1)
    noisy = path + rng.normal(0, 2, path.shape)
    raw_jitter = np.diff(noisy[:, :2], axis=0).std()
    smooth_jitter = np.diff(np.array(squares_after(smooth_squares, noisy, 5))[:, :2], axis=0).std()
    assert smooth_jitter < 0.5 * raw_jitter


def test_pickles_cheaply_and_works_after(cropper):
    payload = pickle.dumps(cropper)
    assert len(payload) < 1000
    copy = pickle.loads(payload)
    image = skimage.data.astronaut()
    np.testing.assert_array_equal(copy.process_image(image).frames, cropper.process_image(image).frames)


def test_sample_video_finds_faces_and_smoothing_steadies_the_box(samples_dir):
    frames = read_frames(samples_dir / "video01.mp4", 48)
    smoothed = FaceCropper(tracking=False).process_video(frames)
    assert smoothed.frames.shape == (48, 224, 224, 3)
    assert smoothed.face_found.mean() > 0.9
    assert smoothed.region_maps[smoothed.face_found].any(axis=(1, 2)).all()
    raw = FaceCropper(smoothing=1, tracking=False).process_video(frames)
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


# --- detect, then track ------------------------------------------------------------------------------------

class CountingDetector:
    def __init__(self, detector: FaceDetector):
        self.detector = detector
        self.frames: list[int] = []
        self.frame = -1

    def detect(self, image: np.ndarray) -> FaceDetection | None:
        self.frames.append(self.frame)
        return self.detector.detect(image)


def moving_astronaut(count: int) -> list[np.ndarray]:
    return [np.roll(skimage.data.astronaut(), (3 * t, 2 * t), axis=(0, 1)) for t in range(count)]


def test_tracker_detects_on_the_first_frame_every_k_frames_and_when_the_face_is_lost(detector):
    blank = np.zeros((512, 512, 3), np.uint8)
    frames = moving_astronaut(10) + [blank, blank] + moving_astronaut(4)
    counting = CountingDetector(detector)
    tracker = FaceTracker(counting, FaceLandmarker(), redetect_every=4)
    faces = []
    for counting.frame, frame in enumerate(frames):
        faces.append(tracker.find(frame))
    # Frame 10: the landmark model no longer sees a face, so the detector runs there (and finds none).
    assert counting.frames == [0, 4, 8, 10, 11, 12]
    assert [face is not None for face in faces] == [True] * 10 + [False] * 2 + [True] * 4
    assert [t for t, face in enumerate(faces) if face and face.detection] == [0, 4, 8, 12]
    # A tracked face is where the detector would find it.
    for t in (3, 14):
        truth = FaceLandmarker().landmarks(frames[t], roi_from_detection(detector.detect(frames[t]))).points
        assert np.median(np.linalg.norm(faces[t].points - truth, axis=1)) < 1.0


def synthetic_face(scale: float, shift: tuple[float, float], box_offset=(0.0, 0.0), box_side=1.0,
                   detected: bool = False) -> FrameFace:
    """Landmarks filling [0, 1]^2 scaled and moved; with `detected`, a detection whose box sits on them
    `box_offset` (in landmark extents) from their centre with side `box_side` extents."""
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 18), np.linspace(0, 1, 26)), -1).reshape(-1, 2)
    points = (grid * scale + shift).astype(np.float32)
    if not detected:
        return FrameFace(points=points)
    centre = np.array(shift) + scale * (0.5 + np.array(box_offset))
    half = scale * box_side / 2
    eyes = np.array([[0.3, 0.4], [0.7, 0.4]]) * scale + shift
    detection = FaceDetection(box=np.concatenate([centre - half, centre + half]).astype(np.float32),
                              keypoints=np.concatenate([eyes, np.zeros((4, 2))]).astype(np.float32), score=0.9)
    return FrameFace(points=points, detection=detection)


def test_place_boxes_interpolates_between_detections_within_a_track():
    faces = [synthetic_face(100, (0, 0), (0.1, 0.0), 1.2, detected=True),
             synthetic_face(110, (10, 0)), synthetic_face(120, (20, 0)), synthetic_face(130, (30, 0)),
             synthetic_face(140, (40, 0), (0.3, 0.1), 1.6, detected=True),
             synthetic_face(150, (50, 0)), None, synthetic_face(100, (0, 0), detected=True)]
    placed = list(place_boxes(enumerate(faces)))
    assert [t for t, _, _ in placed] == list(range(8))
    boxes = [box for _, _, box in placed]
    np.testing.assert_allclose(boxes[0], faces[0].detection.box)
    np.testing.assert_allclose(boxes[4], faces[4].detection.box)
    assert boxes[6] is None
    # Frame 2, halfway: offset (0.2, 0.05) and side 1.4 landmark extents (120 px), from centre (80, 60).
    np.testing.assert_allclose(boxes[2], [80 + 24 - 84, 60 + 6 - 84, 80 + 24 + 84, 60 + 6 + 84], atol=1e-3)
    # Frame 5 ends its track: the last detection's calibration, on its own landmarks (extent 150).
    np.testing.assert_allclose(boxes[5], [125 + 45 - 120, 75 + 15 - 120, 125 + 45 + 120, 75 + 15 + 120], atol=1e-3)


def test_iter_video_streams_and_matches_process_video(detector):
    frames = moving_astronaut(14)
    cropper = FaceCropper(redetect_every=3)
    pulled = 0

    def source():
        nonlocal pulled
        for frame in frames:
            pulled += 1
            yield frame

    streamed = []
    for t, crop in enumerate(cropper.iter_video(source())):
        # Frame t waits for the next detection (at most 3 frames on) and the smoothing window (2 more).
        assert pulled <= t + 3 + 2 + 1
        streamed.append(crop)
    crops = FaceCrops.stack(streamed)
    assert crops.detected.tolist() == [t % 3 == 0 for t in range(14)]
    whole = cropper.process_video(np.stack(frames))
    for field in ("frames", "region_maps", "face_found", "boxes", "landmarks", "detected"):
        np.testing.assert_array_equal(getattr(crops, field), getattr(whole, field))


def test_frame_size_changing_within_a_video_is_refused(cropper):
    frames = [skimage.data.astronaut(), skimage.data.astronaut()[:500]]
    with pytest.raises(ValueError, match="frame size changes"):
        list(cropper.iter_video(iter(frames)))


@pytest.mark.parametrize("name", ["video01.mp4", "video04.mp4"])
def test_tracking_agrees_with_the_per_frame_path(samples_dir, name):
    # The issue-15 targets; benchmarks/faces_tracking_quality.py measures all ten sample videos.
    frames = read_frames(samples_dir / name, 48)
    per_frame = FaceCropper(tracking=False).process_video(frames)
    tracked = FaceCropper().process_video(frames)
    np.testing.assert_array_equal(tracked.face_found, per_frame.face_found)
    both = tracked.face_found
    assert np.median(np.linalg.norm(tracked.landmarks[both] - per_frame.landmarks[both], axis=-1)) <= 1.0
    assert (tracked.region_maps[both] == per_frame.region_maps[both]).mean() >= 0.97
    assert tracked.detected.mean() < 0.5
