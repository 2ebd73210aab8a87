"""Probe metrics from logits, with the official names (`acc`, `auc`) and sklearn doing the counting.

Multilabel follows the official CelebV-HQ evaluation: it thresholds sigmoid probabilities at 0.5 and feeds
the whole (N, K) matrix to a *binary* torchmetrics AUROC, which flattens it; so `acc` and `auc` here are
`accuracy_score` and `roc_auc_score` over the flattened labels and probabilities. The mean of per-label AUROCs
(`auc_per_label_mean`) is added because the flattened AUROC also rewards getting the label base rates right.
Multiclass `auc` is the one-vs-rest macro average, as torchmetrics' multiclass AUROC defaults to.
An AUROC that is undefined (a class with no positive or no negative example) is NaN.

`auc_batch_mean` is how the official fine-tuning and probes pick their best epoch: the AUROC of each validation
batch of 32 (multilabel logits flattened, as its `Classifier.step` does), averaged over the batches weighted by
their size (Lightning's epoch aggregation). Batches whose AUROC is undefined are left out of the mean.
"""

from __future__ import annotations

import numpy as np
import scipy.special


def _sklearn_metrics():
    """sklearn.metrics, imported on first use: the import takes most of a second, and every training process loads
    this module (through its evaluators) although most never compute a probe metric."""
    import sklearn.metrics
    return sklearn.metrics


METRIC_NAMES = {
    "binary": ("acc", "auc", "f1"),
    "multiclass": ("acc", "auc", "f1_macro"),
    "multilabel": ("acc", "auc", "auc_per_label_mean", "num_labels_scored"),
}
# What can pick a best epoch or checkpoint: every metric above, and the official per-batch AUROC mean.
SELECTABLE = {task: (*names, "auc_batch_mean") for task, names in METRIC_NAMES.items()}
OFFICIAL_VAL_BATCH = 32


def _binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if np.unique(labels).size < 2:
        return float("nan")
    return float(_sklearn_metrics().roc_auc_score(labels, scores))


def mean_per_column_auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """Mean AUROC over the (N, K) columns that hold both classes; also returns how many columns counted."""
    scored = [k for k in range(labels.shape[1]) if np.unique(labels[:, k]).size == 2]
    if not scored:
        return float("nan"), 0
    return float(np.mean(_sklearn_metrics().roc_auc_score(labels[:, scored], scores[:, scored], average=None))), len(scored)


def binary_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    probs = scipy.special.expit(logits[:, 0])
    predicted = probs > 0.5
    return {
        "acc": float(_sklearn_metrics().accuracy_score(labels, predicted)),
        "auc": _binary_auc(labels, probs),
        "f1": float(_sklearn_metrics().f1_score(labels, predicted, zero_division=0)),
    }


def multiclass_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    probs = scipy.special.softmax(logits, axis=1)
    predicted = probs.argmax(axis=1)
    one_hot = np.eye(logits.shape[1], dtype=np.int32)[labels]
    auc, _ = mean_per_column_auc(one_hot, probs)
    return {
        "acc": float(_sklearn_metrics().accuracy_score(labels, predicted)),
        "auc": auc,
        "f1_macro": float(_sklearn_metrics().f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def multilabel_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    probs = scipy.special.expit(logits)
    per_label_auc, num_scored = mean_per_column_auc(labels, probs)
    return {
        "acc": float(_sklearn_metrics().accuracy_score(labels.ravel(), (probs > 0.5).ravel())),
        "auc": _binary_auc(labels.ravel(), probs.ravel()),
        "auc_per_label_mean": per_label_auc,
        "num_labels_scored": num_scored,
    }


def probe_metrics(task: str, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Metrics of one split: labels int (N,) or (N, K); logits (N, outputs) as the head returns them."""
    compute = {"binary": binary_metrics, "multiclass": multiclass_metrics, "multilabel": multilabel_metrics}
    return compute[task](labels, np.asarray(logits, np.float64))


def auc_batch_mean(task: str, labels: np.ndarray, logits: np.ndarray, batch: int = OFFICIAL_VAL_BATCH) -> float:
    """The official model-selection score: per-batch AUROC, averaged weighted by batch size (NaN if none)."""
    logits = np.asarray(logits, np.float64)
    total, weight = 0.0, 0
    for start in range(0, len(labels), batch):
        auc = probe_metrics(task, labels[start:start + batch], logits[start:start + batch])["auc"]
        if np.isfinite(auc):
            size = len(labels[start:start + batch])
            total, weight = total + auc * size, weight + size
    return total / weight if weight else float("nan")


def selection_metrics(task: str, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """`probe_metrics` plus `auc_batch_mean`: everything a validation pass reports and can select on."""
    return {**probe_metrics(task, labels, logits), "auc_batch_mean": auc_batch_mean(task, labels, logits)}


def summary_metrics(results: dict) -> dict[str, float]:
    """The test metrics at the top level of a results.json (probe or fine-tuning), for a one-line summary."""
    return {name: results[name] for name in SELECTABLE[results["task"]] if isinstance(results.get(name), float)}
