"""Linear probing of extracted features: one probe per seed, test metrics averaged into `results.json`.

`run_linear_probe(config, workdir)` is what `python -m marlin_jax.linear_probe` calls; see
`probe_config.base_probe_config` for the fields and `configs/probe/` for the tasks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from marlin_jax.evaluation.celebvhq_data import load_celebvhq
from marlin_jax.evaluation.csv_data import load_csv
from marlin_jax.evaluation.metrics import METRIC_NAMES, probe_metrics
from marlin_jax.evaluation.probe_data import TASKS, TEMPORAL_REDUCTIONS, ProbeDataset, subsample
from marlin_jax.evaluation.probe_training import fit_probe, predict_logits


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Rejects field values the probe cannot run with, naming the field."""
    checks = [
        (config.task in TASKS, f"config.task must be one of {TASKS}"),
        (config.data.format in ("csv", "celebvhq"), "config.data.format must be 'csv' or 'celebvhq'"),
        (config.data.format != "celebvhq" or config.task == "multilabel", "CelebV-HQ tasks are multilabel"),
        (config.data.format != "csv" or bool(config.data.csv), "config.data.csv is empty"),
        (config.data.format != "celebvhq" or bool(config.data.root), "config.data.root is empty"),
        (config.data.temporal_reduction in TEMPORAL_REDUCTIONS,
         f"config.data.temporal_reduction must be one of {TEMPORAL_REDUCTIONS}"),
        (0.0 < config.data_ratio <= 1.0, "config.data_ratio must be in (0, 1]"),
        (len(config.seeds) > 0, "config.seeds is empty"),
        (config.train.batch_size >= 1, "config.train.batch_size must be >= 1"),
        (config.train.max_epochs >= 1, "config.train.max_epochs must be >= 1"),
        (config.train.select_metric in METRIC_NAMES.get(config.task, ()),
         f"config.train.select_metric must be one of {METRIC_NAMES.get(config.task)}"),
    ]
    for passed, message in checks:
        if not passed:
            raise ValueError(message)


def load_probe_dataset(config: ml_collections.ConfigDict) -> ProbeDataset:
    data = config.data
    if data.format == "celebvhq":
        return load_celebvhq(data.root, data.feature_dir, data.attribute, data.temporal_reduction)
    return load_csv(data.csv, config.task, data.temporal_reduction, data.num_classes)


def probe_one_seed(dataset: ProbeDataset, config: ml_collections.ConfigDict, seed: int) -> dict:
    """Trains on this seed's train subset, picks the epoch on its val subset, and scores every split."""
    # As in the official low-data runs, the ratio shrinks train and val; the test set stays whole.
    rng = np.random.default_rng(seed)
    train = subsample(dataset.splits["train"], config.data_ratio, rng)
    splits = {"train": train, "val": subsample(dataset.splits["val"], config.data_ratio, rng),
              "test": dataset.splits["test"]}
    fit = fit_probe(dataset.task, dataset.num_outputs, train, splits["val"], config.train, seed)
    metrics = {name: probe_metrics(dataset.task, split.labels,
                                   predict_logits(dataset.num_outputs, fit.params, split.features))
               for name, split in splits.items()}
    logging.info("seed %d: best epoch %d of %d; test %s", seed, fit.best_epoch, len(fit.history["train_loss"]),
                 metrics["test"])
    return {
        "seed": seed,
        "num_examples": {name: len(split) for name, split in splits.items()},
        "best_epoch": fit.best_epoch,
        "epochs_run": len(fit.history["train_loss"]),
        "metrics": metrics,
        "history": fit.history,
    }


def summarise_test(per_seed: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population) standard deviation of each test metric over the seeds."""
    names = per_seed[0]["metrics"]["test"].keys()
    values = {name: np.array([run["metrics"]["test"][name] for run in per_seed], np.float64) for name in names}
    mean = {name: float(v.mean()) for name, v in values.items()}
    return mean, {name: float(v.std()) for name, v in values.items()}


def _json_ready(value):
    """JSON has no NaN: an undefined metric becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def run_linear_probe(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Probes every seed in `config.seeds`, writes `<workdir>/results.json` and returns its content.

    The top level holds the test metrics averaged over seeds (`acc`, `auc`, ...) and their `std`; `per_seed`
    holds each seed's subset sizes, selected epoch, train/val/test metrics and training history.
    """
    validate_config(config)
    dataset = load_probe_dataset(config)
    per_seed = [probe_one_seed(dataset, config, seed) for seed in config.seeds]
    mean, std = summarise_test(per_seed)
    results = {
        **mean,
        "std": std,
        "task": dataset.task,
        "num_outputs": dataset.num_outputs,
        "feature_dim": dataset.feature_dim,
        "label_names": dataset.label_names,
        "num_examples": {name: len(split) for name, split in dataset.splits.items()},
        "num_empty_features": dataset.num_empty_features,
        "data_ratio": config.data_ratio,
        "seeds": list(config.seeds),
        "per_seed": per_seed,
        "config": config.to_dict(),
    }
    results = _json_ready(results)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    logging.info("test over %d seed(s): %s (std %s)", len(per_seed), mean, std)
    return results
