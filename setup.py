"""Metadata and dependencies are in setup.cfg. This file only adds what setup.cfg cannot say: the repository's
top-level `configs/` folder is installed as the package `marlin_jax.configs`, so the config files travel with a
wheel and entry points find them by short name (marlin_jax/config_files.py)."""

import pathlib

import setuptools

CONFIG_PACKAGES = {"marlin_jax.configs": "configs"} | {
    f"marlin_jax.configs.{folder.name}": f"configs/{folder.name}"
    for folder in sorted(pathlib.Path(__file__).parent.joinpath("configs").iterdir())
    if folder.is_dir() and not folder.name.startswith(("_", "."))}

setuptools.setup(
    packages=setuptools.find_packages(include=["marlin_jax", "marlin_jax.*", "data_prep", "data_prep.*"])
    + list(CONFIG_PACKAGES),
    package_dir=CONFIG_PACKAGES,
    package_data={"marlin_jax": ["py.typed"], "marlin_jax.faces.assets": ["*.tflite", "LICENSE", "SOURCE.md"]},
)
