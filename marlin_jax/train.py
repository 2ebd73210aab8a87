"""MARLIN pretraining entry point.

    python -m marlin_jax.train --config configs/pretrain/marlin_vit_base.py --workdir /tmp/marlin_vit_base \
        --config.data.path=/data/ytf_shards --config.batch_size=256

Rerunning the same command resumes from the newest checkpoint in --workdir. On multi-host TPU VMs pass
--distributed (JAX then finds its peers itself); elsewhere name the coordinator explicitly.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file (configs/pretrain/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and images go; resumed when it has some.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU VMs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (non-TPU multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes (non-TPU multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (non-TPU multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs a dozen INFO lines per checkpoint; the progress bar and warnings are what a user reads.
    # Pass -v 0 (or --verbosity=0) to see everything.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax
    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()
    from marlin_jax.training.loop import train_and_evaluate
    metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        print("final metrics:", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))


if __name__ == "__main__":
    app.run(main)
