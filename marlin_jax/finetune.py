"""Fine-tuning entry point: the MARLIN encoder plus a linear head, trained end to end on face videos.

    python -m marlin_jax.finetune --config configs/finetune/celebvhq_appearance.py \
        --config.data.root=/data/CelebV-HQ --config.init_from=marlin_vit_base_ytf \
        --workdir runs/finetune/celebvhq_appearance

Rerunning the same command resumes from the newest checkpoint in --workdir. Writes `<workdir>/results.json`;
see `marlin_jax.downstream.classifier_trainer.finetune_and_evaluate`. Multi-host flags as for `marlin_jax.train`.
"""

from absl import flags, logging

from marlin_jax import launch, storage
from marlin_jax.interop import official_weights

_CONFIG, _WORKDIR = launch.define_config_and_workdir(
    "finetune", "Fine-tuning config: a file (configs/finetune/*.py[:arg]) or a name (celebvhq_appearance[:arg]).",
    "Checkpoints, logs and results.json; resumed when it has some.")

# --help lists the flags launch defines (--config, --workdir, the multi-host ones) beside this module's own.
flags.adopt_module_key_flags(launch)


def main(argv):
    config = _CONFIG.value
    # Before launch.start: a wrong path is named within a second, before JAX loads or the hosts join.
    official_weights.check_weights_argument(config.init_from, "--config.init_from")
    storage.check_paths(inputs={"--config.data.csv": config.data.csv, "--config.data.root": config.data.root},
                        buckets={"--workdir": _WORKDIR.value})
    launch.start(argv)
    import jax
    from etils import epath

    from marlin_jax.downstream.classifier_trainer import finetune_and_evaluate
    from marlin_jax.downstream.metrics import summary_metrics
    results = finetune_and_evaluate(config, _WORKDIR.value)
    if results is None:
        logging.warning("stopped by SIGTERM after saving a checkpoint; rerun the same command to continue")
    elif jax.process_index() == 0:
        print(f"done: test {launch.metrics_text(summary_metrics(results))} of the model at step "
              f"{results['selected_step']}; results in {epath.Path(_WORKDIR.value) / 'results.json'}")


if __name__ == "__main__":
    launch.run(main)
