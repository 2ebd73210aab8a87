"""data_prep end to end (decode -> face crop + region map -> JPEG/PNG -> TFRecord), in frames per second.

    python benchmarks/data_prep_throughput.py [--videos DIR] [--workers 1 2]

Times `build_dataset` over the sample videos (../shared/data/marlin_samples; else the demo videos, made on
the spot) once per worker count, after the face models are loaded, and prints JSON. Per core:
`frames_per_cpu_second` divides the frames by the CPU time of the build (MediaPipe may use helper threads),
and `frames_per_second_per_worker` by the wall time and worker count. Stage timings come from one video.
"""

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep import frames as frame_io
from data_prep.builder import BuildConfig, build_dataset
from data_prep.demo import synthesize_videos
from marlin_jax.data import codecs
from marlin_jax.faces import FaceCropper

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "marlin_samples"


def cpu_seconds() -> float:
    """User + system time of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_build(videos: Path, workers: int, cropper: FaceCropper) -> dict:
    with tempfile.TemporaryDirectory() as output:
        config = BuildConfig(str(videos), output, workers=workers, shard_size=4, val_fraction=0.0)
        factory = (lambda: cropper) if workers == 1 else None  # pool workers load their own models
        wall, cpu = time.perf_counter(), cpu_seconds()
        manifest = build_dataset(config, cropper_factory=factory)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    frames = sum(entry["num_frames"] for entry in manifest["sources"])
    return {"workers": workers, "videos": len(manifest["sources"]), "frames": frames,
            "wall_s": round(wall, 2), "frames_per_second": round(frames / wall, 1),
            "frames_per_second_per_worker": round(frames / wall / workers, 1),
            "frames_per_cpu_second": round(frames / cpu, 1)}


def time_stages(video: Path, cropper: FaceCropper) -> dict:
    start = time.perf_counter()
    frames = np.stack(list(frame_io.iter_video_frames(str(video))))
    decoded = time.perf_counter()
    crops = cropper.process_video(frames)
    cropped = time.perf_counter()
    for frame, labels in zip(crops.frames, crops.region_maps):
        codecs.encode_jpeg(frame)
        codecs.encode_label_map(labels)
    encoded = time.perf_counter()
    count = len(frames)
    return {"video": video.name, "frame_size": list(frames.shape[1:3]), "frames": count,
            "decode_fps": round(count / (decoded - start)), "crop_and_map_fps": round(count / (cropped - decoded)),
            "encode_fps": round(count / (encoded - cropped))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=Path, default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        videos = args.videos or (SAMPLES if SAMPLES.is_dir() else None)
        if videos is None:
            videos = Path(scratch) / "demo"
            synthesize_videos(videos, num_videos=10)
        cropper = FaceCropper()
        stage_video = sorted(p for p in videos.rglob("*.mp4"))[0]
        result = {"input": str(videos), "cpu_count": os.cpu_count(),
                  "stages_one_video": time_stages(stage_video, cropper),
                  "builds": [time_build(videos, workers, cropper) for workers in args.workers]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
