"""Labelled face videos for fine-tuning: the linear probe's CSV and CelebV-HQ layouts, listing video files.

CSV: `path,split,label` (binary 0/1, multiclass 0..C-1) or `path,split,label_0,...,label_K-1` (multilabel),
`path` a face-cropped video relative to the CSV's folder unless absolute (marlin_jax/evaluation/csv_data.py).

CelebV-HQ (the official layout): `<root>/celebvhq_info.json`, `<root>/<video_dir>/<clip id>.mp4` (the official
preprocessing writes the crops to `cropped/`), and optionally `<root>/{train,val,test}.txt`; without the text
files the sorted clip ids of the videos are cut at 80% / 90%, as for the probe (evaluation/celebvhq_data.py).

Every listed video must exist; a missing one fails the load, naming it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np

from marlin_jax.evaluation.celebvhq_data import (
    ATTRIBUTE_COUNTS,
    derive_split,
    read_attribute_labels,
    read_split_files,
)
from marlin_jax.evaluation.csv_data import count_outputs, parse_labels, read_csv_rows
from marlin_jax.evaluation.probe_data import SPLITS, TASKS, check_splits

VIDEO_SUFFIX = ".mp4"


@dataclasses.dataclass(frozen=True)
class VideoSplit:
    """One split: `ids` as listed (CSV path or clip id), the video files, labels int32 (N,) or (N, K)."""

    ids: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class VideoDataset:
    """A fine-tuning task: its splits and the width of the linear head (`num_outputs`)."""

    task: str
    num_outputs: int
    splits: dict[str, VideoSplit]
    label_names: tuple[str, ...] | None = None


def check_videos_exist(paths: list[Path], source: str) -> None:
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} video file(s) listed by {source} do not exist, e.g. {missing[:3]}")


def load_video_csv(csv_path: str | Path, task: str, num_classes: int = 0) -> VideoDataset:
    """Every split listed in the CSV; `num_classes` <= 0 infers it from the largest multiclass label."""
    csv_path = Path(csv_path)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not csv_path.is_file():
        raise ValueError(f"Fine-tuning CSV not found: {csv_path}")
    rows, columns = read_csv_rows(csv_path, task)
    labels = parse_labels(rows, columns, task, csv_path)
    num_outputs = count_outputs(labels, task, num_classes, csv_path)
    splits = {}
    for split in SPLITS:
        indices = [i for i, row in enumerate(rows) if row["split"] == split]
        if indices:
            paths = tuple(csv_path.parent / rows[i]["path"] for i in indices)
            splits[split] = VideoSplit(tuple(rows[i]["path"] for i in indices), paths, labels[indices])
    check_splits(splits, str(csv_path))
    check_videos_exist([path for split in splits.values() for path in split.paths], str(csv_path))
    return VideoDataset(task, num_outputs, splits)


def load_celebvhq_videos(root: str | Path, video_dir: str, attribute: str) -> VideoDataset:
    """One CelebV-HQ multilabel task ("appearance": 40 labels, "action": 35) on the cropped videos."""
    root = Path(root)
    videos_root = root / video_dir
    if not videos_root.is_dir():
        raise ValueError(f"CelebV-HQ video folder not found: {videos_root}")
    info_path = root / "celebvhq_info.json"
    labels, names = read_attribute_labels(info_path, attribute)
    split_ids = read_split_files(root) or derive_split([path.stem for path in videos_root.glob(f"*{VIDEO_SUFFIX}")])
    splits = {}
    for split, clip_ids in split_ids.items():
        unlabelled = [clip_id for clip_id in clip_ids if clip_id not in labels]
        if unlabelled:
            raise ValueError(f"{len(unlabelled)} {split} clips have no entry in {info_path}, e.g. {unlabelled[:3]}")
        if clip_ids:
            paths = tuple(videos_root / f"{clip_id}{VIDEO_SUFFIX}" for clip_id in clip_ids)
            splits[split] = VideoSplit(tuple(clip_ids), paths,
                                       np.asarray([labels[clip_id] for clip_id in clip_ids], np.int32))
    check_splits(splits, str(videos_root))
    check_videos_exist([path for split in splits.values() for path in split.paths], str(root))
    return VideoDataset("multilabel", ATTRIBUTE_COUNTS[attribute], splits, names)


def load_video_dataset(config: ml_collections.ConfigDict) -> VideoDataset:
    data = config.data
    if data.format == "celebvhq":
        return load_celebvhq_videos(data.root, data.video_dir, data.attribute)
    return load_video_csv(data.csv, config.task, data.num_classes)
