"""MARLIN ViT-Base pretraining, as the official config/pretrain/marlin_vit_base.yaml.

    python -m marlin_jax.train --config configs/pretrain/marlin_vit_base.py --workdir /tmp/marlin_vit_base \
        --config.data.path=<shards dir>
    # CPU smoke run on the demo data:
    python -m marlin_jax.train --config configs/pretrain/marlin_vit_base.py:tiny --workdir /tmp/tiny \
        --config.data.path=<demo dir>
"""

from marlin_jax.architectures import VIT_BASE
from marlin_jax.config_builders import pretrain_config


def get_config(variant=None):
    return pretrain_config(VIT_BASE, "marlin_vit_base", variant)
