"""The one orbax layout for everything durable in a workdir, for pretraining and fine-tuning alike.

`<workdir>/checkpoints/<step>/` holds these items:
  - "params":        the model: {"generator": MarlinMAE params, "discriminator": ...} when pretraining,
                     {"generator": {"encoder": ...}, "head": ...} when fine-tuning;
  - "opt_state":     the optimiser states and the step (training only);
  - "data_iterator": the input pipeline's state, so a resumed run sees the same batches (training only);
  - "metadata":      JSON: {"architecture": {...}, "model_name": str, "step": int, "best": {...}, ...}.
`<workdir>/best/<step>/` holds "params" and "metadata" of the model with the best validation score so far.
Inference and export read "params" and "metadata" alone, so they need no optimiser template
(marlin_jax/interop/saved_models.py).

A step whose restore fails (a file removed or truncated) is moved aside to `<workdir>/damaged_checkpoints/`
with a warning naming it, and the newest intact step is used instead: orbax's retention counts step folders, so a
damaged newest step left in place could push the last good one out. When no step restores, nothing is moved and
the resume stops with an error: a restore that fails for every step points at the config or the machine rather
than at the files. A step folder a killed save left half-written (orbax writes `<step>.orbax-checkpoint-tmp` and
renames it when complete; on object stores a step without `commit_success.txt`) was never a checkpoint: it is
removed, with a warning, so that it frees its space.

A full disk (or quota) while saving raises `CheckpointDiskFullError`, naming the folder, the free space and the
size of a checkpoint; the finished checkpoints are untouched (orbax removes old steps only after a new one is
complete). Saves are asynchronous, so the error surfaces at the next save or when the run waits for the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import shutil
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from marlin_jax import storage

CHECKPOINT_SUBDIR = "checkpoints"
BEST_SUBDIR = "best"
DAMAGED_SUBDIR = "damaged_checkpoints"
ITEM_NAMES = ("params", "opt_state", "data_iterator", "metadata")


def checkpoint_dir(path) -> epath.Path:
    """A workdir or its checkpoints/ folder (or best/) -> the folder holding numbered steps."""
    path = epath.Path(path)
    if "://" not in str(path):
        path = path.absolute()
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path


def make_manager(directory, *, max_to_keep: int | None = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(epath.Path(directory), options=options, item_names=ITEM_NAMES)


def abstract_tree(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: a restore target that lands straight on the mesh."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save(manager: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any, loader, metadata: dict) -> None:
    """Starts an asynchronous save; orbax first waits for the previous one, so its failure surfaces here."""
    with _explain_disk_full(manager.directory, _nbytes((params, opt_state))):
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data_iterator=grain.checkpoint.CheckpointSave(loader), metadata=ocp.args.JsonSave(metadata)), force=True)


def wait_for_saves(manager: ocp.CheckpointManager, state_like: Any) -> None:
    """Blocks until the last asynchronous save is complete; `state_like` (what is saved) sizes the error."""
    with _explain_disk_full(manager.directory, _nbytes(state_like)):
        manager.wait_until_finished()


class CheckpointDiskFullError(storage.DiskFullError):
    """No space or quota left where checkpoints are written."""


def _nbytes(tree: Any) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(tree))


# How tensorstore (orbax raises its errors as ValueError) reports ENOSPC and EDQUOT.
_DISK_FULL_TEXTS = ("os_error_code='28'", "os_error_code='122'", "No space left on device", "Disk quota exceeded")


def _is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain of causes, as an OSError or in tensorstore's error text."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def _explain_disk_full(directory, checkpoint_bytes: int):
    try:
        yield
    except Exception as error:
        if not _is_disk_full(error):
            raise
        directory = epath.Path(directory)
        free = ("" if storage.is_remote(directory)
                else f" ({storage.format_size(shutil.disk_usage(directory).free)} free there)")
        finished = sorted(ocp.path.step.checkpoint_steps(directory))
        kept = (f"The finished checkpoints there (step{'s' * (len(finished) > 1)} {', '.join(map(str, finished))}) "
                "are intact" if finished else "No checkpoint there was finished")
        raise CheckpointDiskFullError(errno.ENOSPC, (
            f"no space left to write a checkpoint in {directory}{free}: one takes about "
            f"{storage.format_size(checkpoint_bytes)}, and a new one is written before the oldest kept one is "
            "removed. "
            f"{kept}: free space (or keep fewer with --config.keep_checkpoints) and rerun the same command; it "
            f"resumes from the newest intact checkpoint")) from error


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    params: Any
    opt_state: Any
    metadata: dict


def read_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata


def restore_latest_intact(manager: ocp.CheckpointManager, *, params_like: Any, opt_state_like: Any, loader,
                          check: Callable[[dict], None]) -> Restored | None:
    """The newest step that restores completely (params, optimiser, data iterator, metadata), onto the shardings
    of `*_like`; `loader` is set in place. `check(metadata)` may raise to refuse the workdir (another model).
    None when there is no step; a ValueError when there are steps and none restores."""
    _remove_half_written(manager)
    failures: dict[int, Exception] = {}
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            metadata = read_metadata(manager, step)
        except Exception as error:  # noqa: BLE001 - any read failure means this step is unusable
            failures[step] = error
            continue
        check(metadata)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_tree(params_like)),
                opt_state=ocp.args.StandardRestore(abstract_tree(opt_state_like)),
                data_iterator=grain.checkpoint.CheckpointRestore(loader)))
        except Exception as error:  # noqa: BLE001
            failures[step] = error
            continue
        for damaged, error in failures.items():
            _set_aside(manager, damaged, step, error)
        return Restored(step, restored.params, restored.opt_state, metadata)
    if failures:
        listed = "; ".join(f"step {step}: {type(error).__name__}: {error}" for step, error in failures.items())
        raise ValueError(f"no checkpoint in {manager.directory} restores ({listed}). Nothing was moved or deleted. "
                         "If the files are damaged, move the folder away (or pass a new --workdir) to start afresh")
    return None


def _remove_half_written(manager: ocp.CheckpointManager) -> None:
    """Deletes the step folders that a killed or failed save left unfinished (process 0), naming each."""
    directory = epath.Path(manager.directory)
    unfinished = ocp.path.step.tmp_checkpoints(directory)
    for name in unfinished:
        logging.warning("checkpoint %s was left half-written by a save that did not finish; removing it",
                        directory / name)
        if jax.process_index() == 0:
            (directory / name).rmtree()
    _sync("remove_half_written")


def _set_aside(manager: ocp.CheckpointManager, step: int, resumed_step: int, error: Exception) -> None:
    """Moves a damaged step out of the manager's folder (process 0), so retention keeps the intact ones."""
    source = epath.Path(manager.directory) / str(step)
    target = epath.Path(manager.directory).parent / DAMAGED_SUBDIR / f"{step}_{int(time.time())}"
    logging.warning("checkpoint step %d in %s is damaged (%s: %s); moved it to %s and resumed from step %d",
                    step, manager.directory, type(error).__name__, error, target, resumed_step)
    if jax.process_index() == 0:
        storage.move(source, target)
    _sync(f"set_aside_{step}")
    manager.reload()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def check_same(saved: dict, expected: dict, keys: tuple[str, ...], what: str) -> None:
    """Refuses to resume from a checkpoint of another model or task, naming the first difference."""
    for key in keys:
        if saved.get(key) != expected.get(key):
            raise ValueError(f"the workdir holds a {what} checkpoint with {key}={saved.get(key)!r}; this config has "
                             f"{expected.get(key)!r}. Use a new --workdir.")


# --- the best model ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BestRecord:
    """The best validation score so far and its step; step -1: none yet."""

    metric: str
    mode: str  # "min" or "max"
    step: int = -1
    value: float = float("nan")

    def improved_by(self, value: float) -> bool:
        """Strictly better (ties keep the earlier step); NaN never wins."""
        if not np.isfinite(value):
            return False
        if self.step < 0:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def to_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "step": self.step,
                "value": self.value if np.isfinite(self.value) else None}

    @classmethod
    def from_dict(cls, values: dict) -> BestRecord:
        value = values.get("value")
        return cls(values["metric"], values["mode"], values["step"], float("nan") if value is None else value)


def save_best(workdir, step: int, params: Any, metadata: dict) -> epath.Path:
    """Writes `<workdir>/best/<step>/` (params and metadata) synchronously, replacing the previous best only
    once the new one is complete."""
    directory = epath.Path(workdir) / BEST_SUBDIR
    # cleanup_tmp_directories: a best save that failed (a full disk) leaves a half-written step; it goes here.
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=False, create=True, cleanup_tmp_directories=True),
        item_names=("params", "metadata"))
    if step not in manager.all_steps():
        with _explain_disk_full(directory, _nbytes(params)):
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                       metadata=ocp.args.JsonSave(metadata)), force=True)
    manager.close()
    return directory


def _best_manager(workdir) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(epath.Path(workdir) / BEST_SUBDIR, options=ocp.CheckpointManagerOptions(
        read_only=True), item_names=("params", "metadata"))


def read_best_metadata(workdir) -> dict:
    """The metadata saved with `<workdir>/best/`: the step, the record and every evaluator value of that step."""
    manager = _best_manager(workdir)
    try:
        return read_metadata(manager, manager.latest_step())
    finally:
        manager.close()


def restore_best_params(workdir, params_like: Any) -> Any:
    """The params saved in `<workdir>/best/`, placed with `params_like`'s shardings."""
    manager = _best_manager(workdir)
    try:
        return manager.restore(manager.latest_step(), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_tree(params_like)))).params
    finally:
        manager.close()


def is_checkpoint_dir(path) -> bool:
    directory = checkpoint_dir(path)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
