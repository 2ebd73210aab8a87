"""The one orbax CheckpointManager layout for everything durable in a training workdir.

`<workdir>/checkpoints/<step>/` holds these items:
  - "params":        {"generator": MarlinMAE params, "discriminator": PatchDiscriminator params}
  - "opt_state":     both optimiser states (training only)
  - "data_iterator": the input pipeline's state, so a resumed run sees the same batches (training only)
  - "metadata":      JSON: {"architecture": {...}, "model_name": str, "step": int}

Inference and export read "params" and "metadata" alone, so they need no optimiser template.
"""

from __future__ import annotations

import pathlib
from typing import Any

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


def is_checkpoint_dir(path: str | pathlib.Path) -> bool:
    directory = checkpoint_dir(path)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def restore_params(path: str | pathlib.Path, step: int | None = None
                   ) -> tuple[MarlinArchitecture, dict[str, Any], dict[str, Any], int]:
    """Reads (architecture, generator params, discriminator params, step) from a workdir's checkpoints.

    Arrays come back as host numpy arrays; `step` None takes the latest checkpoint.
    """
    directory = checkpoint_dir(path)
    if not is_checkpoint_dir(directory):
        raise ValueError(f"{path} holds no orbax checkpoint (looked for numbered step folders in {directory})")
    manager = ocp.CheckpointManager(directory, item_names=ITEM_NAMES,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
    elif step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {directory}; available steps: {sorted(steps)}")
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.PyTreeRestore(), metadata=ocp.args.JsonRestore()))
    manager.close()
    architecture = MarlinArchitecture.from_dict(restored.metadata["architecture"])
    params = restored.params
    return architecture, params["generator"], params.get("discriminator"), step
