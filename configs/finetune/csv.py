"""Fine-tuning on face videos listed in a CSV (`path,split,label` or `path,split,label_0,...,label_K-1`).

    python -m marlin_jax.finetune --config configs/finetune/csv.py:multiclass \
        --config.data.csv=/data/mine/videos.csv --config.init_from=marlin_vit_base_ytf \
        --workdir runs/finetune/mine

Paths in the CSV are relative to its folder and name face-cropped videos. The arg is a comma-separated list
of a task (binary, the default, multiclass or multilabel), a backbone (marlin_vit_{small,base,large}_ytf) and
`tiny` (a 64 px tiny encoder for CPU smoke runs): configs/finetune/csv.py:multilabel,tiny.
"""

import ml_collections

from marlin_jax.config_builders import apply_finetune_arg, finetune_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = finetune_config()
    config.task = "binary"
    config.data.format = "csv"
    apply_finetune_arg(config, arg, accepts_task=True)
    config.lock()
    return config
