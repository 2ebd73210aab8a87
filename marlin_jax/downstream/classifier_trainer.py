"""`finetune_and_evaluate(config, workdir)`: fine-tune, validate, select, test, write `results.json`.

Fine-tuning is a model, a step, a loader and one evaluator on the training harness (marlin_jax/training/loop.py),
so it resumes, shards, checkpoints and stops on SIGTERM as pretraining does. The validation evaluator runs every
`eval_every` steps (default: each epoch) and `<workdir>/best/` keeps the model with the best
`val/<select_metric>`, as the official ModelCheckpoint(monitor="val_auc") does; training ends at `total_steps`
or, as the official EarlyStoppingLR, at the first epoch boundary where the plateau-reduced learning rate is at or
below `optimizer.stop_learning_rate`. The selected model is then tested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.downstream.classifier import (
    FinetuneState,
    VideoClassifier,
    init_state,
    learning_rate,
    make_predict,
    make_train_step,
)
from marlin_jax.downstream.clip_loader import Parallelism, eval_batches, make_train_loader
from marlin_jax.downstream.metrics import SELECTABLE, selection_metrics
from marlin_jax.downstream.probe import json_ready, make_plateau_adam
from marlin_jax.downstream.tasks import TASKS, LabelledTask, load_task
from marlin_jax.interop.weights import load_weights
from marlin_jax.training import checkpoints, loop, sharding
from marlin_jax.training.evaluator_protocol import Evaluation
from marlin_jax.training.run_control import announce, print_banner
from marlin_jax.video import ClipSettings

RESULTS_NAME = "results.json"
RESUME_KEYS = ("architecture", "task", "num_outputs", "select_metric")


def validate_finetune_config(config: ml_collections.ConfigDict) -> None:
    """Rejects field values fine-tuning cannot run with, naming the field."""
    data = config.data
    checks = [
        (config.task in TASKS, f"config.task must be one of {TASKS}, got {config.task!r}"),
        (data.format in ("csv", "celebvhq"), f"config.data.format must be 'csv' or 'celebvhq', got {data.format!r}"),
        (data.format != "celebvhq" or config.task == "multilabel", "CelebV-HQ tasks are multilabel"),
        (data.format != "csv" or bool(data.csv), "config.data.csv is empty"),
        (data.format != "celebvhq" or bool(data.root), "config.data.root is empty"),
        (config.select_metric in SELECTABLE.get(config.task, ()),
         f"config.select_metric must be one of {SELECTABLE.get(config.task)}, got {config.select_metric!r}"),
        (config.compute_dtype in sharding.COMPUTE_DTYPES,
         f"config.compute_dtype must be one of {tuple(sharding.COMPUTE_DTYPES)}"),
        (data.temporal_sample_rate >= 1, "config.data.temporal_sample_rate must be >= 1"),
    ]
    for field in ("batch_size", "eval_batch_size", "num_epochs"):
        checks.append((config[field] >= 1, f"config.{field} must be >= 1, got {config[field]}"))
    for passed, message in checks:
        if not passed:
            raise ValueError(message)
    loop.Cadence.from_config(config)


def schedule_lengths(config, num_train: int) -> tuple[int, int, int]:
    """(steps_per_epoch, total_steps, eval_every); an epoch drops its last partial batch, as the official."""
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has {num_train} videos, fewer than one batch ({config.batch_size})")
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    return steps_per_epoch, total_steps, config.eval_every or steps_per_epoch


@dataclasses.dataclass
class Predictor:
    """Logits of one evaluation clip per video of a split (see clip_loader.eval_batches), sharded as training."""

    predict: object
    mesh: jax.sharding.Mesh
    batch_size: int
    seed: int
    clip_settings: ClipSettings
    parallelism: Parallelism

    def logits(self, params, split) -> np.ndarray:
        logits = []
        batches = eval_batches(split, self.batch_size, self.seed, self.clip_settings, self.parallelism)
        with contextlib.closing(batches):
            for local in batches:
                video = sharding.global_batch({"video": local}, self.mesh)["video"]
                logits.append(np.asarray(jax.device_get(self.predict(params, video)), np.float64))
        return np.concatenate(logits)[:len(split)]


class ClassificationEvaluator:
    """Metrics of one split (`val/acc`, `val/auc`, ..., `val/auc_batch_mean`) with the current parameters."""

    def __init__(self, name: str, every: int, task: LabelledTask, split: str, predictor: Predictor):
        self.name, self.every, self.task, self.split, self.predictor = name, every, task, split, predictor

    def evaluate(self, state: FinetuneState, step: int) -> Evaluation:
        del step
        split = self.task.splits[self.split]
        metrics = selection_metrics(self.task.task, split.labels, self.predictor.logits(state.params, split))
        return Evaluation({f"{self.name}/{k}": v for k, v in metrics.items()})


def _as_saved(params: dict) -> dict:
    # The pretraining layout, so Marlin.from_file(arch, workdir) and export read the fine-tuned encoder.
    return {"generator": {"encoder": params["encoder"]}, "head": params["head"]}


def _from_saved(saved: dict) -> dict:
    return {"encoder": saved["generator"]["encoder"], "head": saved["head"]}


def _split_state(state: FinetuneState):
    return _as_saved(state.params), {"opt_state": state.opt_state, "step": state.step}


def _join_state(state: FinetuneState, params, opt_state) -> FinetuneState:
    return FinetuneState(step=opt_state["step"], params=_from_saved(params), opt_state=opt_state["opt_state"])


def _init_encoder(state: FinetuneState, shardings: FinetuneState, config, arch: MarlinArchitecture) -> FinetuneState:
    """Official MARLIN / VideoMAE weights, or a pretraining workdir, as the starting encoder, placed straight into
    the sharded layout on every host."""
    encoder = load_weights(arch, config.init_from,
                           trust_pickled_checkpoint=config.trust_pickled_checkpoint).generator["encoder"]
    placed = sharding.place_host_tree(encoder, shardings.params["encoder"])
    announce(f"initialised the encoder from {config.init_from}")
    return state.replace(params={**state.params, "encoder": placed})


@dataclasses.dataclass(frozen=True)
class FinetuningProgram:
    """What fine-tuning puts on its mesh: the state (its init and layout), the jitted train step
    `train_step(state, batch) -> (state, metrics)` and the evaluation forward `predict(params, video) -> logits`.
    The fine-tuning run executes them; `python -m marlin_jax.aot` compiles the same objects for a TPU slice."""

    init_state: Callable[[jax.Array], FinetuneState]
    state_shardings: FinetuneState
    train_step: Any
    predict: Any
    batch_sharding: jax.sharding.NamedSharding


def finetuning_program(config: ml_collections.ConfigDict, arch: MarlinArchitecture, task: str, num_outputs: int,
                       mesh: jax.sharding.Mesh, steps_per_epoch: int) -> FinetuningProgram:
    """The step, the predictor and the state layout for `mesh`; builds and runs nothing on a device."""
    model = VideoClassifier(arch, num_outputs, config.remat, sharding.compute_dtype(config.compute_dtype))
    tx = make_plateau_adam(config.optimizer, steps_per_epoch)
    init = functools.partial(init_state, model=model, tx=tx)
    state_shardings = sharding.state_shardings(init, mesh, config.logical_axis_rules)
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(make_train_step(model, tx, task, config.optimizer.learning_rate),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    predict = jax.jit(make_predict(model), in_shardings=(state_shardings.params, batch_sharding),
                      out_shardings=sharding.replicated(mesh))
    return FinetuningProgram(init, state_shardings, train_step, predict, batch_sharding)


@dataclasses.dataclass
class Finetuning:
    """The harness's trainer plus what testing the selected model needs."""

    trainer: loop.Trainer
    task: LabelledTask
    predictor: Predictor
    steps_per_epoch: int
    config: ml_collections.ConfigDict


def build_finetuning(config: ml_collections.ConfigDict, workdir) -> Finetuning:
    validate_finetune_config(config)
    workdir = epath.Path(workdir)
    workdir = workdir if "://" in str(workdir) else workdir.absolute()
    arch = MarlinArchitecture.from_dict(config.model.to_dict())
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, jax.devices())
    sharding.check_model_fits(arch, mesh)
    for field in ("batch_size", "eval_batch_size"):
        sharding.check_batch_fits(config[field], mesh, field)
    task = load_task(config.data, config.task, files="videos")
    steps_per_epoch, total_steps, eval_every = schedule_lengths(config, len(task.splits["train"]))
    workdir.mkdir(parents=True, exist_ok=True)
    print_banner(mesh=mesh, per_host_batch=config.batch_size // jax.process_count(), steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, compute_dtype=config.compute_dtype)

    program = finetuning_program(config, arch, task.task, task.num_outputs, mesh, steps_per_epoch)
    state = sharding.init_sharded(program.init_state, jax.random.key(config.seed), program.state_shardings, mesh,
                                  config.logical_axis_rules)
    resuming = checkpoints.is_checkpoint_dir(workdir / checkpoints.CHECKPOINT_SUBDIR)
    if config.init_from and not resuming:  # a resumed run restores its own weights
        state = _init_encoder(state, program.state_shardings, config, arch)
    elif not config.init_from:
        logging.warning("config.init_from is empty: fine-tuning an encoder with random weights")
    clip_settings = ClipSettings(arch.num_frames, config.data.temporal_sample_rate, arch.img_size)
    parallelism = Parallelism(config.data.read_threads, config.data.prefetch_batches, config.data.worker_count)
    loader = make_train_loader(task.splits["train"], config.batch_size, config.seed, clip_settings, parallelism)
    predictor = Predictor(program.predict, mesh, config.eval_batch_size, config.seed, clip_settings, parallelism)
    stop_learning_rate = config.optimizer.stop_learning_rate

    def learning_rate_exhausted(current: FinetuneState, step: int) -> bool:
        """The official EarlyStoppingLR: at an epoch boundary, stop once the rate is <= stop_learning_rate."""
        if step % steps_per_epoch:
            return False
        rate = float(jax.device_get(learning_rate(current.opt_state, config.optimizer.learning_rate)))
        return rate <= stop_learning_rate

    metadata = {"architecture": arch.to_dict(), "model_name": config.model_name, "task": task.task,
                "num_outputs": task.num_outputs, "select_metric": config.select_metric}
    trainer = loop.Trainer(
        name="finetune", workdir=workdir, mesh=mesh, logical_axis_rules=config.logical_axis_rules, state=state,
        step_fn=lambda s, batch, step: program.train_step(s, batch), loader=loader, total_steps=total_steps,
        global_batch_size=config.batch_size, cadence=loop.Cadence.from_config(config),
        split_state=_split_state, join_state=_join_state, metadata=metadata, resume_keys=RESUME_KEYS,
        evaluators=[ClassificationEvaluator("val", eval_every, task, "val", predictor)],
        best=checkpoints.BestRecord(f"val/{config.select_metric}", "max"), stop_early=learning_rate_exhausted)
    return Finetuning(trainer, task, predictor, steps_per_epoch, config)


def write_results(run: Finetuning, result: loop.LoopResult) -> dict:
    """Tests the selected model (best validation, or the last one if validation never scored) and writes
    `<workdir>/results.json`: test metrics at the top level (`acc`, `auc`, ...) as the linear probe's."""
    trainer, best = run.trainer, result.best
    params_like, _ = _split_state(trainer.state)
    if best is not None and best.step >= 0:
        params = _from_saved(checkpoints.restore_best_params(trainer.workdir, params_like))
        selected_step, selected_values = best.step, checkpoints.read_best_metadata(trainer.workdir)["evaluation"]
    else:
        logging.warning("validation %s was never defined; testing the last model", run.config.select_metric)
        params, selected_step, selected_values = trainer.state.params, result.step, {}
        checkpoints.save_best(trainer.workdir, result.step, params_like, {**trainer.metadata, "step": result.step})
    split = run.task.splits["test"]
    test = selection_metrics(run.task.task, split.labels, run.predictor.logits(params, split))
    results = json_ready({
        **test, "task": run.task.task, "num_outputs": run.task.num_outputs, "label_names": run.task.label_names,
        "num_examples": {name: len(s) for name, s in run.task.splits.items()}, "selected_step": selected_step,
        "val": {k.removeprefix("val/"): v for k, v in selected_values.items() if k.startswith("val/")},
        "steps_run": result.step, "steps_per_epoch": run.steps_per_epoch,
        "stopped_by": "learning_rate" if result.stopped_by == "early_stop" else result.stopped_by,
        "selected_checkpoint": str(trainer.workdir / checkpoints.BEST_SUBDIR), "init_from": run.config.init_from,
        "config": run.config.to_dict()})
    if jax.process_index() == 0:
        (trainer.workdir / RESULTS_NAME).write_text(json.dumps(results, indent=2, allow_nan=False))
    announce(f"test metrics of the model at step {selected_step}: {json_ready(test)}")
    return results


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict | None:
    """Fine-tunes (resuming from `workdir` when it holds a checkpoint) and tests; returns results.json's
    content, or None when SIGTERM stopped the run (a checkpoint was saved; rerun to continue)."""
    run = build_finetuning(config, workdir)
    try:
        result = loop.train(run.trainer)
        if result.stopped_by == "preempted":
            return None
        with sharding.activate(run.trainer.mesh, config.logical_axis_rules):
            return write_results(run, result)
    finally:
        run.trainer.loader.close()
