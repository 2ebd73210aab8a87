"""Frames per second of the face path (find the face + crop + region map) on ONE CPU core.

    python benchmarks/faces_throughput.py                      # sample videos, or astronaut frames
    python benchmarks/faces_throughput.py --video my.mp4 --frames 300

Pins itself to one core before loading the models (their worker threads inherit the pin), decodes
the frames first (not timed) and prints one JSON object: per input and per path (detect then track,
and the detector on every frame), frames/s on that core and the mean milliseconds per frame, measured
in the same run. Inputs: video01.mp4 (480x360) and video04.mp4 (1280x720) from
the sample face videos in $MARLIN_SAMPLES_DIR when set, else 512x512 frames synthesised from
skimage.data.astronaut() (shifted a little each frame so the detector does real work).
"""

import argparse
import json
import os
import time
from pathlib import Path

import av
import cv2
import numpy as np
import skimage.data

from marlin_jax.faces import FaceCropper

SAMPLES = Path(os.environ["MARLIN_SAMPLES_DIR"]) if "MARLIN_SAMPLES_DIR" in os.environ else None
SAMPLE_VIDEOS = ("video01.mp4", "video04.mp4")


def decode(path: Path, count: int) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(count), container.decode(video=0))]
    return np.stack(frames)


def astronaut_frames(count: int) -> np.ndarray:
    offsets = np.round(8 * np.sin(np.arange(count) / 5)).astype(int)
    return np.stack([np.roll(skimage.data.astronaut(), offset, axis=1) for offset in offsets])


def measure(cropper: FaceCropper, frames: np.ndarray, repeats: int) -> dict:
    cropper.process_video(frames[:4])  # warm-up: first-call allocations in both models
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        crops = cropper.process_video(frames)
        best = min(best, time.perf_counter() - start)
    return {
        "frames": len(frames),
        "height": frames.shape[1],
        "width": frames.shape[2],
        "face_found": round(float(crops.face_found.mean()), 3),
        "frames_per_s_one_core": round(len(frames) / best, 1),
        "ms_per_frame": round(1e3 * best / len(frames), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, action="append", help="video file(s) to time")
    parser.add_argument("--frames", type=int, default=150, help="frames per input")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per input (best kept)")
    parser.add_argument("--core", type=int, default=min(os.sched_getaffinity(0)))
    args = parser.parse_args()

    os.sched_setaffinity(0, {args.core})
    cv2.setNumThreads(1)  # as in data_prep's workers
    croppers = {"tracking": FaceCropper(), "per_frame": FaceCropper(tracking=False)}
    videos = args.video or [SAMPLES / name for name in SAMPLE_VIDEOS if SAMPLES and (SAMPLES / name).exists()]
    inputs = {path.name: decode(path, args.frames) for path in videos}
    if not inputs:
        inputs = {"astronaut_synthetic": astronaut_frames(args.frames)}
    results = {name: {path: measure(cropper, frames, args.repeats) for path, cropper in croppers.items()}
               for name, frames in inputs.items()}
    print(json.dumps({"core": args.core, "smoothing": croppers["tracking"].smoothing,
                      "redetect_every": croppers["tracking"].redetect_every, "inputs": results}, indent=1))


if __name__ == "__main__":
    main()
