"""A training checkpoint -> PyTorch files (the library side of `python -m marlin_jax.export`)."""

from __future__ import annotations

import pathlib

from marlin_jax.training import checkpoints
from marlin_jax.marlin import Marlin


def export_checkpoint(workdir: str | pathlib.Path, output: str | pathlib.Path, *, step: int | None = None,
                      name: str | None = None, encoder_only: bool = False) -> dict[str, pathlib.Path]:
    """Writes `<output>/<name>.{pt,yaml,safetensors}` from the (latest) checkpoint in `workdir`."""
    saved = checkpoints.restore_params(workdir, step)
    generator = {"encoder": saved.generator["encoder"]} if encoder_only else saved.generator
    name = name or f"{saved.model_name}_step{saved.step}{'_encoder' if encoder_only else ''}"
    model = Marlin(saved.architecture, generator, saved.discriminator, name=saved.model_name)
    return model.to_pytorch(pathlib.Path(output) / name)
