"""Turning raw face videos into the TFRecord shards that `marlin_jax.data` reads.

Entry points: `python -m data_prep.build` (see `data_prep.builder`) and `python -m data_prep.demo`.
"""
