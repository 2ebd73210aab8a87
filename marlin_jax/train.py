"""MARLIN pretraining entry point.

    python -m marlin_jax.train --config configs/pretrain/marlin_vit_base.py --workdir /tmp/marlin_vit_base \
        --config.data.path=/data/ytf_shards --config.batch_size=256

Rerunning the same command resumes from the newest checkpoint in --workdir. On multi-host TPU VMs pass
--distributed (JAX then finds its peers itself); elsewhere name the coordinator with --coordinator_address,
--num_processes and --process_id. See `marlin_jax.pretraining.trainer.train_and_evaluate`.
"""

from marlin_jax import launch

_CONFIG, _WORKDIR = launch.define_config_and_workdir(
    "Pretraining config file (configs/pretrain/*.py[:variant]).",
    "Where checkpoints, logs and images go; resumed when it has some.")


def main(argv):
    launch.start(argv)
    import jax
    from marlin_jax.pretraining.trainer import train_and_evaluate
    metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        print("final metrics:", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))


if __name__ == "__main__":
    launch.run(main)
