"""MARLIN pretraining entry point.

    python -m marlin_jax.train --config configs/pretrain/marlin_vit_base.py --workdir /tmp/marlin_vit_base \
        --config.data.path=/data/ytf_shards --config.batch_size=256

Rerunning the same command resumes from the newest checkpoint in --workdir. On multi-host TPU VMs pass
--distributed (JAX then finds its peers itself); elsewhere name the coordinator with --coordinator_address,
--num_processes and --process_id. See `marlin_jax.pretraining.trainer.train_and_evaluate`.
"""

from absl import flags

from marlin_jax import launch, storage
from marlin_jax.interop import official_weights

_CONFIG, _WORKDIR = launch.define_config_and_workdir(
    "pretrain", "Pretraining config: a file (configs/pretrain/*.py[:variant]) or a name (marlin_vit_base[:tiny]).",
    "Where checkpoints, logs and images go; resumed when it has some.")

# --help lists the flags launch defines (--config, --workdir, the multi-host ones) beside this module's own.
flags.adopt_module_key_flags(launch)


def main(argv):
    config = _CONFIG.value
    # Before launch.start: a wrong path is named within a second, before JAX loads or the hosts join.
    evaluator_paths = {f"--config.evals.{name}.{key}": block[key] for name, block in config.evals.items()
                       for key in ("path", "csv") if block.get(key)}
    official_weights.check_weights_argument(config.init_from, "--config.init_from")
    storage.check_paths(inputs={"--config.data.path": config.data.path, **evaluator_paths},
                        buckets={"--workdir": _WORKDIR.value})
    launch.start(argv)
    import jax
    from marlin_jax.pretraining.trainer import train_and_evaluate
    metrics = train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        print(f"done: {launch.metrics_text(metrics)}; checkpoints, metrics.jsonl and TensorBoard logs are in "
              f"{_WORKDIR.value}")


if __name__ == "__main__":
    launch.run(main)
