"""data_prep end to end (decode -> face crop + region map -> JPEG/PNG -> TFRecord), in frames per second.

    python benchmarks/data_prep_throughput.py [--videos DIR | --demo] [--copies 2] [--workers 1 2] [--repeats 3]
        [--tracking on off] [--runner local DirectRunner]

Builds shards from the sample videos (the folder named by $MARLIN_SAMPLES_DIR, each linked `--copies` times so
that a build outlasts worker start-up; else, or with --demo, the demo videos, made on the spot) with
detect-then-track and with --no-tracking (the detector on every frame), for each worker count and each
runner (`local`: the builder's worker processes; `DirectRunner`: the Beam pipeline, its workers in processes,
which needs the [beam] extra), `--repeats` rounds interleaved in one run, and prints JSON per setting
(wall-time figures: the best round, the least disturbed by other load; CPU figures: the median round):
- frames_per_second: frames over the build's wall time, worker start-up, model loading and the last
  videos' tail (one worker finishing alone) included;
- frames_per_second_per_worker: the same divided by the workers, i.e. per core when workers <= cores;
- frames_per_worker_second: frames over the summed time the workers spent on sources (from the manifest),
  i.e. one worker's speed while all of them run, start-up and tail excluded;
- frames_per_cpu_second: frames over the CPU time of the build (all processes and threads), start-up
  included, the per-core figure that other load on the machine distorts least;
- scaling: frames_per_second of each worker count over that of one worker, and steady_scaling: the
  workers' summed speed (workers x frames_per_worker_second) over one worker's (same runner);
- vs_local (DirectRunner only): its frames_per_second over the local builder's at the same setting.
`load_averages` say how busy the machine was in each round. Stage timings (per frame, CPU time of the
process, so the detector's own threads count) come from one video.
"""

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import cv2

from data_prep import frames as frame_io
from data_prep.build_state import BuildConfig
from data_prep.local_build import build_dataset
from data_prep.demo_videos import synthesize_videos
from marlin_jax.data import codecs
from marlin_jax.faces import FaceCropper

# The sample face videos, named as the tests name them.
SAMPLES = Path(os.environ["MARLIN_SAMPLES_DIR"]) if "MARLIN_SAMPLES_DIR" in os.environ else None


def cpu_seconds() -> float:
    """User + system time of this process and its finished children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return process_seconds() + children.ru_utime + children.ru_stime


def process_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def linked_copies(videos: Path, copies: int, root: Path) -> Path:
    """A folder holding `copies` links to every video under `videos`."""
    for copy in range(copies):
        for video in sorted(videos.rglob("*.mp4")):
            link = root / f"copy{copy}" / video.relative_to(videos)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(video.resolve())
    return root


def run_build(config: BuildConfig, runner: str) -> dict:
    if runner == "local":
        return build_dataset(config)
    from data_prep.beam_pipeline import build_with_beam  # the [beam] extra

    return build_with_beam(config, runner, [])[0]  # DirectRunner: config.workers processes


def time_build(videos: Path, runner: str, workers: int, tracking: bool) -> dict:
    with tempfile.TemporaryDirectory() as output:
        config = BuildConfig(str(videos), output, workers=workers, shard_size=4, val_fraction=0.0,
                             tracking=tracking)
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), cpu_seconds()  # Beam's worker processes are waited for: they count
        manifest = run_build(config, runner)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    frames = sum(entry["num_frames"] for entry in manifest["sources"])
    worker_seconds = sum(entry["seconds"] for entry in manifest["sources"])
    return {"videos": len(manifest["sources"]), "frames": frames, "wall_s": wall,
            "frames_per_second": frames / wall, "frames_per_worker_second": frames / worker_seconds,
            "frames_per_cpu_second": frames / cpu, "load_average": load}


def summary(rounds: list[dict], runner: str, tracking: bool, workers: int) -> dict:
    best = lambda key: round(max(r[key] for r in rounds), 1)  # noqa: E731
    return {"runner": runner, "tracking": tracking, "workers": workers, "videos": rounds[0]["videos"],
            "frames": rounds[0]["frames"],
            "wall_s": round(min(r["wall_s"] for r in rounds), 2), "frames_per_second": best("frames_per_second"),
            "frames_per_second_per_worker": round(best("frames_per_second") / workers, 1),
            "frames_per_worker_second": best("frames_per_worker_second"),
            "frames_per_cpu_second": round(statistics.median(r["frames_per_cpu_second"] for r in rounds), 1),
            "load_averages": [round(r["load_average"], 2) for r in rounds]}


def time_stages(video: Path, tracking: bool) -> dict:
    """Per-frame milliseconds of each stage (CPU time of this process)."""
    cropper = FaceCropper(tracking=tracking)
    frames = list(frame_io.iter_video_frames(str(video), threads=1))
    start = process_seconds()
    for _ in frame_io.iter_video_frames(str(video), threads=1):
        pass
    decoded = process_seconds()
    crops = list(cropper.iter_video(frames))
    cropped = process_seconds()
    for crop in crops:
        codecs.encode_jpeg(crop.frame)
        codecs.encode_label_map(crop.region_map)
    encoded = process_seconds()
    per_frame = lambda seconds: round(1e3 * seconds / len(frames), 3)  # noqa: E731
    return {"video": video.name, "frame_size": list(frames[0].shape[:2]), "frames": len(frames),
            "tracking": tracking, "decode_ms": per_frame(decoded - start),
            "crop_and_map_ms": per_frame(cropped - decoded), "encode_ms": per_frame(encoded - cropped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=Path, default=None)
    parser.add_argument("--demo", action="store_true", help="the demo videos, even where the samples are")
    parser.add_argument("--copies", type=int, default=2, help="links to each sample video")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every setting")
    parser.add_argument("--tracking", choices=("on", "off"), nargs="+", default=["on", "off"])
    parser.add_argument("--runner", choices=("local", "DirectRunner"), nargs="+", default=["local"])
    args = parser.parse_args()
    cv2.setNumThreads(1)  # as in the build's workers, for the stage timings
    with tempfile.TemporaryDirectory() as scratch:
        videos = args.videos or (SAMPLES if SAMPLES and SAMPLES.is_dir() and not args.demo else None)
        if videos is None:
            videos = Path(scratch) / "demo"
            synthesize_videos(videos, num_videos=10)
        stage_video = sorted(videos.rglob("*.mp4"))[0]
        trackings = [mode == "on" for mode in args.tracking]
        stages = [time_stages(stage_video, tracking) for tracking in trackings]
        inputs = linked_copies(videos, args.copies, Path(scratch) / "inputs")
        settings = [(runner, tracking, workers) for tracking in trackings for workers in args.workers
                    for runner in args.runner]
        rounds = {setting: [] for setting in settings}
        for _ in range(args.repeats):
            for runner, tracking, workers in settings:
                rounds[runner, tracking, workers].append(time_build(inputs, runner, workers, tracking))
        builds = [summary(rounds[setting], *setting) for setting in settings]
    for build in builds:
        peers = [b for b in builds if b["tracking"] == build["tracking"]]
        single = [b for b in peers if b["runner"] == build["runner"] and b["workers"] == 1]
        if single:
            build["scaling"] = round(build["frames_per_second"] / single[0]["frames_per_second"], 2)
            build["steady_scaling"] = round(build["workers"] * build["frames_per_worker_second"]
                                            / single[0]["frames_per_worker_second"], 2)
        local = [b for b in peers if b["runner"] == "local" and b["workers"] == build["workers"]]
        if build["runner"] != "local" and local:
            build["vs_local"] = round(build["frames_per_second"] / local[0]["frames_per_second"], 2)
    print(json.dumps({"input": str(videos), "copies": args.copies, "repeats": args.repeats,
                      "cpu_count": os.cpu_count(), "stages_one_video": stages, "builds": builds}, indent=1))


if __name__ == "__main__":
    main()
