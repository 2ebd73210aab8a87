"""Linear probe: CelebV-HQ action attributes (35 labels, multilabel), convex probe by default.

    python -m marlin_jax.linear_probe --config configs/probe/celebvhq_action.py \
        --config.data.root=/data/CelebV-HQ --workdir runs/probe/celebvhq_action

Expects <root>/celebvhq_info.json and <root>/<feature_dir>/<clip id>.npy (see
marlin_jax/downstream/tasks.py). The arg names the features folder, default marlin_vit_base_ytf
(the official extractor names it after the backbone): configs/probe/celebvhq_action.py:marlin_vit_small_ytf.
Low-data regime: --config.data_ratio=0.1 --config.seeds=0,1,2.
"""

import ml_collections

from marlin_jax.config_builders import probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = probe_config()
    config.task = "multilabel"
    config.data.format = "celebvhq"
    config.data.attribute = "action"
    if arg:
        config.data.feature_dir = arg
    config.lock()
    return config
