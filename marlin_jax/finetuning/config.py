"""The fine-tuning config shared by `configs/finetune/*.py`, and the `:arg` those files accept.

The recipe is the official CelebV-HQ fine-tuning (`config/celebv_hq/*/*_ft.yaml`, `model/classifier.py`,
`evaluate.py`, `dataset/celebv_hq.py`): the whole encoder and a `Linear(D, outputs)` on its mean-pooled,
normed features; Adam at 1e-4 with betas (0.5, 0.9) and no weight decay; the rate halved after 7 epochs
without a lower mean training loss (floor 1e-8) and training stopped once it reaches 1e-6, at most 2000
epochs; batch 32; 16-frame clips at temporal stride 2; the checkpoint with the best validation AUROC tested.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from marlin_jax.architectures import (
    OFFICIAL_ARCHITECTURES,
    VIT_BASE,
    VIT_TINY,
    MarlinArchitecture,
)
from marlin_jax.evaluation.probe_data import TASKS
from marlin_jax.pretrain_config import add_mesh_config

DEFAULT_BACKBONE = "marlin_vit_base_ytf"
TINY = "tiny"


def base_finetune_config(architecture: MarlinArchitecture = VIT_BASE,
                         model_name: str = DEFAULT_BACKBONE) -> ml_collections.ConfigDict:
    """An unlocked config with every field; a config file sets the task and data, then locks it."""
    config = ml_collections.ConfigDict()
    config.model_name = model_name
    config.model = ml_collections.ConfigDict(architecture.to_dict())
    config.init_from = ""  # official .pt/.ckpt, VideoMAE .pth, or a pretraining workdir; "" = random encoder
    config.task = "multilabel"  # binary | multiclass | multilabel

    config.data = ml_collections.ConfigDict()
    config.data.format = "csv"  # csv | celebvhq
    config.data.csv = ""  # csv: the `path,split,label...` file; paths are relative to its folder
    config.data.num_classes = 0  # csv multiclass: 0 infers it from the largest label
    config.data.root = ""  # celebvhq: folder holding celebvhq_info.json
    config.data.video_dir = "cropped"  # celebvhq: folder of face-cropped <clip id>.mp4 under root
    config.data.attribute = ""  # celebvhq: appearance | action
    config.data.temporal_sample_rate = 2  # official evaluate.py
    # Decoding limits the speed: one process decodes ~17 clips/s of 5 s, 224 px videos (measured on an H200 host).
    config.data.worker_count = 12  # decoding processes (0: decode in the training process)
    config.data.read_threads = 2  # batches decoded at once per process
    config.data.prefetch_batches = 2  # batches each process reads ahead

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-4
    config.optimizer.adam_b1 = 0.5
    config.optimizer.adam_b2 = 0.9
    config.optimizer.plateau_factor = 0.5
    config.optimizer.plateau_patience = 7
    config.optimizer.min_learning_rate = 1e-8
    config.optimizer.stop_learning_rate = 1e-6  # official EarlyStoppingLR

    config.batch_size = 32  # global, across all hosts; the last partial batch of each epoch is dropped
    config.eval_batch_size = 32
    config.num_epochs = 2000
    config.total_steps = ml_collections.FieldReference(None, field_type=int)  # None: num_epochs * epoch
    config.eval_every = ml_collections.FieldReference(None, field_type=int)  # None: once per epoch
    config.select_metric = "auc"  # validation metric that picks the tested checkpoint
    config.seed = 0

    config.compute_dtype = "float32"  # official; bfloat16 is ~1.5x faster
    # Without rematerialisation ViT-B at batch 32 peaks near 100 GB on a GPU (1568-token attention per layer).
    config.remat = True

    config.checkpoint_every = 1000
    config.keep_checkpoints = 2
    config.log_every = 20

    add_mesh_config(config)
    return config


def make_tiny(config: ml_collections.ConfigDict) -> None:
    """A tiny 64 px encoder, small batches and a short run: CPU tests and smoke runs."""
    config.model_name = "marlin_vit_tiny"
    config.model = ml_collections.ConfigDict(dataclasses.replace(VIT_TINY, img_size=64).to_dict())
    config.optimizer.learning_rate = 1e-3
    config.batch_size = 8
    config.eval_batch_size = 8
    config.total_steps = 40
    config.eval_every = 10
    config.checkpoint_every = 10
    config.log_every = 5
    config.data.worker_count = 0
    config.remat = False


def apply_arg(config: ml_collections.ConfigDict, arg: str | None, accepts_task: bool) -> None:
    """`arg` is a comma-separated list: an official backbone name, `tiny`, and (CSV configs) a task.

    `configs/finetune/csv.py:multiclass,tiny`, `configs/finetune/celebvhq_action.py:marlin_vit_large_ytf`.
    """
    for token in filter(None, (arg or "").split(",")):
        if token == TINY:
            make_tiny(config)
        elif token in OFFICIAL_ARCHITECTURES:
            config.model_name = token
            config.model = ml_collections.ConfigDict(OFFICIAL_ARCHITECTURES[token].to_dict())
        elif accepts_task and token in TASKS:
            config.task = token
        else:
            choices = [TINY, *OFFICIAL_ARCHITECTURES, *(TASKS if accepts_task else ())]
            raise ValueError(f"unknown config arg {token!r}; choose from {', '.join(choices)}")
