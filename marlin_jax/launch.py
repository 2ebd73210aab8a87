"""What every `python -m marlin_jax.<job>` entry point shares: absl flags (`--config`/`--workdir` for the
config-driven jobs), joining the other JAX processes, quiet logs, and one way to report bad input."""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU VMs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (non-TPU multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes (non-TPU multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (non-TPU multi-process).")


def define_config_and_workdir(config_help: str, workdir_help: str):
    """(config, workdir) flag holders; both required."""
    config = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])
    return config, workdir


def start(argv, *, positional: bool = False) -> list[str]:
    """Checks the command line, quiets orbax, and joins the other JAX processes when asked to; returns the
    positional arguments (only entry points that take some pass `positional=True`)."""
    if len(argv) > 1 and not positional:
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
    return list(argv[1:])


def run(main) -> None:
    """`app.run(main)`, with bad input (a ValueError or a missing optional package, whose messages say what is
    wrong and what to do) reported as one line and exit status 2, and a run stopped by a NaN/Inf as one line and
    exit status 1, instead of a traceback."""

    def guarded(argv):
        try:
            return main(argv)
        except (ValueError, ImportError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except FloatingPointError as error:
            print(f"stopped: {error}", file=sys.stderr)
            sys.exit(1)

    app.run(guarded)
