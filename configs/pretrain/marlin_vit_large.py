"""MARLIN ViT-Large pretraining, as the official config/pretrain/marlin_vit_large.yaml.

    python -m marlin_jax.train --config configs/pretrain/marlin_vit_large.py --workdir /tmp/marlin_vit_large \
        --config.data.path=<shards dir>
    # CPU smoke run on the demo data:
    python -m marlin_jax.train --config configs/pretrain/marlin_vit_large.py:tiny --workdir /tmp/tiny \
        --config.data.path=<demo dir>
"""

from marlin_jax.architectures import VIT_LARGE
from marlin_jax.config_builders import pretrain_config


def get_config(variant=None):
    return pretrain_config(VIT_LARGE, "marlin_vit_large", variant)
