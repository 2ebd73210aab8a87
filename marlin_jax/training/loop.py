"""The one training loop, for pretraining and fine-tuning alike.

A trainer (pretraining/trainer.py, downstream/classifier_trainer.py) hands the loop a `Trainer`: a sharded state, a
step, a loader, evaluators and a few cadences. The loop owns what every run needs and nothing model-specific:
automatic resume from the newest intact checkpoint (parameters, optimiser, step, data-iterator position and
the best score so far come back, and every key the step draws is `fold_in(base_key, step)`, so a resumed run
reproduces the uninterrupted one), the progress bar, throughput, the NaN stop, preemption agreed across hosts,
the checkpoint cadence and the final save, evaluators at their own cadence, `<workdir>/best/`, and the
profiler window. Every host runs the same loop on its share of each global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from etils import epath
from tqdm import tqdm

from marlin_jax import storage
from marlin_jax.training import checkpoints, reporting, sharding
from marlin_jax.training.evaluator_protocol import Evaluator, is_due
from marlin_jax.training.run_control import PreemptionWatch, ProfileWindow, announce, check_finite


PROGRESS_KEYS = ("rec_loss", "d_loss", "loss", "lr")


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How often a run logs and checkpoints, how many checkpoints it keeps, and which steps it profiles."""

    log_every: int
    checkpoint_every: int
    keep_checkpoints: int = 3
    profile_steps: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config) -> Cadence:
        for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
            if config[field] < 1:
                raise ValueError(f"config.{field} must be >= 1, got {config[field]}")
        return cls(config.log_every, config.checkpoint_every, config.keep_checkpoints,
                   parse_profile_steps(config.get("profile_steps", "")))


def parse_profile_steps(value) -> tuple[int, ...]:
    """`"START,COUNT"` (or a tuple) -> (start, count); empty -> ()."""
    if not value:
        return ()
    parts = value.split(",") if isinstance(value, str) else value
    try:
        steps = tuple(int(part) for part in parts)
    except ValueError:
        steps = ()
    if len(steps) != 2 or steps[0] < 0 or steps[1] < 1:
        raise ValueError(f"config.profile_steps must be START,COUNT (START >= 0, COUNT >= 1), got {value!r}")
    return steps


@dataclasses.dataclass
class Trainer:
    """What a trainer hands the loop. `state` is sharded and has a `.step`; `step_fn(state, global_batch, step)`
    returns (state, metrics) with replicated scalar metrics. `split_state` gives the (params, opt_state) trees
    saved as the checkpoint's "params" and "opt_state" items, and `join_state(state, params, opt_state)` puts
    restored ones back. `metadata` is saved with every checkpoint; a workdir whose `resume_keys` differ refuses to
    resume. `best` names the evaluator value that selects `<workdir>/best/`; `stop_early(state, step)` may end
    the run before `total_steps` (fine-tuning's learning-rate floor); `log_extras()` adds values to each logged row
    and may raise to stop the run (pretraining's count of corrupt records). It runs on every host at the same
    steps, so it may use collectives."""

    name: str
    workdir: epath.Path
    mesh: jax.sharding.Mesh
    logical_axis_rules: Sequence
    state: Any
    step_fn: Callable[[Any, dict, int], tuple[Any, dict]]
    loader: Any
    total_steps: int
    global_batch_size: int
    cadence: Cadence
    split_state: Callable[[Any], tuple[Any, Any]]
    join_state: Callable[[Any, Any, Any], Any]
    metadata: dict
    resume_keys: tuple[str, ...]
    evaluators: Sequence[Evaluator] = ()
    best: checkpoints.BestRecord | None = None
    stop_early: Callable[[Any, int], bool] | None = None
    check_first_batch: Callable[[dict], None] | None = None
    log_extras: Callable[[], dict[str, float]] | None = None


@dataclasses.dataclass(frozen=True)
class LoopResult:
    step: int
    stopped_by: str  # "total_steps", "early_stop" or "preempted"
    metrics: dict[str, float]
    best: checkpoints.BestRecord | None


def train(trainer: Trainer) -> LoopResult:
    """Resumes from the newest intact checkpoint in `<workdir>/checkpoints` if there is one, then trains."""
    manager = checkpoints.make_manager(trainer.workdir / checkpoints.CHECKPOINT_SUBDIR,
                                       max_to_keep=trainer.cadence.keep_checkpoints)
    try:
        # jit traces at the first call: the mesh and logical rules must be active there, or the model's
        # activation-sharding constraints are silently dropped.
        with sharding.activate(trainer.mesh, trainer.logical_axis_rules):
            best = _resume(trainer, manager)
            result = _run(trainer, manager, best)
    except BaseException:
        # A save that failed in the background (a full disk) can fail again while the manager shuts down, with
        # orbax's bare error; the error already on its way out is the one that says what happened.
        with contextlib.suppress(Exception):
            manager.wait_until_finished()
        with contextlib.suppress(Exception):
            manager.close()
        raise
    manager.wait_until_finished()
    manager.close()
    return result


def _resume(trainer: Trainer, manager) -> checkpoints.BestRecord | None:
    params_like, opt_state_like = trainer.split_state(trainer.state)
    restored = checkpoints.restore_latest_intact(
        manager, params_like=params_like, opt_state_like=opt_state_like, loader=trainer.loader,
        check=lambda saved: checkpoints.check_same(saved, trainer.metadata, trainer.resume_keys, trainer.name))
    if restored is None:
        return trainer.best
    trainer.state = trainer.join_state(trainer.state, restored.params, restored.opt_state)
    announce(f"resumed from step {restored.step} in {trainer.workdir}")
    if trainer.best is not None and restored.metadata.get("best"):
        return checkpoints.BestRecord.from_dict(restored.metadata["best"])
    return trainer.best


class _Throughput:
    """Clips per second and data wait over the steps since the last report, not counting the compiling step."""

    def __init__(self, global_batch_size: int):
        self.global_batch_size = global_batch_size
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.data_wait, self.excluded = time.perf_counter(), 0, 0.0, 0.0

    def report(self) -> dict[str, float]:
        if not self.steps:
            return {}
        elapsed = time.perf_counter() - self.start - self.excluded
        values = {"clips_per_s": self.steps * self.global_batch_size / elapsed, "step_time_s": elapsed / self.steps,
                  "data_wait_s": self.data_wait / self.steps}
        self.reset()
        return values


def _host_values(metrics: dict) -> dict[str, float]:
    # The step's metrics are replicated scalars: every host can fetch them.
    return {name: float(value) for name, value in jax.device_get(metrics).items()}


def _run(trainer: Trainer, manager, best: checkpoints.BestRecord | None) -> LoopResult:
    cadence = trainer.cadence
    start = int(jax.device_get(trainer.state.step))
    last_values: dict[str, float] = {}
    if start > 0 and trainer.stop_early is not None and trainer.stop_early(trainer.state, start):
        return LoopResult(start, "early_stop", last_values, best)  # resuming a run that had stopped early
    if start >= trainer.total_steps:
        return LoopResult(start, "total_steps", last_values, best)
    reporter = reporting.RunReporter(trainer.workdir)
    preemption = PreemptionWatch()
    profile = ProfileWindow(cadence.profile_steps, trainer.workdir / reporting.TENSORBOARD_SUBDIR)
    throughput = _Throughput(trainer.global_batch_size)
    progress = tqdm(total=trainer.total_steps, initial=start, desc=trainer.name, unit="step",
                    disable=jax.process_index() != 0)
    closers = (profile.stop, preemption.close, progress.close, reporter.close)
    stopped_by, done = "total_steps", start
    try:
        for step in range(start, trainer.total_steps):
            fetch_start = time.perf_counter()
            local = next(trainer.loader)
            throughput.data_wait += time.perf_counter() - fetch_start
            if step == start and trainer.check_first_batch is not None:
                trainer.check_first_batch(local)
            profile.before_step(step)
            trainer.state, metrics = trainer.step_fn(trainer.state, sharding.global_batch(local, trainer.mesh), step)
            profile.after_step(step, metrics)
            done = step + 1
            progress.update(1)
            if step == start:
                jax.block_until_ready(metrics)  # the first step compiles; throughput counts the steps after it
                throughput.reset()
            else:
                throughput.steps += 1
            if preemption.reached(done):
                stopped_by = "preempted"
            elif trainer.stop_early is not None and trainer.stop_early(trainer.state, done):
                stopped_by = "early_stop"
            is_last = done == trainer.total_steps or stopped_by != "total_steps"
            values: dict[str, float] = {}
            if done % cadence.log_every == 0 or is_last:
                values = _host_values(metrics)
                check_finite(values, done)
                values.update(throughput.report())
                if trainer.log_extras is not None:
                    values.update(trainer.log_extras())
                last_values = values
                progress.set_postfix({k: f"{values[k]:.4g}" for k in PROGRESS_KEYS if k in values})
            ended = is_last and stopped_by != "preempted"
            evaluation_start = time.perf_counter()
            for evaluator in trainer.evaluators:
                if is_due(evaluator, done, ended):
                    evaluation = evaluator.evaluate(trainer.state, done)
                    values.update(evaluation.scalars)
                    for image_name, grid in evaluation.images.items():
                        reporter.image(done, image_name, grid)
            throughput.excluded += time.perf_counter() - evaluation_start  # clips/s counts training alone
            best = _keep_best(trainer, best, values, done)
            reporter.record(done, values)
            if done % cadence.checkpoint_every == 0 or is_last:
                if not values:
                    check_finite(_host_values(metrics), done)
                _save(trainer, manager, done, best)
            if is_last:
                break
    except BaseException as failure:
        # A full disk also fails the event file's last flush: closing must not replace the error on its way out.
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        _raise_a_failed_background_save(manager, trainer, failure)
        raise
    for close in closers:
        close()
    checkpoints.wait_for_saves(manager, trainer.split_state(trainer.state))  # a full disk surfaces here
    return LoopResult(done, stopped_by, last_values, best)


def _raise_a_failed_background_save(manager, trainer: Trainer, failure: BaseException) -> None:
    """Waits for the checkpoint saves still running after the run failed. When the disk filled up, a save that
    failed in the background did so first (a best/ save, say, then found the disk full): its error, which names
    the checkpoints a rerun resumes from, is raised instead. Any other failure stays the one reported."""
    try:
        checkpoints.wait_for_saves(manager, trainer.split_state(trainer.state))
    except checkpoints.CheckpointDiskFullError as background_failure:
        if isinstance(failure, storage.DiskFullError):
            raise background_failure from failure
    except Exception:  # any other error while waiting: the failure on its way out is the one to report
        pass


def _metadata(trainer: Trainer, step: int, best: checkpoints.BestRecord | None) -> dict:
    return {**trainer.metadata, "step": step, **({"best": best.to_dict()} if best is not None else {})}


def _save(trainer: Trainer, manager, step: int, best) -> None:
    if step in manager.all_steps():  # rerunning a finished run lands on a saved step
        return
    params, opt_state = trainer.split_state(trainer.state)
    checkpoints.save(manager, step, params=params, opt_state=opt_state, loader=trainer.loader,
                     metadata=_metadata(trainer, step, best))


def _keep_best(trainer: Trainer, best, values: dict, step: int):
    """Saves `<workdir>/best/` when the chosen evaluator value improves."""
    if best is None or best.metric not in values or not best.improved_by(values[best.metric]):
        return best
    best = dataclasses.replace(best, step=step, value=values[best.metric])
    checkpoints.save_best(trainer.workdir, step, trainer.split_state(trainer.state)[0],
                          {**_metadata(trainer, step, best), "evaluation": values})
    return best
