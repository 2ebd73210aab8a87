"""Every way MARLIN weights come in: one loader for `Marlin.from_file`, pretraining's and fine-tuning's
`init_from`, extraction and export.

Accepted: an official `.pt` state_dict or Lightning `.ckpt` (the discriminator too, when the file has it), a
VideoMAE pretraining `.pth`, or a workdir (or checkpoint folder) of this project.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.interop import torch_files
from marlin_jax.interop.state_dict import import_state_dict
from marlin_jax.training import checkpoints


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """Host (numpy) parameters: the generator ({"encoder"} or with "enc_dec_proj" and "decoder") and, when
    the source had one, the discriminator."""

    generator: dict[str, Any]
    discriminator: dict[str, Any] | None
    source: str


def load_weights(arch: MarlinArchitecture, path, *, step: int | None = None, trust_pickled_checkpoint: bool = False
                 ) -> LoadedWeights:
    """Reads weights for `arch` from a file or a workdir; errors name the file and the first problem.

    `step` picks a checkpoint of a workdir (default the latest). `trust_pickled_checkpoint` lets a Lightning
    `.ckpt` holding arbitrary Python objects be unpickled, which runs code from the file: only for files you
    trust.
    """
    path = epath.Path(path)
    if path.is_dir():
        saved = checkpoints.restore_params(path, step)
        if saved.architecture != arch:
            raise ValueError(f"checkpoint {path} was trained with architecture {saved.architecture}, not the "
                             f"requested {arch}")
        return LoadedWeights(saved.generator, saved.discriminator, str(path))
    if not path.exists():
        raise ValueError(f"weights not found: {path}")
    state = torch_files.read_torch_checkpoint(path, arch, trust_pickled_code=trust_pickled_checkpoint)
    generator, discriminator = import_state_dict(state, arch)
    return LoadedWeights(generator, discriminator, str(path))
