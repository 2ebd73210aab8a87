"""Linear probe for facial expression recognition: one expression class per video (multiclass).

    python -m marlin_jax.linear_probe --config configs/probe/fer.py \
        --config.data.csv=/data/fer/probe.csv --workdir runs/probe/fer

The CSV has `path,split,label` with label in 0..C-1 (C inferred, or --config.data.num_classes=7). Reports
accuracy, macro-F1 and one-vs-rest AUROC, selecting on validation AUROC (--config.select_metric=acc picks on
accuracy). --config.solver=official runs the official CelebV-HQ LP optimisation (the official code ships no FER
probe).
"""

import ml_collections

from marlin_jax.config_builders import probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = probe_config()
    config.task = "multiclass"
    config.data.format = "csv"
    config.lock()
    return config
