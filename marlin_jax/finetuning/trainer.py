"""`finetune_and_evaluate(config, workdir)`: fine-tune, validate, select, test, write `results.json`.

Built like pretraining (marlin_jax/training/loop.py): a mesh from the config, parameters born sharded, global
batches from per-host rows, one jitted step with the state donated, orbax checkpoints with automatic resume,
a checkpoint on SIGTERM, and TensorBoard + `metrics.jsonl` through RunReporter. Validation runs every
`eval_every` steps (default: each epoch) and the model with the best `select_metric` is the one tested, as
the official ModelCheckpoint(monitor="val_auc") does; training ends at `total_steps` or, as the official
EarlyStoppingLR, at the first epoch boundary where the plateau-reduced learning rate is at or below
`optimizer.stop_learning_rate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from tqdm import tqdm

from marlin_jax.training import checkpoints
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.evaluation.metrics import METRIC_NAMES, probe_metrics
from marlin_jax.evaluation.probe_data import TASKS
from marlin_jax.evaluation.probe_training import make_optimizer
from marlin_jax.finetuning import checkpointing
from marlin_jax.finetuning.checkpointing import Best
from marlin_jax.finetuning.classifier import VideoClassifier
from marlin_jax.finetuning.clips import ClipSettings
from marlin_jax.finetuning.loader import Parallelism, eval_batches, make_train_loader
from marlin_jax.finetuning.steps import (
    FinetuneState,
    init_state,
    learning_rate,
    make_predict,
    make_train_step,
)
from marlin_jax.finetuning.video_data import VideoDataset, load_video_dataset
from marlin_jax.training import reporting, sharding
from marlin_jax.training.run_control import PreemptionFlag, announce, check_finite

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RESULTS_NAME = "results.json"


@dataclasses.dataclass
class Finetune:
    """Everything set up for the loop, and what it updates (state, best_params, best)."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    dataset: VideoDataset
    clip_settings: ClipSettings
    parallelism: Parallelism
    mesh: jax.sharding.Mesh
    state: FinetuneState
    best_params: Any
    best: Best
    copy_params: Callable
    train_step: Callable
    predict: Callable
    loader: grain.DatasetIterator
    manager: ocp.CheckpointManager
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    metadata: dict


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Rejects field values fine-tuning cannot run with, naming the field."""
    data = config.data
    checks = [
        (config.task in TASKS, f"config.task must be one of {TASKS}, got {config.task!r}"),
        (data.format in ("csv", "celebvhq"), f"config.data.format must be 'csv' or 'celebvhq', got {data.format!r}"),
        (data.format != "celebvhq" or config.task == "multilabel", "CelebV-HQ tasks are multilabel"),
        (data.format != "csv" or bool(data.csv), "config.data.csv is empty"),
        (data.format != "celebvhq" or bool(data.root), "config.data.root is empty"),
        (config.select_metric in METRIC_NAMES.get(config.task, ()),
         f"config.select_metric must be one of {METRIC_NAMES.get(config.task)}, got {config.select_metric!r}"),
        (config.compute_dtype in COMPUTE_DTYPES, f"config.compute_dtype must be one of {tuple(COMPUTE_DTYPES)}"),
        (data.temporal_sample_rate >= 1, "config.data.temporal_sample_rate must be >= 1"),
    ]
    for field in ("batch_size", "eval_batch_size", "num_epochs", "checkpoint_every", "log_every"):
        checks.append((config[field] >= 1, f"config.{field} must be >= 1, got {config[field]}"))
    for passed, message in checks:
        if not passed:
            raise ValueError(message)


def _check_batch_sizes(config, mesh: jax.sharding.Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % shards or config[field] % jax.process_count():
            raise ValueError(f"config.{field}={config[field]} does not split over the mesh's data x fsdp axes "
                             f"({shards} devices) and {jax.process_count()} processes")


def _schedule_lengths(config, num_train: int) -> tuple[int, int, int]:
    """(steps_per_epoch, total_steps, eval_every); an epoch drops its last partial batch, as the official."""
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has {num_train} videos, fewer than one batch ({config.batch_size})")
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    return steps_per_epoch, total_steps, config.eval_every or steps_per_epoch


def _run_metadata(config, arch: MarlinArchitecture, dataset: VideoDataset) -> dict:
    return {"architecture": arch.to_dict(), "model_name": config.model_name, "task": dataset.task,
            "num_outputs": dataset.num_outputs, "select_metric": config.select_metric}


def _check_resumable(saved: dict, expected: dict) -> None:
    for key in ("architecture", "task", "num_outputs", "select_metric"):
        if saved.get(key) != expected[key]:
            raise ValueError(f"the workdir holds a fine-tuning checkpoint with {key}={saved.get(key)!r}; this "
                             f"config has {expected[key]!r}. Use a new --workdir.")


def _init_encoder(state: FinetuneState, path: str, arch: MarlinArchitecture, shardings) -> FinetuneState:
    """Official MARLIN / VideoMAE weights, or a pretraining workdir, as the starting encoder."""
    from marlin_jax.marlin import Marlin
    encoder = Marlin.from_file(arch, path).params["encoder"]
    announce(f"initialised the encoder from {path}")
    return jax.device_put(state.replace(params={**state.params, "encoder": encoder}), shardings)


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Finetune:
    validate_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    arch = MarlinArchitecture.from_dict(config.model.to_dict())
    dataset = load_video_dataset(config)
    steps_per_epoch, total_steps, eval_every = _schedule_lengths(config, len(dataset.splits["train"]))
    metadata = _run_metadata(config, arch, dataset)
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    _check_batch_sizes(config, mesh)
    rules = config.logical_axis_rules

    model = VideoClassifier(arch, dataset.num_outputs, config.remat, COMPUTE_DTYPES[config.compute_dtype])
    tx = make_optimizer(config.optimizer, steps_per_epoch)
    state, state_shardings = sharding.init_sharded(lambda k: init_state(k, model, tx),
                                                   jax.random.key(config.seed), mesh, rules)
    clip_settings = ClipSettings(arch.num_frames, config.data.temporal_sample_rate, arch.img_size)
    parallelism = Parallelism(config.data.read_threads, config.data.prefetch_batches, config.data.worker_count)
    loader = make_train_loader(dataset.splits["train"], config.batch_size, config.seed, clip_settings, parallelism)
    manager = checkpoints.make_manager(workdir / checkpoints.CHECKPOINT_SUBDIR, max_to_keep=config.keep_checkpoints)

    copy_params = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=state_shardings.params)
    train_step = jax.jit(make_train_step(model, tx, dataset.task, config.optimizer.learning_rate),
                         in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    predict = jax.jit(make_predict(model), in_shardings=(state_shardings.params, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))

    best, latest = Best(), manager.latest_step()
    if latest is not None:
        _check_resumable(checkpointing.read_metadata(manager, latest), metadata)
        state, best_params, best = checkpointing.restore_state(manager, latest, state, loader, config.select_metric)
        announce(f"resumed from step {latest} in {workdir}")
    else:
        if config.init_from:
            state = _init_encoder(state, config.init_from, arch, state_shardings)
        else:
            logging.warning("config.init_from is empty: fine-tuning an encoder with random weights")
        best_params = copy_params(state.params)
    return Finetune(config, workdir, dataset, clip_settings, parallelism, mesh, state, best_params, best, copy_params,
                    train_step, predict, loader, manager, steps_per_epoch, total_steps, eval_every, metadata)


def predict_logits(run: Finetune, params, split_name: str) -> np.ndarray:
    """Logits (N, outputs) of one clip per video of a split (see loader.eval_batches)."""
    split, config = run.dataset.splits[split_name], run.config
    logits = []
    batches = eval_batches(split, config.eval_batch_size, config.seed, run.clip_settings, run.parallelism)
    with contextlib.closing(batches):
        for local in batches:
            video = sharding.global_batch({"video": local}, run.mesh)["video"]
            logits.append(np.asarray(run.predict(params, video), np.float64))
    return np.concatenate(logits)[:len(split)]


def evaluate(run: Finetune, params, split_name: str) -> dict[str, float]:
    split = run.dataset.splits[split_name]
    return probe_metrics(run.dataset.task, split.labels, predict_logits(run, params, split_name))


def _validate(run: Finetune, step: int, reporter: reporting.RunReporter) -> None:
    metrics = evaluate(run, run.state.params, "val")
    reporter.scalars(step, {f"val_{k}": v for k, v in metrics.items() if math.isfinite(v)})
    score = metrics[run.config.select_metric]
    if score > run.best.score:  # strictly better: ties keep the earlier step; NaN never wins
        run.best = Best(step, score, metrics)
        run.best_params = run.copy_params(run.state.params)


def _learning_rate_exhausted(run: Finetune, step: int) -> bool:
    """The official EarlyStoppingLR: at an epoch boundary, stop once the rate is <= stop_learning_rate."""
    if step % run.steps_per_epoch:
        return False
    rate = float(jax.device_get(learning_rate(run.state.opt_state, run.config.optimizer.learning_rate)))
    return rate <= run.config.optimizer.stop_learning_rate


class _Throughput:
    """Clips per second and data wait over the steps since the last report, not counting the compiling step."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

    def report(self) -> dict[str, float]:
        if not self.steps:
            return {}
        elapsed = time.perf_counter() - self.start
        values = {"clips_per_s": self.steps * self.batch_size / elapsed, "step_time_s": elapsed / self.steps,
                  "data_wait_s": self.data_wait / self.steps}
        self.reset()
        return values


def run_loop(run: Finetune) -> str:
    """Trains from the current step; returns why it stopped: total_steps, learning_rate or preempted."""
    config = run.config
    start = int(jax.device_get(run.state.step))
    if start > 0 and _learning_rate_exhausted(run, start):  # resuming a run that had stopped early
        return "learning_rate"
    if start >= run.total_steps:
        return "total_steps"
    reporter, preemption = reporting.RunReporter(run.workdir), PreemptionFlag()
    throughput = _Throughput(config.batch_size)
    progress = tqdm(total=run.total_steps, initial=start, desc="finetune", unit="step",
                    disable=jax.process_index() != 0)
    outcome = "total_steps"
    try:
        for step in range(start, run.total_steps):
            fetch_start = time.perf_counter()
            batch = sharding.global_batch(next(run.loader), run.mesh)
            throughput.data_wait += time.perf_counter() - fetch_start
            run.state, metrics = run.train_step(run.state, batch)
            done = step + 1
            progress.update(1)
            if step == start:
                jax.block_until_ready(metrics)
                throughput.reset()
            else:
                throughput.steps += 1
            if _learning_rate_exhausted(run, done):
                outcome = "learning_rate"
            if preemption.raised:
                outcome = "preempted"
            is_last = done == run.total_steps or outcome != "total_steps"
            if done % config.log_every == 0 or is_last:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_finite(values, done)
                reporter.scalars(done, {**values, **throughput.report()})
                progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2g}")
            # A preempted run validates only on schedule, so that its resumed run selects as an uninterrupted one.
            if done % run.eval_every == 0 or (is_last and outcome != "preempted"):
                _validate(run, done, reporter)
            if done % config.checkpoint_every == 0 or is_last:
                check_finite({k: float(v) for k, v in jax.device_get(metrics).items()}, done)
                checkpointing.save_state(run.manager, run.state, run.best_params, run.best, run.loader, run.metadata)
            if is_last:
                break
    finally:
        preemption.restore()
        progress.close()
        run.manager.wait_until_finished()
        reporter.close()
    return outcome


def write_results(run: Finetune, outcome: str) -> dict:
    """Tests the selected model (best validation, or the last one if validation never scored) and writes
    `<workdir>/results.json`: test metrics at the top level (`acc`, `auc`, ...) as the linear probe's."""
    final_step = int(jax.device_get(run.state.step))
    selected = run.best if run.best.step >= 0 else Best(final_step, math.nan, {})
    params = run.best_params if run.best.step >= 0 else run.state.params
    if run.best.step < 0:
        logging.warning("validation %s was never defined; testing the last model", run.config.select_metric)
    test = evaluate(run, params, "test")
    exported = checkpointing.export_selected(run.workdir, params, selected.step, run.metadata)
    results = {
        **checkpointing.finite_or_none(test),
        "task": run.dataset.task,
        "num_outputs": run.dataset.num_outputs,
        "label_names": run.dataset.label_names,
        "num_examples": {name: len(split) for name, split in run.dataset.splits.items()},
        "selected_step": selected.step,
        "val": checkpointing.finite_or_none(selected.val_metrics),
        "steps_run": final_step,
        "steps_per_epoch": run.steps_per_epoch,
        "stopped_by": outcome,
        "selected_checkpoint": str(exported),
        "init_from": run.config.init_from,
        "config": run.config.to_dict(),
    }
    if jax.process_index() == 0:
        (run.workdir / RESULTS_NAME).write_text(json.dumps(results, indent=2, allow_nan=False))
    announce(f"test metrics of the model at step {selected.step}: {checkpointing.finite_or_none(test)}")
    return results


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict | None:
    """Fine-tunes (resuming from `workdir` when it holds a checkpoint) and tests; returns results.json's
    content, or None when SIGTERM stopped the run (a checkpoint was saved; rerun to continue)."""
    run = setup(config, workdir)
    try:
        # jit traces at the first call: the model's activation-sharding hints need the mesh and rules then.
        with sharding.activate(run.mesh, config.logical_axis_rules):
            outcome = run_loop(run)
            return None if outcome == "preempted" else write_results(run, outcome)
    finally:
        run.manager.close()
        run.loader.close()
