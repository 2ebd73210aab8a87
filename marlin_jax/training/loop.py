"""`train_and_evaluate(config, workdir)`: MARLIN pretraining from setup to the last checkpoint.

Setup (mesh, sharded state, data, resume) is separate from the step (steps.py) and the loop below. A run
resumes automatically from the newest checkpoint in `<workdir>/checkpoints`: parameters, both optimiser
states, the step and the data iterator all come back, and every key is `fold_in(base_key, step)`, so a resumed
run reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import grain
from tqdm import tqdm

from marlin_jax.training import checkpoints
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.data import shards
from marlin_jax.data.pipeline import make_pretrain_loader
from marlin_jax.training import reporting, sharding
from marlin_jax.training.run_control import PreemptionFlag, announce, check_finite
from marlin_jax.training.schedules import learning_rate_schedule
from marlin_jax.pretraining.state import TrainState, init_train_state, make_optimizer
from marlin_jax.pretraining.step import StepSettings, make_train_step, prepare_batch


@dataclasses.dataclass
class Run:
    """Everything set up for the loop."""

    config: Any
    workdir: pathlib.Path
    arch: MarlinArchitecture
    settings: StepSettings
    mesh: jax.sharding.Mesh
    state: TrainState
    state_shardings: Any
    train_step: Any
    loader: Iterator
    manager: ocp.CheckpointManager
    total_steps: int
    base_key: jax.Array


def _count_clips(data_path: str, split: str) -> int:
    manifest = shards.load_manifest(data_path)
    shards.split_shard_paths(data_path, split)  # raises with a clear message if unfinished or absent
    return sum(s["num_records"] for s in manifest["shards"] if s["split"] == split)


def _schedule_lengths(config) -> tuple[int, int]:
    """(steps_per_epoch, total_steps), failing before anything compiles if the data is missing."""
    if not config.data.path:
        raise ValueError("config.data.path is empty: point it at a shard directory built by data_prep.build")
    clips = _count_clips(config.data.path, config.data.train_split)
    if clips == 0:
        raise ValueError(f"{config.data.path} has no clips in split {config.data.train_split!r}")
    steps_per_epoch = config.steps_per_epoch or max(1, clips // config.batch_size)
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    return steps_per_epoch, total_steps


def _metadata(config, arch: MarlinArchitecture, step: int) -> dict:
    return {"architecture": arch.to_dict(), "model_name": config.model_name, "step": step}


def _check_resumable(manager: ocp.CheckpointManager, step: int, arch: MarlinArchitecture) -> None:
    saved = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
    saved_arch = MarlinArchitecture.from_dict(saved["architecture"])
    if saved_arch != arch:
        raise ValueError(f"the workdir holds a checkpoint of another model ({saved.get('model_name')}: "
                         f"{saved_arch}); this config builds {arch}. Use a new --workdir.")


def _init_from(run_state: TrainState, path: str, arch: MarlinArchitecture, shardings) -> TrainState:
    """Official MARLIN / VideoMAE weights (or another run's checkpoint) as the starting generator."""
    from marlin_jax.marlin import Marlin
    weights = Marlin.from_file(arch, path)
    generator = dict(jax.device_get(run_state.generator))
    generator.update(weights.params)  # an encoder-only file keeps the fresh decoder
    state = run_state.replace(generator=generator)
    if weights.discriminator_params is not None:
        state = state.replace(discriminator=weights.discriminator_params)
    announce(f"initialised {', '.join(sorted(weights.params))} from {path}")
    return jax.device_put(state, shardings)


def setup(config, workdir: str | pathlib.Path) -> Run:
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    arch = MarlinArchitecture.from_dict(config.model.to_dict())
    settings = StepSettings.from_config(config, arch)
    steps_per_epoch, total_steps = _schedule_lengths(config)
    schedule = learning_rate_schedule(config.learning_rate, config.batch_size, steps_per_epoch, total_steps)
    generator_tx = make_optimizer(config.optimizer, schedule)
    discriminator_tx = make_optimizer(config.optimizer, schedule)

    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    rules = config.logical_axis_rules
    if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"batch_size {config.batch_size} does not split over the mesh's data x fsdp axes "
                         f"({mesh.shape['data']} x {mesh.shape['fsdp']})")
    init_key, base_key = jax.random.split(jax.random.key(config.seed))
    state, state_shardings = sharding.init_sharded(
        lambda k: init_train_state(k, arch, generator_tx, discriminator_tx), init_key, mesh, rules)

    manager = checkpoints.make_manager(workdir / checkpoints.CHECKPOINT_SUBDIR, max_to_keep=config.keep_checkpoints)
    loader = make_pretrain_loader(
        config.data.path, config.data.train_split, config.batch_size, config.seed,
        worker_count=config.data.worker_count, num_frames=arch.num_frames,
        temporal_sample_rate=config.data.temporal_sample_rate, patch_size=arch.patch_size,
        tubelet_size=arch.tubelet_size, shuffle_window=config.data.shuffle_buffer)

    latest = manager.latest_step()
    if latest is not None:
        _check_resumable(manager, latest, arch)
        # The freshly initialised state is the restore target: same tree, shapes and shardings.
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                          state)
        restored = manager.restore(latest, args=ocp.args.Composite(
            params=ocp.args.StandardRestore({"generator": abstract.generator,
                                             "discriminator": abstract.discriminator}),
            opt_state=ocp.args.StandardRestore({"generator": abstract.generator_opt_state,
                                                "discriminator": abstract.discriminator_opt_state,
                                                "step": abstract.step}),
            data_iterator=grain.checkpoint.CheckpointRestore(loader)))
        state = TrainState(step=restored.opt_state["step"], generator=restored.params["generator"],
                           discriminator=restored.params["discriminator"],
                           generator_opt_state=restored.opt_state["generator"],
                           discriminator_opt_state=restored.opt_state["discriminator"])
        announce(f"resumed from step {latest} in {workdir}")
    elif config.init_from:
        state = _init_from(state, config.init_from, arch, state_shardings)

    step_fn = make_train_step(settings, generator_tx, discriminator_tx, schedule)
    replicated = sharding.replicated(mesh)
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    return Run(config, workdir, arch, settings, mesh, state, state_shardings, train_step, loader, manager,
               total_steps, base_key)


def save_checkpoint(run: Run, step: int) -> None:
    state = run.state
    run.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave({"generator": state.generator, "discriminator": state.discriminator}),
        opt_state=ocp.args.StandardSave({"generator": state.generator_opt_state,
                                         "discriminator": state.discriminator_opt_state, "step": state.step}),
        data_iterator=grain.checkpoint.CheckpointSave(run.loader),
        metadata=ocp.args.JsonSave(_metadata(run.config, run.arch, step))), force=True)


def _preview(run: Run, batch: dict[str, jax.Array], step: int) -> np.ndarray:
    """Reconstruction grid of the batch's first clip, with the mask the step drew."""
    from marlin_jax.model import MarlinMAE
    first = {k: v[:1] for k, v in jax.device_get(batch).items()}
    mask_key = jax.random.split(jax.random.fold_in(run.base_key, step))[0]
    clips = prepare_batch(run.settings, first, mask_key)
    predicted = MarlinMAE(run.arch).apply({"params": jax.device_get(run.state.generator)}, clips.video,
                                          clips.visible_idx, clips.masked_idx)
    return reporting.reconstruction_grid(run.arch, np.asarray(clips.video[0]), np.asarray(clips.visible_idx[0]),
                                         np.asarray(clips.masked_idx[0]), np.asarray(predicted[0]))


def run_loop(run: Run) -> dict[str, float]:
    config = run.config
    reporter = reporting.RunReporter(run.workdir)
    preemption = PreemptionFlag()
    start = int(jax.device_get(run.state.step))
    first_batch_checked = False
    last_metrics: dict[str, float] = {}
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    progress = tqdm(total=run.total_steps, initial=start, desc="pretrain", unit="step",
                    disable=jax.process_index() != 0)
    try:
        for step in range(start, run.total_steps):
            fetch_start = time.perf_counter()
            local = next(run.loader)
            data_wait += time.perf_counter() - fetch_start
            if not first_batch_checked:
                _check_batch_geometry(local, run.arch)
                first_batch_checked = True
            batch = sharding.global_batch(local, run.mesh)
            run.state, metrics = run.train_step(run.state, batch, jax.random.fold_in(run.base_key, step))
            done = step + 1
            progress.update(1)
            if step == start:
                # The first step compiles; throughput counts the steps after it.
                jax.block_until_ready(metrics)
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            else:
                window_steps += 1
            # Read the flag once: a SIGTERM landing later in this iteration must not skip the save below.
            preempted = preemption.raised
            is_last = done == run.total_steps or preempted
            values = None  # host copy of this step's metrics, fetched at most once
            if done % config.log_every == 0 or is_last:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_finite(values, done)
                if window_steps:
                    elapsed = time.perf_counter() - window_start
                    values["clips_per_s"] = window_steps * config.batch_size / elapsed
                    values["step_time_s"] = elapsed / window_steps
                    values["data_wait_s"] = data_wait / window_steps
                reporter.scalars(done, values)
                progress.set_postfix(rec=f"{values['rec_loss']:.4f}", d=f"{values['d_loss']:.3f}")
                last_metrics = values
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            if config.image_every and (done % config.image_every == 0 or is_last):
                reporter.image(done, _preview(run, batch, step))
            if done % config.checkpoint_every == 0 or is_last:
                if values is None:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    check_finite(values, done)
                save_checkpoint(run, done)
            if preempted:
                break
    finally:
        preemption.restore()
        progress.close()
        run.manager.wait_until_finished()
        reporter.close()
    return last_metrics


def _check_batch_geometry(batch: dict[str, np.ndarray], arch: MarlinArchitecture) -> None:
    expected = (arch.num_frames, arch.img_size, arch.img_size, 3)
    if tuple(batch["video"].shape[1:]) != expected:
        raise ValueError(f"the data gives clips of shape {tuple(batch['video'].shape[1:])}, but the model expects "
                         f"{expected} (config.model.img_size / num_frames)")


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict[str, float]:
    """Trains until config.total_steps (or num_epochs), checkpointing and logging on the way."""
    run = setup(config, workdir)
    try:
        # jit traces at the first call: the mesh and logical rules must be active there, or the model's
        # activation-sharding constraints are silently dropped.
        with sharding.activate(run.mesh, config.logical_axis_rules):
            return run_loop(run)
    finally:
        run.manager.close()
        if hasattr(run.loader, "close"):
            run.loader.close()
