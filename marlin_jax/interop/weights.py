"""Every way MARLIN weights come in: one loader for `Marlin.from_file`, pretraining's and fine-tuning's
`init_from`, extraction and export.

Accepted: an official weights name (`marlin_vit_base_ytf`, `marlin_vit_base_ytf.full`: the release file, downloaded
once into a cache, see `official_weights`), an official `.pt` state_dict or Lightning `.ckpt` (the discriminator
too, when the file has it), a `.safetensors` file with the same tensor names (as `export` writes), a VideoMAE
pretraining `.pth`, or a workdir (or checkpoint folder) of this project.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from etils import epath

from marlin_jax import storage
from marlin_jax.architectures import MarlinArchitecture, describe, official_architecture
from marlin_jax.interop import official_weights, torch_files
from marlin_jax.interop.state_dict import import_state_dict
from marlin_jax.interop import saved_models


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """Host (numpy) parameters: the generator ({"encoder"} or with "enc_dec_proj" and "decoder") and, when
    the source had one, the discriminator."""

    generator: dict[str, Any]
    discriminator: dict[str, Any] | None
    source: str


def load_weights(arch: MarlinArchitecture, path, *, step: int | None = None, trust_pickled_checkpoint: bool = False
                 ) -> LoadedWeights:
    """Reads weights for `arch` from an official name, a file or a workdir; errors name the source and the first
    problem.

    `step` picks a checkpoint of a workdir (default the latest). `trust_pickled_checkpoint` lets a Lightning
    `.ckpt` holding arbitrary Python objects be unpickled, which runs code from the file: only for files you
    trust.
    """
    if official_weights.is_weights_name(path):
        path = official_file(path, arch)
    path = epath.Path(path)
    if path.is_dir():
        saved = saved_models.read_saved_model(path, step)
        if saved.architecture != arch:
            raise ValueError(f"checkpoint {path} was trained with architecture {describe(saved.architecture)}, not "
                             f"the requested {describe(arch)}")
        return LoadedWeights(saved.generator, saved.discriminator, str(path))
    if not path.exists():
        if official_weights.looks_like_name(path) and not storage.is_remote(path):
            raise official_weights.unknown_name_error(str(path))
        raise ValueError(f"weights not found: {path}")
    state = read_state_dict(path, arch, trust_pickled_checkpoint)
    try:
        generator, discriminator = import_state_dict(state, arch)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return LoadedWeights(generator, discriminator, str(path))


def read_state_dict(path: epath.Path, arch: MarlinArchitecture, trust_pickled_checkpoint: bool = False
                    ) -> dict[str, np.ndarray]:
    """A weights file as a MARLIN-named state_dict of numpy arrays: `.safetensors` without torch, the rest with it."""
    if path.suffix == ".safetensors":
        return torch_files.read_safetensors(path)
    return torch_files.read_torch_checkpoint(path, arch, trust_pickled_code=trust_pickled_checkpoint)


def official_file(weights_name: str, arch: MarlinArchitecture) -> epath.Path:
    """The cached release file of official weights for `arch`, downloaded (and checked to load strictly) first
    when it is not in the cache yet."""
    name, full_model = official_weights.parse_name(weights_name)
    released = official_architecture(name)
    if released != arch:
        raise ValueError(f"weights {weights_name} are {describe(released)}, but the model is {describe(arch)}")

    def loads_strictly(downloaded: epath.Path) -> None:
        generator, _ = import_state_dict(read_state_dict(downloaded, arch), arch)
        if ("decoder" in generator) != full_model:
            raise ValueError("the full model's file has no decoder" if full_model
                             else "the encoder-only file also holds a decoder")

    return official_weights.fetch(name, full_model, loads_strictly)
