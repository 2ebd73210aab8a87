"""Linear probe for facial expression recognition: one expression class per video (multiclass).

    python -m marlin_jax.linear_probe --config configs/probe/fer.py \
        --config.data.csv=/data/fer/probe.csv --workdir runs/probe/fer

The CSV has `path,split,label` with label in 0..C-1 (C inferred, or --config.data.num_classes=7). Reports
accuracy, macro-F1 and one-vs-rest AUROC. The official code ships no FER probe, so this is its CelebV-HQ LP
recipe, which picks the epoch on validation AUROC (--config.train.select_metric=acc picks on accuracy).
"""

import ml_collections

from marlin_jax.evaluation.probe_config import base_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = base_probe_config()
    config.task = "multiclass"
    config.data.format = "csv"
    config.lock()
    return config
