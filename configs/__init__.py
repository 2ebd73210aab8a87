"""The experiment configs: `pretrain/`, `finetune/` and `probe/`, each file a `get_config(variant)`.

Installed with the package as `marlin_jax.configs`, so entry points also take them by short name
(`--config marlin_vit_base:tiny`); see marlin_jax/config_files.py.
"""
