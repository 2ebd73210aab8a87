"""`train_and_evaluate(config, workdir)`: MARLIN pretraining on the training harness.

Setup checks the config before anything reads data or compiles, builds the mesh, creates the parameters
already sharded, builds the input pipeline and the evaluators, and hands the loop (marlin_jax/training/loop.py)
the pure step. Every key the step draws is `fold_in(base_key, step)`, so a resumed run draws the same masks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from marlin_jax import masking
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.data import shards
from marlin_jax.data.pipeline import make_pretrain_loader
from marlin_jax.data.record_dataset import check_corrupt_fraction, corrupt_record_counts
from marlin_jax.interop.weights import load_weights
from marlin_jax.pretraining.evaluators import build_pretraining_evaluators
from marlin_jax.pretraining.state import TrainState, init_train_state, make_optimizer
from marlin_jax.pretraining.step import StepSettings, make_train_step
from marlin_jax.training import checkpoints, loop, sharding
from marlin_jax.training.run_control import announce, print_banner
from marlin_jax.training.schedules import learning_rate_schedule

CONFIG_NAME = "config.json"
RESUME_KEYS = ("architecture",)


def validate_pretrain_config(config: ml_collections.ConfigDict) -> None:
    """Every mistake that can be named from the config alone, before any data is read or anything compiles."""
    checks = [
        (config.mask_strategy in masking.STRATEGIES,
         f"config.mask_strategy is {config.mask_strategy!r}; choose one of {', '.join(masking.STRATEGIES)}"),
        (0 < config.mask_percentage_target < 1,
         f"config.mask_percentage_target must lie in (0, 1), got {config.mask_percentage_target}"),
        (config.decoder_mask_ratio is None or 0 < config.decoder_mask_ratio <= 1,
         f"config.decoder_mask_ratio must lie in (0, 1] or be None, got {config.decoder_mask_ratio}"),
        (config.batch_size >= 1, f"config.batch_size must be >= 1, got {config.batch_size}"),
        (config.total_steps is None or config.total_steps >= 1,
         f"config.total_steps must be >= 1 or None, got {config.total_steps}"),
        (config.adv_warmup_steps >= 0, f"config.adv_warmup_steps must be >= 0, got {config.adv_warmup_steps}"),
        (0 <= config.data.max_corrupt_fraction <= 1,
         f"config.data.max_corrupt_fraction must lie in [0, 1], got {config.data.max_corrupt_fraction}"),
        (config.best_mode in ("min", "max"), f"config.best_mode must be 'min' or 'max', got {config.best_mode!r}"),
        (bool(config.data.path), "config.data.path is empty: point it at a shard directory built by data_prep.build"),
    ]
    for passed, message in checks:
        if not passed:
            raise ValueError(message)
    masking.num_visible_tokens(MarlinArchitecture.from_dict(config.model.to_dict()).num_tokens,
                               1 - config.mask_percentage_target)
    loop.Cadence.from_config(config)


def schedule_lengths(config) -> tuple[int, int]:
    """(steps_per_epoch, total_steps) from the manifest's clip count, failing before anything compiles.

    An epoch is ceil(clips / batch_size) steps, the official `len(train_dataloader())` (its DataLoader keeps the
    last partial batch), so warm-up and cosine land where the official schedule puts them. The input pipeline
    itself streams without epoch boundaries."""
    manifest = shards.load_manifest(config.data.path)
    shards.split_shard_paths(config.data.path, config.data.train_split)  # unfinished or absent: a clear error
    clips = sum(s["num_records"] for s in manifest["shards"] if s["split"] == config.data.train_split)
    if clips == 0:
        raise ValueError(f"{config.data.path} has no clips in split {config.data.train_split!r}")
    steps_per_epoch = config.steps_per_epoch or -(-clips // config.batch_size)
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    warmup_steps = config.learning_rate.warmup_epochs * steps_per_epoch
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed the warm-up steps ({warmup_steps} = "
                         f"learning_rate.warmup_epochs {config.learning_rate.warmup_epochs} x {steps_per_epoch} "
                         f"steps/epoch); pass a larger --config.total_steps or a smaller "
                         f"--config.learning_rate.warmup_epochs")
    return steps_per_epoch, total_steps


def write_config(workdir: epath.Path, config, resolved: dict) -> None:
    """`<workdir>/config.json`: the config as run, and the values derived from the data and the devices."""
    if jax.process_index() == 0:
        (workdir / CONFIG_NAME).write_text(json.dumps({"config": json.loads(config.to_json_best_effort()),
                                                       "resolved": resolved}, indent=2))


def init_from(state: TrainState, shardings: TrainState, config, arch: MarlinArchitecture) -> TrainState:
    """Official MARLIN / VideoMAE weights (or another run's checkpoint) as the starting generator, loaded on every
    host and placed straight into the sharded layout (no host ever gathers the state)."""
    weights = load_weights(arch, config.init_from, trust_pickled_checkpoint=config.trust_pickled_checkpoint)
    # An encoder-only file keeps the fresh decoder.
    generator = {**state.generator, **sharding.place_host_tree(weights.generator,
                                             {name: shardings.generator[name] for name in weights.generator})}
    state = state.replace(generator=generator)
    if weights.discriminator is not None:
        state = state.replace(discriminator=sharding.place_host_tree(weights.discriminator, shardings.discriminator))
    announce(f"initialised {', '.join(sorted(weights.generator))} from {config.init_from}")
    return state


def _split_state(state: TrainState):
    return ({"generator": state.generator, "discriminator": state.discriminator},
            {"generator": state.generator_opt_state, "discriminator": state.discriminator_opt_state,
             "step": state.step})


def _join_state(state: TrainState, params, opt_state) -> TrainState:
    return TrainState(step=opt_state["step"], generator=params["generator"], discriminator=params["discriminator"],
                      generator_opt_state=opt_state["generator"], discriminator_opt_state=opt_state["discriminator"])


def corrupt_record_report(loader, max_fraction: float):
    """`data/corrupt_records` over all hosts; stops the run (CorruptDataError) past `max_fraction` of the data."""

    def report() -> dict[str, float]:
        counts = np.asarray(corrupt_record_counts(loader), np.int64)  # corrupt, read, records per epoch
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
        corrupt, read, per_epoch = (int(c) for c in counts)
        check_corrupt_fraction(corrupt, read, max_fraction, records_per_epoch=per_epoch)
        return {"data/corrupt_records": float(corrupt)}

    return report


def _check_batch_geometry(arch: MarlinArchitecture):
    expected = (arch.num_frames, arch.img_size, arch.img_size, 3)

    def check(batch: dict[str, np.ndarray]) -> None:
        if tuple(batch["video"].shape[1:]) != expected:
            raise ValueError(f"the data gives clips of shape {tuple(batch['video'].shape[1:])}, but the model "
                             f"expects {expected} (config.model.img_size / num_frames)")

    return check


@dataclasses.dataclass(frozen=True)
class PretrainingProgram:
    """What a pretraining run puts on its mesh: the state (its init and layout) and the jitted train step
    `train_step(state, batch, key) -> (state, metrics)`. The trainer runs it; `python -m marlin_jax.aot` compiles
    the same objects for a TPU slice."""

    settings: StepSettings
    init_state: Callable[[jax.Array], TrainState]
    state_shardings: TrainState
    train_step: Any
    batch_sharding: jax.sharding.NamedSharding


def pretraining_program(config: ml_collections.ConfigDict, arch: MarlinArchitecture, mesh: jax.sharding.Mesh,
                        steps_per_epoch: int, total_steps: int) -> PretrainingProgram:
    """The step and state layout for `mesh`; builds and runs nothing on a device."""
    settings = StepSettings.from_config(config, arch)
    schedule = learning_rate_schedule(config.learning_rate, config.batch_size, steps_per_epoch, total_steps)
    generator_tx = make_optimizer(config.optimizer)
    discriminator_tx = make_optimizer(config.optimizer)
    init_state = functools.partial(init_train_state, arch=arch, generator_tx=generator_tx,
                                   discriminator_tx=discriminator_tx)
    state_shardings = sharding.state_shardings(init_state, mesh, config.logical_axis_rules)
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    train_step = jax.jit(make_train_step(settings, generator_tx, discriminator_tx, schedule),
                         in_shardings=(state_shardings, batch_sharding, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    return PretrainingProgram(settings, init_state, state_shardings, train_step, batch_sharding)


def build_trainer(config: ml_collections.ConfigDict, workdir) -> loop.Trainer:
    validate_pretrain_config(config)
    workdir = epath.Path(workdir)
    workdir = workdir if "://" in str(workdir) else workdir.absolute()
    arch = MarlinArchitecture.from_dict(config.model.to_dict())
    settings = StepSettings.from_config(config, arch)
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, jax.devices())
    sharding.check_model_fits(arch, mesh)
    sharding.check_batch_fits(config.batch_size, mesh)
    steps_per_epoch, total_steps = schedule_lengths(config)
    evaluators = build_pretraining_evaluators(config.evals, config=config, settings=settings, mesh=mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    per_host_batch = config.batch_size // jax.process_count()
    print_banner(mesh=mesh, per_host_batch=per_host_batch, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                 compute_dtype=config.compute_dtype)
    write_config(workdir, config, {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                                   "mesh": dict(mesh.shape), "process_count": jax.process_count(),
                                   "device_count": jax.device_count(), "per_host_batch": per_host_batch})

    program = pretraining_program(config, arch, mesh, steps_per_epoch, total_steps)
    init_key, base_key = jax.random.split(jax.random.key(config.seed))
    state = sharding.init_sharded(program.init_state, init_key, program.state_shardings, mesh,
                                  config.logical_axis_rules)
    if config.init_from and not checkpoints.is_checkpoint_dir(workdir / checkpoints.CHECKPOINT_SUBDIR):
        state = init_from(state, program.state_shardings, config, arch)
    loader = make_pretrain_loader(
        config.data.path, config.data.train_split, config.batch_size, config.seed,
        worker_count=config.data.worker_count, num_frames=arch.num_frames,
        temporal_sample_rate=config.data.temporal_sample_rate, patch_size=arch.patch_size,
        tubelet_size=arch.tubelet_size, shuffle_window=config.data.shuffle_buffer)
    best = checkpoints.BestRecord(config.best_metric, config.best_mode) if config.best_metric else None
    return loop.Trainer(
        name="pretrain", workdir=workdir, mesh=mesh, logical_axis_rules=config.logical_axis_rules, state=state,
        step_fn=lambda s, batch, step: program.train_step(s, batch, jax.random.fold_in(base_key, step)),
        loader=loader, total_steps=total_steps, global_batch_size=config.batch_size,
        cadence=loop.Cadence.from_config(config), split_state=_split_state, join_state=_join_state,
        metadata={"architecture": arch.to_dict(), "model_name": config.model_name}, resume_keys=RESUME_KEYS,
        evaluators=evaluators, best=best, check_first_batch=_check_batch_geometry(arch),
        log_extras=corrupt_record_report(loader, config.data.max_corrupt_fraction))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict[str, float]:
    """Trains until config.total_steps (or num_epochs), evaluating and checkpointing on the way; returns the
    last logged metrics."""
    trainer = build_trainer(config, workdir)
    try:
        result = loop.train(trainer)
    finally:
        if hasattr(trainer.loader, "close"):
            trainer.loader.close()
    if result.best is not None and result.best.step >= 0 and math.isfinite(result.best.value):
        announce(f"best {result.best.metric} = {result.best.value:.5g} at step {result.best.step} "
                 f"({trainer.workdir / checkpoints.BEST_SUBDIR})")
    return result.metrics
