"""End-to-end fine-tuning: the MARLIN encoder plus a linear head trained on raw face clips.

`finetune_and_evaluate(config, workdir)` (trainer.py) is what `python -m marlin_jax.finetune` calls; the data
adapters mirror the linear probe's (a CSV, or the CelebV-HQ layout) but list video files, and the test metrics
carry the probe's names.
"""
