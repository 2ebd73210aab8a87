"""Fine-tuning entry point: the MARLIN encoder plus a linear head, trained end to end on face videos.

    python -m marlin_jax.finetune --config configs/finetune/celebvhq_appearance.py \
        --config.data.root=/data/CelebV-HQ --config.init_from=marlin_vit_base_ytf \
        --workdir runs/finetune/celebvhq_appearance

Rerunning the same command resumes from the newest checkpoint in --workdir. Writes `<workdir>/results.json`;
see `marlin_jax.downstream.finetune.finetune_and_evaluate`. Multi-host flags as for `marlin_jax.train`.
"""

from absl import logging

from marlin_jax import launch, storage
from marlin_jax.interop import official_weights

_CONFIG, _WORKDIR = launch.define_config_and_workdir(
    "Fine-tuning config file (configs/finetune/*.py[:arg]).",
    "Checkpoints, logs and results.json; resumed when it has some.")


def main(argv):
    config = _CONFIG.value
    # Before launch.start: a wrong path is named within a second, before JAX loads or the hosts join.
    official_weights.check_weights_argument(config.init_from, "--config.init_from")
    storage.check_paths(inputs={"--config.data.csv": config.data.csv, "--config.data.root": config.data.root},
                        buckets={"--workdir": _WORKDIR.value})
    launch.start(argv)
    from marlin_jax.downstream.finetune import finetune_and_evaluate
    if finetune_and_evaluate(config, _WORKDIR.value) is None:
        logging.warning("stopped by SIGTERM after saving a checkpoint; rerun the same command to continue")


if __name__ == "__main__":
    launch.run(main)
