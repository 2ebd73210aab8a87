"""The one orbax CheckpointManager layout for everything durable in a training workdir.

`<workdir>/checkpoints/<step>/` holds these items:
  - "params":        {"generator": MarlinMAE params, "discriminator": PatchDiscriminator params}
  - "opt_state":     both optimiser states (training only)
  - "data_iterator": the input pipeline's state, so a resumed run sees the same batches (training only)
  - "metadata":      JSON: {"architecture": {...}, "model_name": str, "step": int}

Inference and export read "params" and "metadata" alone, so they need no optimiser template.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from marlin_jax.architectures import MarlinArchitecture

CHECKPOINT_SUBDIR = "checkpoints"
ITEM_NAMES = ("params", "opt_state", "data_iterator", "metadata")


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A workdir or its checkpoints/ folder -> the checkpoints/ folder."""
    path = pathlib.Path(path).absolute()
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path


def make_manager(directory: str | pathlib.Path, *, max_to_keep: int | None = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_names=ITEM_NAMES)


def _read_handlers() -> dict:
    import grain
    return {"params": ocp.PyTreeCheckpointHandler(), "opt_state": ocp.PyTreeCheckpointHandler(),
            "data_iterator": grain.checkpoint.CheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}


def is_checkpoint_dir(path: str | pathlib.Path) -> bool:
    directory = checkpoint_dir(path)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


@dataclasses.dataclass(frozen=True)
class SavedModel:
    architecture: MarlinArchitecture
    generator: dict[str, Any]
    discriminator: dict[str, Any] | None
    step: int
    model_name: str


def restore_params(path: str | pathlib.Path, step: int | None = None) -> SavedModel:
    """Reads the model of a workdir's (latest, or `step`) checkpoint, as host numpy arrays."""
    directory = checkpoint_dir(path)
    if not is_checkpoint_dir(directory):
        raise ValueError(f"{path} holds no orbax checkpoint (looked for numbered step folders in {directory})")
    manager = ocp.CheckpointManager(directory, item_handlers=_read_handlers(),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
    elif step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {directory}; available steps: {sorted(steps)}")
    # Host numpy arrays, whatever devices wrote them: a checkpoint from a TPU pod or a 2-process run reads
    # back on one CPU.
    params_tree = manager.item_metadata(step)["params"].tree
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.PyTreeRestore(restore_args=as_numpy), metadata=ocp.args.JsonRestore()))
    manager.close()
    params, metadata = restored.params, restored.metadata
    return SavedModel(MarlinArchitecture.from_dict(metadata["architecture"]), params["generator"],
                      params.get("discriminator"), step, metadata.get("model_name", "marlin"))
