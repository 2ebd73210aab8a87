"""Turning raw face videos into the TFRecord shards that `marlin_jax.data` reads.

Entry points: `python -m data_prep.build` (a build's state in `data_prep.build_state`, run by local worker processes
in `data_prep.local_build` or as the Beam pipeline of `data_prep.beam_pipeline`), `python -m data_prep.demo` and
`python -m data_prep.celebvhq`.
"""
