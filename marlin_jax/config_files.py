"""Loading Python config files (`configs/.../name.py[:variant]`) outside absl's flag machinery."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py` or `path/to/config.py:variant` -> `get_config(variant)` of that file."""
    path, _, variant = spec.partition(":")
    file = pathlib.Path(path)
    if file.suffix != ".py" or not file.is_file():
        raise ValueError(f"{spec!r} is not a config file (expected path/to/config.py or path/to/config.py:variant)")
    module_spec = importlib.util.spec_from_file_location(f"_marlin_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {file} defines no get_config()")
    return module.get_config(variant or None)
