"""Probe metrics from logits, with the official names (`acc`, `auc`) and sklearn doing the counting.

Multilabel follows the official CelebV-HQ evaluation: it thresholds sigmoid probabilities at 0.5 and feeds
the whole (N, K) matrix to a *binary* torchmetrics AUROC, which flattens it; so `acc` and `auc` here are
`accuracy_score` and `roc_auc_score` over the flattened labels and probabilities. The mean of per-label AUROCs
(`auc_per_label_mean`) is added because the flattened AUROC also rewards getting the label base rates right.
Multiclass `auc` is the one-vs-rest macro average, as torchmetrics' multiclass AUROC defaults to.
An AUROC that is undefined (a class with no positive or no negative example) is NaN.
"""

from __future__ import annotations

import numpy as np
import scipy.special
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

METRIC_NAMES = {
    "binary": ("acc", "auc", "f1"),
    "multiclass": ("acc", "auc", "f1_macro"),
    "multilabel": ("acc", "auc", "auc_per_label_mean", "num_labels_scored"),
}


def _binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if np.unique(labels).size < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def mean_per_column_auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """Mean AUROC over the (N, K) columns that hold both classes; also returns how many columns counted."""
    scored = [k for k in range(labels.shape[1]) if np.unique(labels[:, k]).size == 2]
    if not scored:
        return float("nan"), 0
    return float(np.mean(roc_auc_score(labels[:, scored], scores[:, scored], average=None))), len(scored)


def binary_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    probs = scipy.special.expit(logits[:, 0])
    predicted = probs > 0.5
    return {
        "acc": float(accuracy_score(labels, predicted)),
        "auc": _binary_auc(labels, probs),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
    }


def multiclass_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    probs = scipy.special.softmax(logits, axis=1)
    predicted = probs.argmax(axis=1)
    one_hot = np.eye(logits.shape[1], dtype=np.int32)[labels]
    auc, _ = mean_per_column_auc(one_hot, probs)
    return {
        "acc": float(accuracy_score(labels, predicted)),
        "auc": auc,
        "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def multilabel_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    probs = scipy.special.expit(logits)
    per_label_auc, num_scored = mean_per_column_auc(labels, probs)
    return {
        "acc": float(accuracy_score(labels.ravel(), (probs > 0.5).ravel())),
        "auc": _binary_auc(labels.ravel(), probs.ravel()),
        "auc_per_label_mean": per_label_auc,
        "num_labels_scored": num_scored,
    }


def probe_metrics(task: str, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Metrics of one split: labels int (N,) or (N, K); logits (N, outputs) as the probe returns them."""
    compute = {"binary": binary_metrics, "multiclass": multiclass_metrics, "multilabel": multilabel_metrics}
    return compute[task](labels, np.asarray(logits, np.float64))
