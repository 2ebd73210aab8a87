"""Reading and writing the PyTorch-side files: official `.pt` / Lightning `.ckpt`, VideoMAE `.pth`, and exports
(`.pt` state_dict, the YAML that `marlin_pytorch.config.register_model_from_yaml` reads, `.safetensors`).

torch is imported lazily: only these files need it (`pip install marlin_jax[torch]`).
"""

from __future__ import annotations

import logging
import pathlib
import pickle
import re
import zipfile
from typing import Mapping

import numpy as np
import yaml

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.model import sincos_table

TORCH_SUFFIXES = (".pt", ".ckpt", ".pth")


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("reading or writing PyTorch checkpoints needs torch: pip install 'marlin_jax[torch]'") from None
    return torch


def _torch_load(path: pathlib.Path):
    torch = _torch()
    with path.open("rb") as file:
        magic = file.read(2)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle starting with the protocol byte).
    if not (zipfile.is_zipfile(path) or magic[:1] == b"\x80"):
        raise ValueError(f"{path} is not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error):
            raise ValueError(f"{path} is not a PyTorch checkpoint: {error}") from None
        # Lightning .ckpt files pickle hyper-parameters and callback states next to the tensors.
        logging.warning("%s holds non-tensor objects; loading it with weights_only=False (trust the file)", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch reports damaged archives with many exception types
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {type(error).__name__}: {error}") from None


def _to_numpy(state: Mapping) -> dict[str, np.ndarray]:
    torch = _torch()
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
    return out


_VIDEOMAE_RENAMES = (
    (re.compile(r"^encoder\.patch_embed\.proj\."), "encoder.patch_embedding.projection."),
    (re.compile(r"^((?:en|de)coder\.blocks\.\d+\.mlp)\.fc1\."), r"\1.layers.0.linear."),
    (re.compile(r"^((?:en|de)coder\.blocks\.\d+\.mlp)\.fc2\."), r"\1.layers.1.linear."),
    (re.compile(r"^encoder_to_decoder\."), "enc_dec_proj."),
    (re.compile(r"^mask_token$"), "decoder.mask_token"),
)


def videomae_to_marlin(state: Mapping[str, np.ndarray], arch: MarlinArchitecture) -> dict[str, np.ndarray]:
    """Renames a VideoMAE pretraining state_dict to MARLIN's names (the mapping MARLIN's paper training used).

    VideoMAE keeps its sin-cos tables as plain tensors outside the state_dict; ours are filled in.
    """
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in _VIDEOMAE_RENAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    if not any(k.startswith("encoder.") for k in renamed):
        raise ValueError("VideoMAE checkpoint has no 'encoder.*' tensors; only VideoMAE *pretraining* checkpoints "
                         "(encoder + decoder) can initialise MARLIN")
    renamed.setdefault("encoder.pos_embedding.emb", sincos_table(arch.num_tokens, arch.encoder_embed_dim)[None])
    if any(k.startswith("decoder.") for k in renamed):
        renamed.setdefault("decoder.pos_embedding.emb", sincos_table(arch.num_tokens, arch.decoder_embed_dim)[None])
    return renamed


def read_torch_checkpoint(path: str | pathlib.Path, arch: MarlinArchitecture) -> dict[str, np.ndarray]:
    """Any supported PyTorch file -> a MARLIN-named state_dict of numpy arrays."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unsupported checkpoint type {path.suffix!r}; expected one of "
                         f"{', '.join(TORCH_SUFFIXES)} or an orbax checkpoint directory")
    loaded = _torch_load(path)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state_dict")
    if path.suffix == ".ckpt":
        if "state_dict" not in loaded:
            raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'")
        return _to_numpy(loaded["state_dict"])
    if path.suffix == ".pth":
        for key in ("model", "module"):
            if key in loaded and isinstance(loaded[key], Mapping):
                return videomae_to_marlin(_to_numpy(loaded[key]), arch)
        raise ValueError(f"{path} is not a VideoMAE checkpoint: it has no 'model' or 'module' state_dict")
    return _to_numpy(loaded)


def write_torch_state_dict(state: Mapping[str, np.ndarray], path: str | pathlib.Path) -> None:
    torch = _torch()
    torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}, pathlib.Path(path))


def write_safetensors(state: Mapping[str, np.ndarray], path: str | pathlib.Path) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))


def marlin_pytorch_yaml(arch: MarlinArchitecture) -> dict:
    """The config dict `marlin_pytorch.config.register_model_from_yaml` expects."""
    return {
        "img_size": arch.img_size, "patch_size": arch.patch_size, "clip_frames": arch.num_frames,
        "tubelet_size": arch.tubelet_size, "mlp_ratio": arch.mlp_ratio, "qkv_bias": arch.qkv_bias,
        "qk_scale": arch.qk_scale, "drop_rate": 0.0, "attn_drop_rate": 0.0, "norm_layer": "LayerNorm",
        "init_values": 0.0,
        "encoder": {"embed_dim": arch.encoder_embed_dim, "depth": arch.encoder_depth,
                    "num_heads": arch.encoder_num_heads},
        "decoder": {"embed_dim": arch.decoder_embed_dim, "depth": arch.decoder_depth,
                    "num_heads": arch.decoder_num_heads},
    }


def write_marlin_pytorch_yaml(arch: MarlinArchitecture, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(yaml.safe_dump(marlin_pytorch_yaml(arch), sort_keys=False))
