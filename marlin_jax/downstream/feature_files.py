"""Feature arrays for linear probing: `.npy` loading, temporal reduction and low-data subsets.

A feature file holds either one clip embedding `(D,)` or the embeddings of a video's 16-frame windows
`(T, D)`, as `python -m marlin_jax.extract` (and the official `extract_video(..., reduction="none")`) writes
them. Windowed files are reduced over time (mean, max or min) to one `(D,)` vector per video, as the official
linear probe does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath

from marlin_jax.downstream.tasks import LabelledTask

TEMPORAL_REDUCTIONS = ("mean", "max", "min")


@dataclasses.dataclass(frozen=True)
class FeatureSplit:
    """One split: `features` (N, D) float32; `labels` int32, (N,) or (N, K) for multilabel."""

    ids: tuple[str, ...]
    features: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: np.ndarray) -> FeatureSplit:
        return FeatureSplit(tuple(self.ids[i] for i in indices), self.features[indices], self.labels[indices])


def reduce_windows(windows: np.ndarray, reduction: str) -> np.ndarray:
    """Reduces `(T, D)` window features over time; `(D,)` features pass through unchanged."""
    if reduction not in TEMPORAL_REDUCTIONS:
        raise ValueError(f"temporal_reduction must be one of {TEMPORAL_REDUCTIONS}, got {reduction!r}")
    if windows.ndim == 1:
        return windows
    return {"mean": np.mean, "max": np.max, "min": np.min}[reduction](windows, axis=0)


def load_feature(path, reduction: str) -> tuple[np.ndarray, bool]:
    """Loads one feature file as a float32 `(D,)` vector; also says whether it held zero windows.

    The official extractor saves a `(0, D)` array for a video it failed to read, and the official probe
    feeds such a video as a zero vector; we do the same and let the caller count them.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise ValueError(f"Feature file not found: {path}")
    try:
        with path.open("rb") as file:
            array = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read feature file {path}: {error}") from error
    if array.ndim not in (1, 2) or array.shape[-1] == 0:
        raise ValueError(f"Feature file {path} has shape {array.shape}; expected (T, D) or (D,) with D > 0")
    if array.ndim == 2 and array.shape[0] == 0:
        return np.zeros(array.shape[1], np.float32), True
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"Feature file {path} contains NaN or Inf")
    return reduce_windows(array, reduction), False


def load_features(paths: Sequence, reduction: str) -> tuple[np.ndarray, int]:
    """Stacks feature files into `(N, D)`; returns it and the number of empty (zero-window) files."""
    vectors, num_empty = [], 0
    for path in paths:
        vector, empty = load_feature(path, reduction)
        if vectors and vector.shape != vectors[0].shape:
            raise ValueError(
                f"Feature file {path} has dimension {vector.shape[0]}, but {paths[0]} has {vectors[0].shape[0]}")
        vectors.append(vector)
        num_empty += empty
    if num_empty:
        logging.warning("%d of %d feature files hold no windows; they enter the probe as zero vectors.",
                        num_empty, len(paths))
    return np.stack(vectors), num_empty


def load_feature_splits(task: LabelledTask, reduction: str) -> tuple[dict[str, FeatureSplit], int]:
    """Every split's features (one vector per file); also the number of empty feature files."""
    splits, num_empty = {}, 0
    for name, split in task.splits.items():
        features, empty = load_features(split.paths, reduction)
        splits[name] = FeatureSplit(split.ids, features, split.labels)
        num_empty += empty
    dims = {name: split.features.shape[1] for name, split in splits.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"feature dimensions differ between splits: {dims}")
    return splits, num_empty


def subsample(split: FeatureSplit, ratio: float, rng: np.random.Generator) -> FeatureSplit:
    """Keeps `int(len(split) * ratio)` examples drawn without replacement by `rng`, in their original order.

    The official code keeps a prefix of the list instead; a seeded draw lets several seeds see different
    subsets, which is what a low-data mean/std needs.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"data_ratio must be in (0, 1], got {ratio}")
    if ratio == 1.0:
        return split
    size = int(len(split) * ratio)
    if size == 0:
        raise ValueError(f"data_ratio={ratio} leaves no examples out of {len(split)}")
    return split.take(np.sort(rng.choice(len(split), size=size, replace=False)))
