"""Fine-tuning: CelebV-HQ action attributes (35 labels, multilabel), official FT hyper-parameters.

    python -m marlin_jax.finetune --config configs/finetune/celebvhq_action.py \
        --config.data.root=/data/CelebV-HQ --config.init_from=marlin_vit_base_ytf \
        --workdir runs/finetune/celebvhq_action

Expects <root>/celebvhq_info.json and <root>/cropped/<clip id>.mp4 (see marlin_jax/downstream/tasks.py).
The arg picks the backbone (default marlin_vit_base_ytf), e.g. celebvhq_action.py:marlin_vit_small_ytf,
or `tiny` for a CPU smoke run. bfloat16 on TPUs: --config.compute_dtype=bfloat16.
"""

import ml_collections

from marlin_jax.config_builders import apply_finetune_arg, finetune_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = finetune_config()
    config.task = "multilabel"
    config.data.format = "celebvhq"
    config.data.attribute = "action"
    apply_finetune_arg(config, arg, accepts_task=False)
    config.lock()
    return config
