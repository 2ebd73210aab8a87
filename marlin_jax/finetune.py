"""Fine-tuning entry point: the MARLIN encoder plus a linear head, trained end to end on face videos.

    python -m marlin_jax.finetune --config configs/finetune/celebvhq_appearance.py \
        --config.data.root=/data/CelebV-HQ --config.init_from=marlin_vit_base_ytf.encoder.pt \
        --workdir runs/finetune/celebvhq_appearance

Rerunning the same command resumes from the newest checkpoint in --workdir. Writes `<workdir>/results.json`;
see `marlin_jax.finetuning.trainer.finetune_and_evaluate`. Multi-host flags as for `marlin_jax.train`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file (configs/finetune/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and results.json; resumed when it has some.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU VMs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (non-TPU multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes (non-TPU multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (non-TPU multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs a dozen INFO lines per checkpoint; pass -v 0 (or --verbosity=0) to see them.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax
    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()
    from marlin_jax.finetuning.trainer import finetune_and_evaluate
    results = finetune_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if results is None:
        logging.warning("stopped by SIGTERM after saving a checkpoint; rerun the same command to continue")


if __name__ == "__main__":
    app.run(main)
