"""The MARLIN model in a workdir of this project (or its best/ or checkpoints/ folder), read back as host arrays
with its architecture, for export, inference and init_from: `read_saved_model(path, step)`.

The checkpoints themselves (saving, resuming, best/) are the training harness's (marlin_jax/training/checkpoints.py);
this module knows what a MARLIN checkpoint holds (generator, discriminator, architecture metadata).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.training import checkpoints


@dataclasses.dataclass(frozen=True)
class SavedModel:
    architecture: MarlinArchitecture
    generator: dict[str, Any]
    discriminator: dict[str, Any] | None
    step: int
    model_name: str


def _read_handlers() -> dict:
    return {"params": ocp.PyTreeCheckpointHandler(), "opt_state": ocp.PyTreeCheckpointHandler(),
            "data_iterator": grain.checkpoint.CheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}


def read_saved_model(path, step: int | None = None) -> SavedModel:
    """Reads the model of a workdir's (latest intact, or `step`) checkpoint as host numpy arrays, whatever
    devices wrote it: a checkpoint from a TPU pod or a 2-process run reads back on one CPU."""
    directory = checkpoints.checkpoint_dir(path)
    if not checkpoints.is_checkpoint_dir(directory):
        raise ValueError(f"{path} holds no orbax checkpoint (looked for numbered step folders in {directory})")
    manager = ocp.CheckpointManager(directory, item_handlers=_read_handlers(),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None and step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {directory}; available steps: {sorted(steps)}")
        for candidate in [step] if step is not None else steps:
            try:
                return _read_model(manager, candidate)
            except Exception as error:  # noqa: BLE001 - a damaged step: fall back to an older one
                if step is not None:
                    raise ValueError(f"checkpoint step {step} in {directory} is damaged: {error}") from error
                logging.warning("checkpoint step %d in %s is damaged (%s: %s); reading the next older step",
                                candidate, directory, type(error).__name__, error)
        raise ValueError(f"no intact checkpoint in {directory} (steps tried: {steps})")
    finally:
        manager.close()


def _read_model(manager: ocp.CheckpointManager, step: int) -> SavedModel:
    params_tree = manager.item_metadata(step)["params"].tree
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.PyTreeRestore(restore_args=as_numpy), metadata=ocp.args.JsonRestore()))
    params, metadata = restored.params, restored.metadata
    return SavedModel(MarlinArchitecture.from_dict(metadata["architecture"]), params["generator"],
                      params.get("discriminator"), step, metadata.get("model_name", "marlin"))
