"""Reading and writing the PyTorch-side files: official `.pt` / Lightning `.ckpt`, VideoMAE `.pth`, and exports
(`.pt` state_dict, the YAML that `marlin_pytorch.config.register_model_from_yaml` reads, `.safetensors`).

torch is imported lazily: only the torch files need it (`pip install marlin_jax[torch]`); `.safetensors` files are
read and written with the `safetensors` package alone. Paths may be local or in a
bucket (`etils.epath`): a remote checkpoint is read into memory and handed to torch as bytes, and every file
written appears whole or not at all (`marlin_jax.storage.write_once`).
"""

from __future__ import annotations

import argparse
import io
import logging
import pathlib
import pickle
import re
import zipfile
from typing import BinaryIO, Mapping

import numpy as np
import yaml
from etils import epath

from marlin_jax import storage
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.model import sincos_table

TORCH_SUFFIXES = (".pt", ".ckpt", ".pth")


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("reading or writing PyTorch checkpoints needs torch: pip install 'marlin_jax[torch]'") from None
    return torch


class UntrustedCheckpointError(ValueError):
    """A checkpoint that holds pickled objects beyond plain data, refused unless the caller trusts the file."""


# What to pass to read pickled objects beyond plain data, in each place a checkpoint path can come from.
TRUST_OPTIONS = ("trust_pickled_code=True (Python), --trust_pickled_checkpoint (extract and export), "
                 "--config.trust_pickled_checkpoint=true (train and finetune)")


def _inert_globals() -> list:
    """Non-tensor types found next to the weights that only hold data, so building one runs no code.

    Lightning keeps hyper-parameters, optimiser and scheduler states and callback states in a .ckpt; torch's
    weights-only unpickler already reads all of these when they are plain values (as in the official MARLIN
    train.py, whose hyper-parameters are numbers, strings, tuples and None). Hyper-parameters elsewhere can be
    an argparse.Namespace (VideoMAE's .pth holds its run arguments as one), paths or numpy scalars. Paths
    become pure paths, which any platform can build: a WindowsPath cannot be instantiated on Linux.
    """
    numpy_scalar = np.float64(0).__reduce__()[0]  # numpy.core (1.x) or numpy._core (2.x) multiarray.scalar
    pure_paths = [(pathlib.PurePosixPath, f"{module}.{name}") for module in ("pathlib", "pathlib._local")
                  for name in ("PosixPath", "PurePosixPath")]
    pure_paths += [(pathlib.PureWindowsPath, f"{module}.{name}") for module in ("pathlib", "pathlib._local")
                   for name in ("WindowsPath", "PureWindowsPath")]
    # A pickled dtype is rebuilt as `numpy.dtype(...)` and then given its state, which the unpickler allows
    # only for listed types: the dtype's own class (numpy.dtypes.Float64DType, ...).
    dtype_classes = sorted({type(np.dtype(code)) for code in np.typecodes["All"]}, key=str)
    return [argparse.Namespace, np.dtype, *dtype_classes, *pure_paths,
            (numpy_scalar, "numpy.core.multiarray.scalar"), (numpy_scalar, "numpy._core.multiarray.scalar")]


def _readable(path: epath.Path) -> str | BinaryIO:
    """What torch.load reads: a local file by name (torch maps it itself), a remote one as its bytes."""
    return io.BytesIO(path.read_bytes()) if storage.is_remote(path) else str(path)


def _rewound(source: str | BinaryIO) -> str | BinaryIO:
    if not isinstance(source, str):
        source.seek(0)
    return source


def _torch_load(path: epath.Path, trust_pickled_code: bool):
    torch = _torch()
    source = _readable(path)
    with path.open("rb") as file:
        magic = file.read(2)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle starting with the protocol byte).
    if not (zipfile.is_zipfile(_rewound(source)) or magic[:1] == b"\x80"):
        raise ValueError(f"{path} is not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    try:
        if trust_pickled_code:
            logging.warning("unpickling %s with weights_only=False: any code the file holds runs", path)
            return torch.load(_rewound(source), map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_inert_globals()):
            return torch.load(_rewound(source), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise ValueError(f"{path} is not a PyTorch checkpoint: {error}") from None
        raise UntrustedCheckpointError(
            f"{path} holds pickled objects that are not plain data ({_unsafe_globals(torch, source, error)}); "
            f"reading them could run code from the file, so it was not read. If you trust the file, allow "
            f"it with {TRUST_OPTIONS}; or, where you trust it, save only its weights: "
            f"torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.ckpt').") from None
    except Exception as error:  # torch reports damaged archives with many exception types
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {type(error).__name__}: {error}") from None


def _unsafe_globals(torch, source: str | BinaryIO, error: pickle.UnpicklingError) -> str:
    """The classes and functions the file would need, found by reading its pickle without running it."""
    try:
        with torch.serialization.safe_globals(_inert_globals()):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(_rewound(source))
    except (ValueError, RuntimeError):  # a legacy (pre-zip) file: only the error names the first one
        names = []
    if names:
        return ", ".join(names)
    reason = str(error).split("WeightsUnpickler error:")[-1].strip().split("\n\n")[0]
    return reason.split(". Please use")[0]


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


def read_torch_checkpoint(path, arch: MarlinArchitecture, *,
                          trust_pickled_code: bool = False) -> dict[str, np.ndarray]:
    """Any supported PyTorch file -> a MARLIN-named state_dict of numpy arrays.

    Files are read with torch's weights-only unpickler, which builds tensors and plain values only; a file
    that needs other classes or functions raises `UntrustedCheckpointError`. `trust_pickled_code=True`
    unpickles it fully instead, which runs whatever code the file holds: only for files you trust.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unsupported checkpoint type {path.suffix!r}; expected one of "
                         f"{', '.join(TORCH_SUFFIXES)}, .safetensors or an orbax checkpoint directory")
    loaded = _torch_load(path, trust_pickled_code)
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


def write_torch_state_dict(state: Mapping[str, np.ndarray], path) -> None:
    torch = _torch()
    with storage.write_once(path) as file:
        torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}, file)


def read_safetensors(path) -> dict[str, np.ndarray]:
    """A `.safetensors` state_dict (official tensor names, as `write_safetensors` writes them) as numpy arrays,
    floating point ones as float32, like `read_torch_checkpoint`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        state = load(path.read_bytes())
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    except KeyError as error:  # safetensors.numpy knows the dtypes numpy has, which leaves out bfloat16
        raise ValueError(f"{path} holds {error} tensors, which numpy cannot hold; save the weights as float32 "
                         "(Marlin.to_pytorch and export do)") from None
    return {key: value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
            for key, value in state.items()}


def write_safetensors(state: Mapping[str, np.ndarray], path) -> None:
    from safetensors.numpy import save
    storage.write_bytes_once(path, save({k: np.ascontiguousarray(v) for k, v in state.items()}))


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


def write_marlin_pytorch_yaml(arch: MarlinArchitecture, path) -> None:
    storage.write_bytes_once(path, yaml.safe_dump(marlin_pytorch_yaml(arch), sort_keys=False).encode())
