"""Linear probe for deepfake detection: real (0) or fake (1) per video (binary).

    python -m marlin_jax.linear_probe --config configs/probe/dfd.py \
        --config.data.csv=/data/ffpp/probe.csv --workdir runs/probe/dfd

The CSV has `path,split,label`. Reports accuracy (sigmoid at 0.5), AUROC and F1; the epoch is picked on
validation AUROC. --config.solver=official runs the official CelebV-HQ LP optimisation (the official code
ships no DFD probe).
"""

import ml_collections

from marlin_jax.config_builders import probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = probe_config()
    config.task = "binary"
    config.data.format = "csv"
    config.lock()
    return config
