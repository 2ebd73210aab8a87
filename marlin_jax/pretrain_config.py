"""The pretraining config shared by `configs/pretrain/marlin_vit_{small,base,large}.py`.

Every hyper-parameter of the official pretraining YAMLs is here under the official meaning; the config files
only pick the architecture and a variant (`""`/`None` for the paper's setting, `tiny` for CPU tests and the
README demo).
"""

from __future__ import annotations

import ml_collections

import dataclasses

from marlin_jax.architectures import VIT_TINY, MarlinArchitecture

VARIANTS = ("paper", "tiny")


def add_mesh_config(config: ml_collections.ConfigDict) -> None:
    """The mesh over all devices and how the model's logical axis names map onto its axes."""
    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1, 1)
    config.mesh.axes = ("data", "fsdp", "tensor")
    config.logical_axis_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("length", None),
        ("head_dim", None),
        ("patch", None),
        ("decoder_embed", None),
    )


def pretrain_config(architecture: MarlinArchitecture, model_name: str, variant: str | None) -> ml_collections.ConfigDict:
    variant = variant or "paper"
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.model_name = model_name
    config.model = ml_collections.ConfigDict(architecture.to_dict())

    # Masking ("Fasking"): 90% of the tokens masked, facial components first.
    config.mask_strategy = "fasking"
    config.mask_percentage_target = 0.9
    # VideoMAE V2 decoder masking: reconstruct only this share of the masked tokens (None = all, official).
    config.decoder_mask_ratio = ml_collections.FieldReference(None, field_type=float)

    config.data = ml_collections.ConfigDict()
    config.data.path = ""
    config.data.train_split = "train"
    config.data.temporal_sample_rate = 2
    config.data.worker_count = 2
    config.data.shuffle_buffer = 64

    # Adversarial training: D loss mean D(fake) - mean D(real); G adds -adv_weight * mean D(pred).
    config.adv_loss = True
    config.adv_weight = 0.01
    config.gp_weight = 0.0
    config.d_steps = 1
    config.g_steps = 1

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.type = "adamw"
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.0

    # Learning rates are scaled by global batch / 256, as the official train.py does.
    config.learning_rate = ml_collections.ConfigDict()
    config.learning_rate.base = 1.5e-4
    config.learning_rate.warmup = 1e-6
    config.learning_rate.min = 1e-5
    config.learning_rate.warmup_epochs = 40
    # "step": warmup + cosine evaluated every step; "epoch": the official per-epoch LambdaLR stepping.
    config.learning_rate.schedule_unit = "step"

    config.batch_size = 256  # global, across all hosts
    config.num_epochs = 2000
    config.steps_per_epoch = ml_collections.FieldReference(None, field_type=int)  # None: from the data
    config.total_steps = ml_collections.FieldReference(None, field_type=int)  # None: num_epochs * steps_per_epoch
    config.grad_accum_steps = 1
    config.seed = 0
    config.init_from = ""  # official .pt/.ckpt, VideoMAE .pth, or an orbax workdir

    config.compute_dtype = "bfloat16"
    config.remat = True

    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.log_every = 50
    config.image_every = 1000

    add_mesh_config(config)

    if variant == "tiny":
        config.model_name = f"{model_name}_tiny"
        # Tiny widths at the real 224 px / 16-frame geometry, so it trains on real data shards.
        config.model = ml_collections.ConfigDict(dataclasses.replace(VIT_TINY, img_size=224).to_dict())
        config.batch_size = 4
        config.num_epochs = 1
        config.total_steps = 40
        config.learning_rate.warmup_epochs = 0
        config.learning_rate.base = 6.4e-2  # x 4/256 -> a 1e-3 peak after batch scaling
        config.compute_dtype = "float32"
        config.remat = False
        config.checkpoint_every = 20
        config.log_every = 5
        config.image_every = 20
        config.data.worker_count = 0
    return config.lock()
