"""Labelled downstream tasks: which file (a feature `.npy` or a face video) carries which label, per split.

One index serves the linear probe (features), in-training probes and fine-tuning (videos). Two layouts:

CSV: `path,split,label` (binary 0/1, multiclass 0..C-1) or `path,split,label_0,...,label_K-1` (multilabel,
each 0/1). `split` is train, val or test; `path` is relative to the CSV's folder unless absolute or in a
bucket (`gs://...`; the CSV may sit in one too). Rows keep their file order within each split.

CelebV-HQ (the official layout): `<root>/celebvhq_info.json` with
`{"clips": {"<clip id>": {"attributes": {"appearance": [0/1 x 40], "action": [0/1 x 35]}}}}`, the files in
`<root>/<files_dir>/<clip id><suffix>` (`.npy` features in a folder named after the backbone, or `.mp4` face
crops in `cropped/`), and optionally `<root>/{train,val,test}.txt`. CelebV-HQ has no official split: the
official preprocessing cuts its list of videos at 80% and 90% in `os.listdir` order, which differs between
file systems. When the text files exist we read them; otherwise the SORTED clip ids of the files present are
cut at the same marks, so the split depends only on which files exist.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re

import numpy as np
from etils import epath

from marlin_jax import storage

TASKS = ("binary", "multiclass", "multilabel")
SPLITS = ("train", "val", "test")
ATTRIBUTE_COUNTS = {"appearance": 40, "action": 35}
TRAIN_END, VAL_END = 0.8, 0.9


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
    """One split: `ids` as listed (CSV path or clip id), the files, labels int32 (N,) or (N, K)."""

    ids: tuple[str, ...]
    paths: tuple[epath.Path, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class LabelledTask:
    """A task: its splits and the width of the linear head (`num_outputs`)."""

    task: str
    num_outputs: int
    splits: dict[str, LabelledSplit]
    label_names: tuple[str, ...] | None = None


def check_splits(splits: dict, source: str) -> None:
    """Fails when a split is absent or empty; `source` names the file or folder the splits came from."""
    for name in SPLITS:
        if name not in splits or len(splits[name]) == 0:
            raise ValueError(f"Split {name!r} is empty in {source}")


def check_files_exist(task: LabelledTask, source: str) -> None:
    missing = [str(path) for split in task.splits.values() for path in split.paths if not path.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} file(s) listed by {source} do not exist, e.g. {missing[:3]}")


# --- CSV ---------------------------------------------------------------------------------------------------

def label_columns(header: list[str], task: str, csv_path) -> list[str]:
    """The label columns the task needs, checked against the header."""
    for required in ("path", "split"):
        if required not in header:
            raise ValueError(f"{csv_path} has no {required!r} column (header: {header})")
    indexed = [name for name in header if re.fullmatch(r"label_\d+", name)]
    if task != "multilabel":
        if "label" not in header:
            raise ValueError(f"{csv_path}: a {task} task needs a 'label' column (header: {header})")
        if indexed:
            raise ValueError(f"{csv_path}: a {task} task takes one 'label' column, but the CSV also has {indexed}")
        return ["label"]
    expected = [f"label_{k}" for k in range(len(indexed))]
    if not indexed or indexed != expected or "label" in header:
        raise ValueError(f"{csv_path}: a multilabel task needs columns label_0..label_K-1 in order and no 'label' "
                         f"column; found {[name for name in header if name.startswith('label')]}")
    return expected


def parse_labels(rows: list[dict[str, str]], columns: list[str], task: str, csv_path) -> np.ndarray:
    """Reads the label columns as int32, (N,) or (N, K) for multilabel, rejecting values the task forbids."""
    labels = np.zeros((len(rows), len(columns)), np.int32)
    for i, row in enumerate(rows):
        for k, column in enumerate(columns):
            text = row[column]
            if text is None or not re.fullmatch(r"\s*\d+\s*", text):
                raise ValueError(f"{csv_path} line {i + 2}: column {column!r} must be a non-negative integer, "
                                 f"got {text!r}")
            labels[i, k] = int(text)
    if task in ("binary", "multilabel") and labels.max(initial=0) > 1:
        line = int(np.argwhere(labels > 1)[0, 0]) + 2
        raise ValueError(f"{csv_path} line {line}: {task} labels must be 0 or 1")
    return labels if task == "multilabel" else labels[:, 0]


def count_outputs(labels: np.ndarray, task: str, num_classes: int, csv_path) -> int:
    """Width of the linear layer: 1 logit (binary), C classes, or K labels."""
    if task == "binary":
        return 1
    if task == "multilabel":
        return labels.shape[1]
    if num_classes <= 0:
        return int(labels.max()) + 1
    if labels.max() >= num_classes:
        raise ValueError(f"{csv_path}: label {int(labels.max())} is out of range for num_classes={num_classes}")
    return num_classes


def read_csv_rows(csv_path: epath.Path, task: str) -> tuple[list[dict[str, str]], list[str]]:
    """The CSV's rows and its label columns, with every split name and path checked."""
    # epath opens files without the newline="" option csv needs; a StringIO given it parses quoted newlines right.
    reader = csv.DictReader(io.StringIO(csv_path.read_text(), newline=""))
    columns = label_columns(list(reader.fieldnames or []), task, csv_path)
    rows = list(reader)
    for i, row in enumerate(rows):
        if row["split"] not in SPLITS:
            raise ValueError(f"{csv_path} line {i + 2}: split must be one of {SPLITS}, got {row['split']!r}")
        if not row["path"]:
            raise ValueError(f"{csv_path} line {i + 2}: empty 'path'")
    return rows, columns


def _listed_path(csv_path: epath.Path, listed: str) -> epath.Path:
    """A CSV row's path: as written when it is in a bucket (joining would nest it), else below the CSV's folder."""
    return epath.Path(listed) if storage.is_remote(listed) else csv_path.parent / listed


def read_csv_task(csv_path, task: str, num_classes: int = 0) -> LabelledTask:
    """Every split listed in the CSV; `num_classes` <= 0 infers it from the largest multiclass label."""
    csv_path = epath.Path(csv_path)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not csv_path.is_file():
        raise ValueError(f"CSV not found: {csv_path}")
    rows, columns = read_csv_rows(csv_path, task)
    labels = parse_labels(rows, columns, task, csv_path)
    splits = {}
    for split in SPLITS:
        indices = [i for i, row in enumerate(rows) if row["split"] == split]
        if indices:
            splits[split] = LabelledSplit(tuple(rows[i]["path"] for i in indices),
                                          tuple(_listed_path(csv_path, rows[i]["path"]) for i in indices),
                                          labels[indices])
    check_splits(splits, str(csv_path))
    return LabelledTask(task, count_outputs(labels, task, num_classes, csv_path), splits)


# --- CelebV-HQ ---------------------------------------------------------------------------------------------

def derive_split(clip_ids: list[str]) -> dict[str, list[str]]:
    """Cuts sorted clip ids into train (first 80%), val (next 10%) and test (the rest)."""
    ordered = sorted(clip_ids)
    train_end, val_end = int(len(ordered) * TRAIN_END), int(len(ordered) * VAL_END)
    return {"train": ordered[:train_end], "val": ordered[train_end:val_end], "test": ordered[val_end:]}


def read_split_files(root: epath.Path) -> dict[str, list[str]] | None:
    """Reads `<root>/{train,val,test}.txt` when all three exist; None when none does."""
    paths = {name: root / f"{name}.txt" for name in SPLITS}
    present = [path.is_file() for path in paths.values()]
    if not any(present):
        return None
    if not all(present):
        missing = [str(path) for path, found in zip(paths.values(), present) if not found]
        raise ValueError(f"CelebV-HQ split files are incomplete; missing {missing}")
    return {name: [line.strip() for line in path.read_text().splitlines() if line.strip()]
            for name, path in paths.items()}


def read_info(info_path) -> dict:
    """`celebvhq_info.json`, checked to hold a "clips" mapping."""
    info_path = epath.Path(info_path)
    if not info_path.is_file():
        raise ValueError(f"CelebV-HQ label file not found: {info_path}")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{info_path} is not valid JSON: {error}") from None
    if not isinstance(info, dict) or not isinstance(info.get("clips"), dict):
        raise ValueError(f"{info_path} has no 'clips' mapping")
    return info


def attribute_problem(clip, attribute: str) -> str | None:
    """Why a `clips` entry of celebvhq_info.json has no usable labels of one attribute group; None when it has."""
    attributes = clip.get("attributes") if isinstance(clip, dict) else None
    values = attributes.get(attribute) if isinstance(attributes, dict) else None
    if not isinstance(values, list) or len(values) != ATTRIBUTE_COUNTS[attribute]:
        return f"['attributes'][{attribute!r}] must be a list of {ATTRIBUTE_COUNTS[attribute]} labels, got {values!r}"
    if others := [value for value in values if not isinstance(value, int) or value not in (0, 1)]:
        return f"['attributes'][{attribute!r}] holds values other than 0/1: {others[:5]}"
    return None


def read_attribute_labels(info_path: epath.Path, attribute: str
                          ) -> tuple[dict[str, list[int]], dict[str, str], tuple[str, ...] | None]:
    """{clip id: 0/1 list} of one attribute group for the clips that have it, {clip id: problem} for the clips
    whose entry lacks it, and the label names when the json has them."""
    if attribute not in ATTRIBUTE_COUNTS:
        raise ValueError(f"CelebV-HQ attribute must be one of {tuple(ATTRIBUTE_COUNTS)}, got {attribute!r}")
    info = read_info(info_path)
    labels, problems = {}, {}
    for clip_id, clip in info["clips"].items():
        if problem := attribute_problem(clip, attribute):
            problems[clip_id] = f"{info_path}: clips[{clip_id!r}]{problem}"
        else:
            labels[clip_id] = clip["attributes"][attribute]
    # The dataset's README documents the key as "mete_info"; accept the corrected spelling as well.
    meta = info.get("mete_info") or info.get("meta_info") or {}
    names = meta.get(f"{attribute}_mapping")
    return labels, problems, tuple(names) if names and len(names) == ATTRIBUTE_COUNTS[attribute] else None


def read_celebvhq_task(root, files_dir: str, suffix: str, attribute: str) -> LabelledTask:
    """One CelebV-HQ multilabel task ("appearance": 40 labels, "action": 35) on `<root>/<files_dir>/*<suffix>`."""
    root = epath.Path(root)
    files_root = root / files_dir
    if not files_root.is_dir():
        raise ValueError(f"CelebV-HQ folder not found: {files_root}")
    info_path = root / "celebvhq_info.json"
    labels, problems, names = read_attribute_labels(info_path, attribute)
    split_ids = read_split_files(root) or derive_split([path.name[:-len(suffix)]
                                                        for path in files_root.glob(f"*{suffix}")])
    splits = {}
    for split, clip_ids in split_ids.items():
        if bad := [problems[clip_id] for clip_id in clip_ids if clip_id in problems]:
            raise ValueError(f"{len(bad)} {split} clip(s) have no usable labels, e.g. {bad[0]}")
        unlabelled = [clip_id for clip_id in clip_ids if clip_id not in labels]
        if unlabelled:
            raise ValueError(f"{len(unlabelled)} {split} clips have no entry in {info_path}, e.g. {unlabelled[:3]}")
        if clip_ids:
            splits[split] = LabelledSplit(tuple(clip_ids), tuple(files_root / f"{c}{suffix}" for c in clip_ids),
                                          np.asarray([labels[clip_id] for clip_id in clip_ids], np.int32))
    check_splits(splits, str(files_root))
    return LabelledTask("multilabel", ATTRIBUTE_COUNTS[attribute], splits, names)


def head_width(data_config, task: str) -> int | None:
    """The head's width (`LabelledTask.num_outputs`) where the config alone decides it; None where only the labels
    do (a CSV multilabel task's columns, or a multiclass one with num_classes 0)."""
    if data_config.format == "celebvhq":
        return ATTRIBUTE_COUNTS.get(data_config.attribute)
    if task == "binary":
        return 1
    if task == "multiclass" and data_config.num_classes > 0:
        return data_config.num_classes
    return None


def load_task(data_config, task: str, *, files: str) -> LabelledTask:
    """The task a config's `data` block describes; `files` is "features" (.npy) or "videos" (.mp4).

    data_config fields: format (csv | celebvhq), csv, num_classes; root, attribute, and feature_dir (features)
    or video_dir (videos).
    """
    if data_config.format == "celebvhq":
        folder, suffix = ((data_config.feature_dir, ".npy") if files == "features"
                          else (data_config.video_dir, ".mp4"))
        loaded = read_celebvhq_task(data_config.root, folder, suffix, data_config.attribute)
        source = str(epath.Path(data_config.root) / folder)
    elif data_config.format == "csv":
        loaded = read_csv_task(data_config.csv, task, data_config.num_classes)
        source = str(data_config.csv)
    else:
        raise ValueError(f"config.data.format must be 'csv' or 'celebvhq', got {data_config.format!r}")
    check_files_exist(loaded, source)
    return loaded
