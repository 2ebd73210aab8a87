"""Linear probe on features listed in a CSV (`path,split,label` or `path,split,label_0,...,label_K-1`).

    python -m marlin_jax.linear_probe --config configs/probe/csv.py \
        --config.data.csv=/data/mine/probe.csv --config.task=multiclass --workdir runs/probe/mine

`task` is binary, multiclass or multilabel (the arg sets it too: configs/probe/csv.py:multilabel). Paths in
the CSV are relative to its folder. The probe is the convex solver
(ridge, L2 chosen on val); --config.solver=official runs the official CelebV-HQ LP recipe.
"""

import ml_collections

from marlin_jax.config_builders import probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = probe_config()
    config.task = arg or "binary"
    config.data.format = "csv"
    config.lock()
    return config
