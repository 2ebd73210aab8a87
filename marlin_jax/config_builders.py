"""The config builders behind `configs/`: pretraining, fine-tuning and linear probes, from shared blocks.

The config files only pick a variant (`configs/pretrain/marlin_vit_base.py:tiny`,
`configs/finetune/csv.py:multiclass,tiny`) and lock the result; every field and its meaning is here.

Pretraining carries every hyper-parameter of the official pretraining YAMLs under the official meaning.
Fine-tuning and probes carry the official CelebV-HQ recipe (`config/celebv_hq/*/*_{ft,lp}.yaml`,
`model/classifier.py`, `evaluate.py`): Adam at 1e-4 with betas (0.5, 0.9) and no weight decay, the rate halved
after 7 epochs without a lower mean training loss (floor 1e-8), a stop once it reaches 1e-6, at most 2000
epochs, batch 32, 16-frame clips at temporal stride 2, and the checkpoint with the best validation AUROC kept.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from marlin_jax.architectures import OFFICIAL_ARCHITECTURES, VIT_BASE, VIT_TINY, MarlinArchitecture
from marlin_jax.downstream.tasks import TASKS

PRETRAIN_VARIANTS = ("paper", "tiny", "demo")
DEFAULT_BACKBONE = "marlin_vit_base_ytf"
TINY = "tiny"
# Side of the demo shards' face crops (`python -m data_prep.demo`), which the `tiny` and `demo` variants train on:
# a quarter of the tokens of 224 px keeps CPU runs short.
DEMO_IMAGE_SIZE = 112


# --- shared blocks -----------------------------------------------------------------------------------------

def add_mesh(config: ml_collections.ConfigDict) -> None:
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


def add_run_cadence(config: ml_collections.ConfigDict, *, log_every: int, checkpoint_every: int,
                    keep_checkpoints: int) -> None:
    """What the training loop reads: logging and checkpoint cadence, retention, and an optional profile."""
    config.log_every = log_every
    config.checkpoint_every = checkpoint_every
    config.keep_checkpoints = keep_checkpoints
    config.profile_steps = ""  # "START,COUNT": a jax.profiler trace of those steps in <workdir>/tensorboard


def plateau_adam() -> ml_collections.ConfigDict:
    """The official downstream optimiser: Adam, the rate halved on a training-loss plateau, stopped at a floor."""
    block = ml_collections.ConfigDict()
    block.learning_rate = 1e-4
    block.b1 = 0.5
    block.b2 = 0.9
    block.plateau_factor = 0.5
    block.plateau_patience = 7
    block.min_learning_rate = 1e-8
    block.stop_learning_rate = 1e-6  # official EarlyStoppingLR
    return block


def labelled_data() -> ml_collections.ConfigDict:
    """Where a downstream task's labelled files are (see marlin_jax/downstream/tasks.py)."""
    block = ml_collections.ConfigDict()
    block.format = "csv"  # csv | celebvhq
    block.csv = ""  # csv: the `path,split,label...` file; paths are relative to its folder
    block.num_classes = 0  # csv multiclass: 0 infers it from the largest label
    block.root = ""  # celebvhq: folder holding celebvhq_info.json
    block.attribute = ""  # celebvhq: appearance | action
    block.feature_dir = DEFAULT_BACKBONE  # celebvhq probes: features folder under root
    block.video_dir = "cropped"  # celebvhq fine-tuning: folder of face-cropped <clip id>.mp4 under root
    return block


# --- pretraining -------------------------------------------------------------------------------------------

def pretrain_config(architecture: MarlinArchitecture, model_name: str, variant: str | None) -> ml_collections.ConfigDict:
    variant = variant or "paper"
    if variant not in PRETRAIN_VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {', '.join(PRETRAIN_VARIANTS)}")
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
    # Corrupt records are skipped and counted (data/corrupt_records); past this share of the records read the
    # run stops, naming the count.
    config.data.max_corrupt_fraction = 0.01

    # Adversarial training: D loss mean D(fake) - mean D(real); G adds -adv_weight * mean D(pred).
    config.adv_loss = True
    config.adv_weight = 0.01
    config.adv_warmup_steps = 0  # steps trained on the reconstruction loss alone before the adversarial term
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
    config.init_from = ""  # official name (e.g. marlin_vit_base_ytf.full), .pt/.ckpt/.safetensors, .pth, or a workdir
    config.trust_pickled_checkpoint = False  # unpickle an init_from .ckpt holding arbitrary objects (runs its code)

    config.compute_dtype = "bfloat16"
    config.remat = True

    add_run_cadence(config, log_every=50, checkpoint_every=1000, keep_checkpoints=3)
    # Evaluators (marlin_jax/training/evaluator_protocol.py). `val`: the official objective on the val split, as the
    # official trainer logs val_loss each epoch; `probe`: a linear probe on a labelled CSV of face videos,
    # off until `csv` is set.
    config.evals = ml_collections.ConfigDict()
    config.evals.val = dict(type="reconstruction", every=1000, path="", split="val", max_clips=256,
                            batch_size=0, images=1)
    config.evals.probe = dict(type="linear_probe", every=5000, csv="", name="", task="binary", num_classes=0,
                              select_metric="auc", batch_size=0)
    # <workdir>/best holds the checkpoint with the lowest val/loss (the official ModelCheckpoint monitor).
    config.best_metric = "val/loss"
    config.best_mode = "min"

    add_mesh(config)

    if variant == "tiny":
        make_pretrain_tiny(config, model_name)
    elif variant == "demo":
        make_pretrain_demo(config, model_name)
    return config.lock()


def make_pretrain_tiny(config: ml_collections.ConfigDict, model_name: str) -> None:
    """Tiny widths for CPU tests and smoke runs, at the demo shards' crop side (`DEMO_IMAGE_SIZE`) and the real
    16 frames; on real shards add `--config.model.img_size=224`."""
    config.model_name = f"{model_name}_tiny"
    config.model = ml_collections.ConfigDict(dataclasses.replace(VIT_TINY, img_size=DEMO_IMAGE_SIZE).to_dict())
    config.batch_size = 4
    config.num_epochs = 1
    config.total_steps = 40
    config.learning_rate.warmup_epochs = 0
    config.learning_rate.base = 6.4e-2  # x 4/256 -> a 1e-3 peak after batch scaling
    config.compute_dtype = "float32"
    config.remat = False
    config.checkpoint_every = 20
    config.log_every = 5
    config.evals.val.every = 20
    config.evals.val.max_clips = 8
    config.evals.probe.every = 20
    config.data.worker_count = 0


# The demo's model: small enough to learn the demo portrait's face layout in minutes on 2 CPU cores.
DEMO_ARCHITECTURE = dataclasses.replace(VIT_TINY, encoder_embed_dim=128, decoder_embed_dim=128, decoder_depth=2,
                                        decoder_num_heads=4, img_size=DEMO_IMAGE_SIZE)


def make_pretrain_demo(config: ml_collections.ConfigDict, model_name: str) -> None:
    """The quickstart: a run on the demo shards that visibly learns on a CPU in a few minutes.

    Tuned on the demo data (2 CPU cores): at 112 px, widths of 128 and 800 steps of batch 4 reach a val
    reconstruction error of about 0.01 against the mean-colour baseline's 0.074, and the reconstructions show eyes,
    nose and mouth in place (the 64-wide tiny model only blurred them). The adversarial term starts at step 500:
    switched on from the start, the untrained critic's gradients slowed the reconstruction down within this short
    a run (the official run adds it from the start of 2000 epochs).
    """
    make_pretrain_tiny(config, model_name)
    config.model_name = f"{model_name}_demo"
    config.model = ml_collections.ConfigDict(DEMO_ARCHITECTURE.to_dict())
    config.total_steps = 800
    config.adv_warmup_steps = 500
    config.learning_rate.base = 0.128  # x 4/256 -> a 2e-3 peak
    config.log_every = 50
    config.checkpoint_every = 200
    config.evals.val.every = 200
    config.evals.val.max_clips = 8


# --- fine-tuning -------------------------------------------------------------------------------------------

def finetune_config(architecture: MarlinArchitecture = VIT_BASE,
                    model_name: str = DEFAULT_BACKBONE) -> ml_collections.ConfigDict:
    """An unlocked config with every field; a config file sets the task and data, then locks it."""
    config = ml_collections.ConfigDict()
    config.model_name = model_name
    config.model = ml_collections.ConfigDict(architecture.to_dict())
    config.init_from = ""  # official name, .pt/.ckpt/.safetensors, VideoMAE .pth, or a workdir; "" = random encoder
    config.trust_pickled_checkpoint = False  # unpickle an init_from .ckpt holding arbitrary objects (runs its code)
    config.task = "multilabel"  # binary | multiclass | multilabel

    config.data = labelled_data()
    config.data.temporal_sample_rate = 2  # official evaluate.py
    # Decoding limits the speed: one process decodes ~17 clips/s of 5 s, 224 px videos (measured on an H200 host).
    config.data.worker_count = 12  # decoding processes (0: decode in the training process)
    config.data.read_threads = 2  # batches decoded at once per process
    config.data.prefetch_batches = 2  # batches each process reads ahead

    config.optimizer = plateau_adam()
    config.batch_size = 32  # global, across all hosts; the last partial batch of each epoch is dropped
    config.eval_batch_size = 32
    config.num_epochs = 2000
    config.total_steps = ml_collections.FieldReference(None, field_type=int)  # None: num_epochs * epoch
    config.eval_every = ml_collections.FieldReference(None, field_type=int)  # None: once per epoch
    # Validation metric that picks the tested checkpoint; "auc_batch_mean" is the official per-batch mean.
    config.select_metric = "auc"
    config.seed = 0

    config.compute_dtype = "float32"  # official (pretraining defaults to bfloat16)
    # Without rematerialisation ViT-B at batch 32 peaks near 100 GB on a GPU (1568-token attention per layer).
    config.remat = True
    add_run_cadence(config, log_every=20, checkpoint_every=1000, keep_checkpoints=2)
    add_mesh(config)
    return config


def make_finetune_tiny(config: ml_collections.ConfigDict) -> None:
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


def apply_finetune_arg(config: ml_collections.ConfigDict, arg: str | None, accepts_task: bool) -> None:
    """`arg` is a comma-separated list: an official backbone name, `tiny`, and (CSV configs) a task.

    `configs/finetune/csv.py:multiclass,tiny`, `configs/finetune/celebvhq_action.py:marlin_vit_large_ytf`.
    """
    for token in filter(None, (arg or "").split(",")):
        if token == TINY:
            make_finetune_tiny(config)
        elif token in OFFICIAL_ARCHITECTURES:
            config.model_name = token
            config.model = ml_collections.ConfigDict(OFFICIAL_ARCHITECTURES[token].to_dict())
        elif accepts_task and token in TASKS:
            config.task = token
        else:
            choices = [TINY, *OFFICIAL_ARCHITECTURES, *(TASKS if accepts_task else ())]
            raise ValueError(f"unknown config arg {token!r}; choose from {', '.join(choices)}")


# --- linear probes -----------------------------------------------------------------------------------------

def probe_config() -> ml_collections.ConfigDict:
    """An unlocked config with every field; a config file sets the task and data, then locks it."""
    config = ml_collections.ConfigDict()
    config.task = "multilabel"  # binary | multiclass | multilabel
    # "convex": closed-form ridge with the L2 strength chosen on val (deterministic, seconds); "official": the
    # official Adam + plateau recipe below, for comparisons with the paper (see marlin_jax/downstream/probe.py).
    config.solver = "convex"
    config.data = labelled_data()
    config.data.temporal_reduction = "mean"  # mean | max | min over a video's windows
    # Low-data regime: each seed draws int(n * data_ratio) train and val examples (test stays whole).
    config.data_ratio = 1.0
    config.seeds = (0,)
    config.select_metric = "auc"  # validation metric that picks the epoch (official) or the L2 strength (convex)
    config.optimizer = plateau_adam()  # the official solver's
    config.batch_size = 32  # the official solver's
    config.max_epochs = 2000  # the official solver's
    return config
