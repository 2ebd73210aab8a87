"""MARLIN ViT-Small pretraining, as the official config/pretrain/marlin_vit_small.yaml.

    python -m marlin_jax.train --config configs/pretrain/marlin_vit_small.py --workdir /tmp/marlin_vit_small \
        --config.data.path=<shards dir>
    # CPU smoke run on the demo data:
    python -m marlin_jax.train --config configs/pretrain/marlin_vit_small.py:tiny --workdir /tmp/tiny \
        --config.data.path=<demo dir>
"""

from marlin_jax.architectures import VIT_SMALL
from marlin_jax.config_builders import pretrain_config


def get_config(variant=None):
    return pretrain_config(VIT_SMALL, "marlin_vit_small", variant)
