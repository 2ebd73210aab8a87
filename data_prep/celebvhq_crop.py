"""CelebV-HQ from its download to the layout that the CelebV-HQ probes and fine-tuning read: face crops and splits
(`python -m data_prep.celebvhq`).

Reads the official layout, `<root>/celebvhq_info.json` and `<root>/downloaded/<clip id>.mp4` (what the CelebV-HQ
download script leaves), and writes

    <root>/cropped/<clip id>.mp4     every frame's face crop, 224 px, at the source frame rate (H.264)
    <root>/{train,val,test}.txt      the cropped clip ids, one a line
    <root>/celebvhq_crop.json        what was cropped, what failed or was left out and why, settings, tool versions

as the official preprocessing (`preprocess/celebvhq_preprocess.py`) does, with these differences:
- The crop is this project's (`marlin_jax.faces.FaceCropper`: MediaPipe's detector calibrated to the official
  square around the face, zero padding where it leaves the frame, the square smoothed over 5 frames); frames
  without a face take the last face's square, as the official crop keeps its last box.
- A video that cannot be decoded, or shows no face in any frame, is recorded as failed with the reason and not
  written (the official script writes whatever its crop gives). A video whose clip has no entry in
  celebvhq_info.json, or no 40 appearance and 35 action labels, is recorded as skipped and not cropped.
- The split: the sorted clip ids of the cropped videos cut at 80% and 90% (`tasks.derive_split`, what the probes
  derive themselves without split files); the official script cuts its `os.listdir` order, which differs between
  file systems. Split files written by someone else (the official ones, say) are kept; those this command wrote
  are rewritten when the set of cropped videos changes.

Rerunning the same command resumes: a video is done once its crop (written whole or not at all) and its status are
written, and a rerun crops only the videos not done yet, or whose file changed since. Different crop settings in
the same root are refused. `--workers` processes crop videos in parallel, each with its own face models.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

from data_prep import frames as frame_io
from data_prep import process
from data_prep.local_build import default_cropper_factory, run_in_workers
from data_prep.manifest import tool_versions
from marlin_jax import storage
from marlin_jax.downstream import tasks
from marlin_jax.faces import FrameCrop, NoFaceError
from marlin_jax.video import video_fps

INFO_NAME = "celebvhq_info.json"
DOWNLOADED_DIR = "downloaded"
CROPPED_DIR = "cropped"
REPORT_NAME = "celebvhq_crop.json"
WORK_DIR = "_celebvhq_crop_work"  # status files of the videos finished since the last report
REPORT_FORMAT = "marlin_jax.celebvhq_crop"
VIDEO_SUFFIX = ".mp4"


@dataclasses.dataclass(frozen=True)
class CropConfig:
    root: str
    workers: int = os.cpu_count() or 1
    image_size: int = 224
    tracking: bool = True  # detect, then track with the landmark model; False: the detector on every frame
    crf: int = frame_io.DEFAULT_CRF

    def content_settings(self) -> dict:
        """The settings that decide what the crops hold."""
        return {"image_size": self.image_size, "face_tracking": self.tracking, "crf": self.crf}


@dataclasses.dataclass(frozen=True)
class Clip:
    clip_id: str
    video: epath.Path  # downloaded/<clip id>.mp4
    cropped: epath.Path  # cropped/<clip id>.mp4
    status_file: epath.Path


def crop_clip(clip: Clip, cropper: process.Cropper, crf: int) -> dict:
    """Crops one video into `clip.cropped` (whole or not at all); returns its status, also written to
    `clip.status_file` after the crop."""
    start = time.perf_counter()
    source = clip.video.stat()
    counts = {"num_frames": 0, "frames_with_face": 0}

    def counted(crops: Iterator[FrameCrop]) -> Iterator[np.ndarray]:
        for crop in crops:
            counts["num_frames"] += 1
            counts["frames_with_face"] += bool(crop.face_found)
            yield crop.frame

    try:
        fps = video_fps(str(clip.video))
        decoded = frame_io.iter_video_frames(str(clip.video), threads=process.DECODE_THREADS)
        video = frame_io.encode_mp4(counted(cropper.iter_video(decoded)), fps, crf)
        if not counts["frames_with_face"]:
            raise NoFaceError(f"no face found in any of the {counts['num_frames']} frames")
        with storage.write_once(clip.cropped) as file:
            file.write(video)
        status = {"status": "ok", **counts}
    except process.SOURCE_ERRORS as error:
        status = {"status": "failed", "reason": f"{type(error).__name__}: {error}", **counts}
    status = {"clip_id": clip.clip_id, **status, "source_bytes": source.length, "source_mtime": source.mtime,
              "seconds": round(time.perf_counter() - start, 3)}
    storage.write_json(clip.status_file, status)
    return status


def label_problem(entry) -> str | None:
    """Why a video's celebvhq_info.json entry cannot serve the CelebV-HQ tasks; None when it can."""
    if entry is None:
        return f"no entry in {INFO_NAME}"
    problems = [problem for attribute in tasks.ATTRIBUTE_COUNTS
                if (problem := tasks.attribute_problem(entry, attribute))]
    return f"{INFO_NAME} entry: {'; '.join(problems)}" if problems else None


class CropRun:
    """The state of one root: its videos, which are done (from the last report and the status files since), and
    the report."""

    def __init__(self, config: CropConfig):
        self.config = config
        self.root = epath.Path(config.root)
        self.cropped = self.root / CROPPED_DIR
        self.work = self.root / WORK_DIR
        info = tasks.read_info(self.root / INFO_NAME)
        videos = _downloaded_videos(self.root / DOWNLOADED_DIR)
        self.skipped = [{"clip_id": clip_id, "reason": problem} for clip_id in videos
                        if (problem := label_problem(info["clips"].get(clip_id)))]
        left_out = {entry["clip_id"] for entry in self.skipped}
        self.clips = [Clip(clip_id, path, self.cropped / f"{clip_id}{VIDEO_SUFFIX}", self.work / f"{clip_id}.json")
                      for clip_id, path in videos.items() if clip_id not in left_out]
        self.num_videos = len(videos)
        self.info_without_video = len(set(info["clips"]) - set(videos))
        self.statuses: dict[str, dict] = {}
        self.split_sha256: dict[str, str] = {}

    def resume(self) -> None:
        """Loads what earlier runs finished; a crop whose file is gone, or whose video changed, is redone."""
        self.cropped.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        for folder in (self.cropped, self.work):
            storage.remove_temporaries(folder)  # a killed run's half-written files only take space
        report_path = self.root / REPORT_NAME
        earlier = {}
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            if report["settings"] != self.config.content_settings():
                raise ValueError(f"{self.cropped} was cropped with {report['settings']}, not "
                                 f"{self.config.content_settings()}; to crop again with these settings, delete "
                                 f"{self.cropped}, {report_path} and the split files, or use those settings")
            earlier = {entry["clip_id"]: entry for entry in report["clips"] if entry["status"] != "pending"}
            self.split_sha256 = report.get("split_sha256", {})
        if self.work.is_dir():
            for path in storage.files_under(self.work):
                if path.suffix == ".json":
                    status = json.loads(path.read_text())
                    earlier[status["clip_id"]] = status
        for clip in self.clips:
            status = earlier.get(clip.clip_id)
            if status is not None and _still_valid(status, clip):
                self.statuses[clip.clip_id] = status

    def pending(self) -> list[Clip]:
        return [clip for clip in self.clips if clip.clip_id not in self.statuses]

    def failed_count(self) -> int:
        return sum(status["status"] == "failed" for status in self.statuses.values())

    def finish(self) -> dict:
        """Writes the split files (once every video is done) and the report; returns the report."""
        complete = not self.pending()
        splits = self._write_splits() if complete else None
        report = self._report(complete, splits)
        storage.write_json(self.root / REPORT_NAME, report)
        if complete and self.work.exists():
            self.work.rmtree()
        return report

    def _write_splits(self) -> dict:
        """Writes train/val/test.txt from the cropped clips, unless all three are there and this command did not
        write them: those are kept. Returns the clip count per split and which of the two happened."""
        paths = {split: self.root / f"{split}.txt" for split in tasks.SPLITS}
        theirs = all(path.is_file() for path in paths.values()) and any(
            _sha256(path.read_bytes()) != self.split_sha256.get(split) for split, path in paths.items())
        if theirs:
            listed = tasks.read_split_files(self.root) or {}
            cropped = {clip_id for clip_id, status in self.statuses.items() if status["status"] == "ok"}
            missing = sorted(clip_id for ids in listed.values() for clip_id in ids if clip_id not in cropped)
            if missing:
                logging.warning("the existing split files list %d clip(s) without a crop, e.g. %s", len(missing),
                                missing[:3])
            return {"source": "kept", **{split: len(ids) for split, ids in listed.items()}}
        ok = [clip_id for clip_id, status in self.statuses.items() if status["status"] == "ok"]
        split_ids = tasks.derive_split(ok)
        for split, clip_ids in split_ids.items():
            text = "".join(f"{clip_id}\n" for clip_id in clip_ids).encode()
            with storage.write_once(paths[split]) as file:
                file.write(text)
            self.split_sha256[split] = _sha256(text)
        empty = [split for split, clip_ids in split_ids.items() if not clip_ids]
        if empty:
            logging.warning("split(s) %s are empty: %d videos were cropped", ", ".join(empty), len(ok))
        return {"source": "written", **{split: len(ids) for split, ids in split_ids.items()}}

    def _report(self, complete: bool, splits: dict | None) -> dict:
        entries = [{"clip_id": clip.clip_id, **self.statuses.get(clip.clip_id, {"status": "pending"})}
                   for clip in self.clips]
        failures = [{"clip_id": entry["clip_id"], "reason": entry["reason"]} for entry in entries
                    if entry["status"] == "failed"]
        return {
            "format": REPORT_FORMAT, "complete": complete,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": self.config.content_settings(), "versions": tool_versions(),
            "counts": {"videos": self.num_videos, "cropped": sum(entry["status"] == "ok" for entry in entries),
                       "failed": len(failures), "skipped": len(self.skipped),
                       "pending": sum(entry["status"] == "pending" for entry in entries),
                       "labelled_clips_without_video": self.info_without_video},
            "splits": splits, "split_sha256": self.split_sha256,
            "failures": failures, "skipped": self.skipped, "clips": entries,
        }


def _downloaded_videos(folder: epath.Path) -> dict[str, epath.Path]:
    """Clip id -> video, for every `<clip id>.mp4` in the download folder, sorted."""
    if not folder.is_dir():
        raise ValueError(f"{folder} does not exist: put the CelebV-HQ videos there as <clip id>.mp4")
    videos = {path.name[:-len(VIDEO_SUFFIX)]: path for path in folder.iterdir() if path.name.endswith(VIDEO_SUFFIX)}
    if not videos:
        raise ValueError(f"{folder} holds no .mp4 videos")
    return dict(sorted(videos.items()))


def _still_valid(status: dict, clip: Clip) -> bool:
    """An earlier status holds while the video is the same file and, for a crop, the crop still exists."""
    source = clip.video.stat()
    if (status.get("source_bytes"), status.get("source_mtime")) != (source.length, source.mtime):
        return False
    return status["status"] != "ok" or clip.cropped.is_file()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crop_celebvhq(config: CropConfig, cropper_factory: Callable[[], process.Cropper] | None = None) -> dict:
    """Crops every labelled video of the root not cropped yet, writes the splits once all are done, and returns
    the report (also written to <root>/celebvhq_crop.json)."""
    if config.workers < 1:
        raise ValueError(f"workers must be at least 1, got {config.workers}")
    if config.image_size < 2 or config.image_size % 2:
        raise ValueError(f"image size must be an even number of pixels (H.264 needs it), got {config.image_size}")
    run = CropRun(config)
    run.resume()
    pending = run.pending()
    logging.info("%d videos: %d to crop, %d done, %d skipped", run.num_videos, len(pending),
                 len(run.statuses), len(run.skipped))
    factory = cropper_factory or default_cropper_factory(config.image_size, config.tracking)
    failed = run.failed_count()  # counted on as videos finish: CelebV-HQ has 35,666 of them
    with tqdm(total=len(run.clips), initial=len(run.clips) - len(pending), unit="video", smoothing=0.1) as bar:
        for status in run_in_workers(crop_clip, [(clip,) for clip in pending], factory, config.crf, config.workers):
            run.statuses[status["clip_id"]] = status
            failed += status["status"] == "failed"
            bar.set_postfix(failed=failed)
            bar.update()
    return run.finish()
