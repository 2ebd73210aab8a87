"""Probing data listed in a CSV file, for any dataset whose features were extracted to `.npy` files.

Columns: `path,split,label` (binary: 0/1; multiclass: 0..C-1) or `path,split,label_0,...,label_K-1`
(multilabel, each 0/1). `split` is train, val or test; `path` is a `(T, D)` or `(D,)` feature file, relative
to the CSV's folder unless absolute. Rows keep their file order within each split.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from marlin_jax.evaluation.probe_data import SPLITS, TASKS, ProbeDataset, ProbeSplit, check_splits, load_features


def label_columns(header: list[str], task: str, csv_path: Path) -> list[str]:
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


def parse_labels(rows: list[dict[str, str]], columns: list[str], task: str, csv_path: Path) -> np.ndarray:
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


def count_outputs(labels: np.ndarray, task: str, num_classes: int, csv_path: Path) -> int:
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


def read_csv_rows(csv_path: Path, task: str) -> tuple[list[dict[str, str]], list[str]]:
    """The CSV's rows and its label columns, with every split name and path checked."""
    with csv_path.open(newline="") as file:
        reader = csv.DictReader(file)
        columns = label_columns(list(reader.fieldnames or []), task, csv_path)
        rows = list(reader)
    for i, row in enumerate(rows):
        if row["split"] not in SPLITS:
            raise ValueError(f"{csv_path} line {i + 2}: split must be one of {SPLITS}, got {row['split']!r}")
        if not row["path"]:
            raise ValueError(f"{csv_path} line {i + 2}: empty 'path'")
    return rows, columns


def load_csv(csv_path: str | Path, task: str, reduction: str, num_classes: int = 0) -> ProbeDataset:
    """Loads every split listed in the CSV. `num_classes` <= 0 infers it from the largest multiclass label."""
    csv_path = Path(csv_path)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not csv_path.is_file():
        raise ValueError(f"Probe CSV not found: {csv_path}")
    rows, columns = read_csv_rows(csv_path, task)
    labels = parse_labels(rows, columns, task, csv_path)
    num_outputs = count_outputs(labels, task, num_classes, csv_path)
    splits, num_empty = {}, 0
    for split in SPLITS:
        indices = [i for i, row in enumerate(rows) if row["split"] == split]
        if not indices:
            continue
        paths = [csv_path.parent / rows[i]["path"] for i in indices]
        features, empty = load_features(paths, reduction)
        splits[split] = ProbeSplit(tuple(rows[i]["path"] for i in indices), features, labels[indices])
        num_empty += empty
    check_splits(splits, str(csv_path))
    dims = {name: split.features.shape[1] for name, split in splits.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"{csv_path}: feature dimensions differ between splits: {dims}")
    return ProbeDataset(task, num_outputs, splits, None, num_empty)
