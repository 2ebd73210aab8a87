"""How closely detect-then-track follows the per-frame path (detector on every frame), on the sample videos.

    python benchmarks/faces_tracking_quality.py [--videos DIR] [--redetect-every 3] [--no-noise-floor]

Runs FaceCropper over each of the sample face videos ($MARLIN_SAMPLES_DIR, or --videos) with tracking and
without, and prints JSON pooled over all frames and per video:
- landmark_px_median / _p90: distance between the two paths' landmarks, in source pixels, over all
  landmarks of the frames where both found a face (_tracked_frames: only where tracking did not run the
  detector, so that the two paths differ);
- crop_iou_median / _min: IoU of the two crop squares per frame;
- region_map_agreement: share of the crops' pixels with the same label on frames where both found a
  face (pooled; also on tracked frames only), and its worst frame;
- missed_faces / false_faces: frames where only the per-frame path / only tracking found a face;
- detector_share: share of frames the detector ran on with tracking.
The noise floor, `per_frame_vs_itself_shifted_1px`, compares the per-frame path with itself on the videos
moved by one pixel (its outputs moved back): how far the reference itself moves under a change that
should change nothing.
"""

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_prep.frames import iter_video_frames
from marlin_jax.faces import FaceCropper, FaceCrops
from marlin_jax.faces.tracking import DEFAULT_REDETECT_EVERY

SAMPLES = Path(os.environ["MARLIN_SAMPLES_DIR"]) if "MARLIN_SAMPLES_DIR" in os.environ else None


def crop_video(cropper: FaceCropper, frames: Iterator[np.ndarray]) -> FaceCrops:
    return FaceCrops.stack(list(cropper.iter_video(frames)))


def shifted(frames: Iterator[np.ndarray], pixels: int) -> Iterator[np.ndarray]:
    """The frames moved right and down by `pixels`, zeros filling in."""
    for frame in frames:
        moved = np.zeros_like(frame)
        moved[pixels:, pixels:] = frame[:-pixels, :-pixels]
        yield moved


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    low, high = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    overlap = np.prod(np.clip(high - low, 0, None), axis=1)
    area = lambda boxes: np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)  # noqa: E731
    return overlap / (area(a) + area(b) - overlap)


def compare(reference: FaceCrops, other: FaceCrops, offset: float = 0.0) -> dict:
    """Raw per-frame comparisons of `other` with `reference`, pooled later; `offset` is how far `other`'s
    input was shifted."""
    both = reference.face_found & other.face_found
    tracked = ~other.detected
    distances = np.linalg.norm(reference.landmarks - (other.landmarks - offset), axis=-1)  # (T, 468)
    same = (reference.region_maps == other.region_maps).mean(axis=(1, 2))
    return {"frames": len(both), "both": int(both.sum()), "distances": distances[both].ravel(),
            "tracked_distances": distances[both & tracked].ravel(), "agreement": same[both],
            "tracked_agreement": same[both & tracked], "iou": box_iou(reference.boxes, other.boxes - offset),
            "missed": int((reference.face_found & ~other.face_found).sum()),
            "false": int((other.face_found & ~reference.face_found).sum()), "detected": int((~tracked).sum())}


def _pooled(parts: list[dict], key: str) -> np.ndarray:
    return np.concatenate([part[key] for part in parts])


def _rounded(values: np.ndarray, statistic, digits: int) -> float | None:
    return round(float(statistic(values)), digits) if values.size else None


def summary(parts: list[dict]) -> dict:
    distances, tracked_distances = _pooled(parts, "distances"), _pooled(parts, "tracked_distances")
    agreement, tracked_agreement = _pooled(parts, "agreement"), _pooled(parts, "tracked_agreement")
    iou = _pooled(parts, "iou")
    frames = sum(part["frames"] for part in parts)
    return {
        "frames": frames,
        "frames_with_face_in_both": sum(part["both"] for part in parts),
        "landmark_px_median": _rounded(distances, np.median, 3),
        "landmark_px_p90": _rounded(distances, lambda d: np.percentile(d, 90), 3),
        "landmark_px_median_tracked_frames": _rounded(tracked_distances, np.median, 3),
        "crop_iou_median": _rounded(iou, np.median, 4),
        "crop_iou_min": _rounded(iou, np.min, 4),
        "region_map_agreement": _rounded(agreement, np.mean, 4),
        "region_map_agreement_tracked_frames": _rounded(tracked_agreement, np.mean, 4),
        "region_map_agreement_worst_frame": _rounded(agreement, np.min, 4),
        "missed_faces": sum(part["missed"] for part in parts),
        "false_faces": sum(part["false"] for part in parts),
        "detector_share": round(sum(part["detected"] for part in parts) / frames, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=Path, default=SAMPLES, required=SAMPLES is None)
    parser.add_argument("--redetect-every", type=int, default=DEFAULT_REDETECT_EVERY)
    parser.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                        help="skip the per-frame path's comparison with itself on the shifted videos")
    args = parser.parse_args()
    videos = sorted(args.videos.rglob("*.mp4"))
    if not videos:
        raise SystemExit(f"no .mp4 videos under {args.videos}")
    per_frame = FaceCropper(tracking=False)
    tracking = FaceCropper(tracking=True, redetect_every=args.redetect_every)
    per_video, tracking_parts, floor_parts = {}, [], []
    for path in videos:
        reference = crop_video(per_frame, iter_video_frames(str(path)))
        tracked = crop_video(tracking, iter_video_frames(str(path)))
        tracking_parts.append(compare(reference, tracked))
        per_video[path.name] = summary(tracking_parts[-1:])
        if args.noise_floor:
            moved = crop_video(per_frame, shifted(iter_video_frames(str(path)), 1))
            floor_parts.append(compare(reference, moved, offset=1.0))
    result = {"videos": str(args.videos), "redetect_every": args.redetect_every,
              "tracking_vs_per_frame": summary(tracking_parts)}
    if args.noise_floor:
        floor = summary(floor_parts)
        result["per_frame_vs_itself_shifted_1px"] = {key: floor[key] for key in (
            "landmark_px_median", "landmark_px_p90", "crop_iou_median", "region_map_agreement",
            "missed_faces", "false_faces")}
    result["tracking_vs_per_frame_per_video"] = per_video
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
