"""CelebV-HQ attribute probing data: `celebvhq_info.json` labels plus a folder of `<clip id>.npy` features.

Layout (the official one, `<feature_dir>` being the backbone name the extractor used):

    <root>/celebvhq_info.json          {"clips": {"<clip id>": {"attributes": {"appearance": [0/1 x 40],
                                                                               "action": [0/1 x 35]}}}}
    <root>/<feature_dir>/<clip id>.npy (T, D) window features or (D,)
    <root>/{train,val,test}.txt        optional: one clip id per line

CelebV-HQ has no official split. The official preprocessing writes the three text files once, cutting its
list of cropped videos at 80% and 90% in `os.listdir` order, which differs between file systems. When the
text files exist we read them, as the official code does; otherwise we cut the SORTED clip ids of the
feature files at the same 80% / 90% marks, so the split depends only on which features exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from marlin_jax.evaluation.probe_data import SPLITS, ProbeDataset, ProbeSplit, check_splits, load_features

ATTRIBUTE_COUNTS = {"appearance": 40, "action": 35}
TRAIN_END, VAL_END = 0.8, 0.9


def derive_split(clip_ids: list[str]) -> dict[str, list[str]]:
    """Cuts sorted clip ids into train (first 80%), val (next 10%) and test (the rest)."""
    ordered = sorted(clip_ids)
    train_end, val_end = int(len(ordered) * TRAIN_END), int(len(ordered) * VAL_END)
    return {"train": ordered[:train_end], "val": ordered[train_end:val_end], "test": ordered[val_end:]}


def read_split_files(root: Path) -> dict[str, list[str]] | None:
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


def read_attribute_labels(info_path: Path, attribute: str) -> tuple[dict[str, list[int]], tuple[str, ...] | None]:
    """Returns {clip id: 0/1 list} for one attribute group, and the label names when the json has them."""
    if attribute not in ATTRIBUTE_COUNTS:
        raise ValueError(f"CelebV-HQ attribute must be one of {tuple(ATTRIBUTE_COUNTS)}, got {attribute!r}")
    if not info_path.is_file():
        raise ValueError(f"CelebV-HQ label file not found: {info_path}")
    info = json.loads(info_path.read_text())
    if not isinstance(info.get("clips"), dict):
        raise ValueError(f"{info_path} has no 'clips' mapping")
    labels = {}
    for clip_id, clip in info["clips"].items():
        values = clip.get("attributes", {}).get(attribute)
        if not isinstance(values, list) or len(values) != ATTRIBUTE_COUNTS[attribute]:
            raise ValueError(f"{info_path}: clips[{clip_id!r}]['attributes'][{attribute!r}] must be a list of "
                             f"{ATTRIBUTE_COUNTS[attribute]} labels, got {values!r}")
        if not set(values) <= {0, 1}:
            raise ValueError(f"{info_path}: clips[{clip_id!r}]['attributes'][{attribute!r}] holds values "
                             f"other than 0/1: {sorted(set(values))}")
        labels[clip_id] = values
    # The dataset's README documents the key as "mete_info"; accept the corrected spelling as well.
    meta = info.get("mete_info") or info.get("meta_info") or {}
    names = meta.get(f"{attribute}_mapping")
    return labels, tuple(names) if names and len(names) == ATTRIBUTE_COUNTS[attribute] else None


def load_celebvhq(root: str | Path, feature_dir: str, attribute: str, reduction: str) -> ProbeDataset:
    """Loads one CelebV-HQ multilabel task ("appearance": 40 labels, "action": 35)."""
    root = Path(root)
    features_root = root / feature_dir
    if not features_root.is_dir():
        raise ValueError(f"CelebV-HQ feature folder not found: {features_root}")
    labels, names = read_attribute_labels(root / "celebvhq_info.json", attribute)
    split_ids = read_split_files(root) or derive_split([path.stem for path in features_root.glob("*.npy")])
    splits, num_empty = {}, 0
    for split, clip_ids in split_ids.items():
        unlabelled = [clip_id for clip_id in clip_ids if clip_id not in labels]
        if unlabelled:
            raise ValueError(f"{len(unlabelled)} {split} clips have no entry in {root / 'celebvhq_info.json'}, "
                             f"e.g. {unlabelled[:3]}")
        if not clip_ids:
            continue
        features, empty = load_features([features_root / f"{clip_id}.npy" for clip_id in clip_ids], reduction)
        splits[split] = ProbeSplit(tuple(clip_ids), features,
                                   np.asarray([labels[clip_id] for clip_id in clip_ids], np.int32))
        num_empty += empty
    check_splits(splits, str(features_root))
    return ProbeDataset("multilabel", ATTRIBUTE_COUNTS[attribute], splits, names, num_empty)
