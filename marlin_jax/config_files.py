"""Finding and loading the Python config files: by path (`configs/pretrain/marlin_vit_base.py:tiny`) or by short
name (`marlin_vit_base:tiny`), from a checkout or an installed wheel.

The repository's `configs/` folder is installed as the package `marlin_jax.configs` (see setup.py), so a short
name works wherever the package is installed; a path works as it always has.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import pathlib

import ml_collections

# The folders of configs/, by the job that reads them.
KINDS = ("pretrain", "finetune", "probe")


def _installed_configs() -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("marlin_jax.configs")))


def short_names(kind: str | None = None) -> list[str]:
    """Every config reachable by short name: `name` within a kind, `kind/name` across kinds."""
    root = _installed_configs()
    kinds = [kind] if kind else KINDS
    return sorted((f"{folder}/" if kind is None else "") + file.stem
                  for folder in kinds for file in (root / folder).glob("*.py") if not file.stem.startswith("_"))


def resolve_config_path(spec: str, kind: str | None = None) -> str:
    """A config spec as a file path, variant kept: `marlin_vit_base:tiny` -> `.../pretrain/marlin_vit_base.py:tiny`.

    A spec naming a `.py` file (or anything with a `/` that is not `kind/name`) is a path and is returned as is.
    A short name is looked up among the installed configs of `kind` (all kinds when None, where a name that two
    kinds share must be written `kind/name`).
    """
    name, colon, variant = spec.partition(":")
    if name.endswith(".py") or pathlib.Path(name).is_file():
        return spec
    folder, slash, stem = name.rpartition("/")
    if slash and folder not in KINDS:
        return spec  # a path without .py: left to the loader, which names it
    root = _installed_configs()
    kinds = [folder] if slash else ([kind] if kind else list(KINDS))
    matches = [root / k / f"{stem}.py" for k in kinds if (root / k / f"{stem}.py").is_file()]
    if len(matches) == 1:
        return f"{matches[0]}{colon}{variant}"
    if matches:
        raise ValueError(f"config name {name!r} is ambiguous: write one of "
                         f"{', '.join(f'{m.parent.name}/{stem}' for m in matches)}")
    scope = None if slash else kind
    raise ValueError(f"{name!r} is neither a config file nor a config name; known names"
                     f"{f' for {kind}' if scope else ''}: {', '.join(short_names(scope))}")


def load_config(spec: str, kind: str | None = None) -> ml_collections.ConfigDict:
    """`path/to/config.py[:variant]` or a short name `[kind/]name[:variant]` -> that file's `get_config(variant)`."""
    path, _, variant = resolve_config_path(spec, kind).partition(":")
    file = pathlib.Path(path)
    if file.suffix != ".py" or not file.is_file():
        raise ValueError(f"{spec!r} is not a config file (expected path/to/config.py[:variant] or a config name "
                         f"such as marlin_vit_base[:variant])")
    module_spec = importlib.util.spec_from_file_location(f"_marlin_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {file} defines no get_config()")
    return module.get_config(variant or None)
