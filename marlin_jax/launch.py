"""What every `python -m marlin_jax.<job>` (and `data_prep.<job>`) entry point shares: absl flags (`--config` by
path or short name and `--workdir` for the config-driven jobs), joining the other JAX processes, quiet logs, and
one way to report bad input: one line on stderr and exit status 2."""

from __future__ import annotations

import gc
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from marlin_jax import config_files, storage

_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU VMs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (non-TPU multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes (non-TPU multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (non-TPU multi-process).")


# Whether `--config` may name an installed config by short name, and the configs/ folder it names one of (None:
# any folder); set by accept_config_names.
_config_names = False
_config_kind: str | None = None


def accept_config_names(kind: str | None) -> None:
    """Let `--config` name an installed config by short name, among `kind`'s files (every kind's when None)."""
    global _config_names, _config_kind
    _config_names, _config_kind = True, kind


def define_config_and_workdir(kind: str, config_help: str, workdir_help: str):
    """(config, workdir) flag holders, both required; `kind` is the configs/ folder that short names refer to."""
    accept_config_names(kind)
    config = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])
    return config, workdir


def check_arguments(argv) -> None:
    """For entry points that take no positional arguments: a stray one is bad input."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def start(argv, *, positional: bool = False) -> list[str]:
    """Checks the command line, quiets orbax, and joins the other JAX processes when asked to; returns the
    positional arguments (only entry points that take some pass `positional=True`)."""
    if not positional:
        check_arguments(argv)
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


def metrics_text(metrics: dict) -> str:
    """`{"auc": 0.912345, "acc": 0.8}` -> `acc=0.8, auc=0.9123`, for the one-line summaries."""
    return ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in sorted(metrics.items()))


def fail(message: str, *, after_background_writers: bool = False) -> None:
    """Bad input, said the one way every entry point says it: one line, written with one call so that no other
    thread's output lands inside it. `after_background_writers`: other threads may still be writing (a checkpoint
    save failing in the background prints from orbax's and tensorstore's threads), so the line starts on a line of
    its own; and the tasks that save abandoned, which asyncio reports one traceback each when they are collected
    at exit, are not reported again after the line that sums them up."""
    if after_background_writers:
        std_logging.getLogger("asyncio").disabled = True
        gc.collect()
        sys.stdout.flush()
    line_start = "\n" if after_background_writers else ""
    sys.stderr.write(f"{line_start}error: {message}\n")
    sys.stderr.flush()
    sys.exit(2)


def _config_names_as_paths(argv: list[str]) -> list[str]:
    """`--config marlin_vit_base:tiny` -> `--config <installed configs>/pretrain/marlin_vit_base.py:tiny`."""
    argv = list(argv)
    for index, argument in enumerate(argv):
        if argument.startswith("--config="):
            argv[index] = "--config=" + config_files.resolve_config_path(argument[len("--config="):], _config_kind)
        elif argument == "--config" and index + 1 < len(argv):
            argv[index + 1] = config_files.resolve_config_path(argv[index + 1], _config_kind)
    return argv


def _dashes_as_underscores(argv: list[str]) -> list[str]:
    """Flags are spelled with underscores; a dashed spelling of a defined flag (`--split-csv-dir`, and
    `--no-tracking` for a boolean) is taken as the same flag."""
    spelled = []
    for index, argument in enumerate(argv):
        if argument == "--":
            return spelled + argv[index:]
        name, equals, value = argument[2:].partition("=")
        if argument.startswith("--") and "-" in name:
            underscored = name.replace("-", "_")
            negated = underscored.removeprefix("no_")
            if underscored in flags.FLAGS:
                argument = f"--{underscored}{equals}{value}"
            elif negated != underscored and negated in flags.FLAGS and flags.FLAGS[negated].boolean:
                argument = f"--no{negated}{equals}{value}"
        spelled.append(argument)
    return spelled


def parse_flags(argv: list[str], *, known_only: bool = False) -> list[str]:
    """absl's flag parsing, after dashed spellings and short config names are resolved, with a flag error (an
    unknown flag, a bad value, a missing required flag, an unknown config name) reported as one line and exit
    status 2 instead of absl's usage text and status 1. `known_only` returns unknown flags instead of refusing
    them (for data_prep.build, which hands them to Beam)."""
    try:
        argv = _dashes_as_underscores(argv)
        if _config_names:
            argv = _config_names_as_paths(argv)
        return flags.FLAGS(argv, known_only=known_only)
    except (flags.Error, ValueError) as error:
        fail(f"{error} (see --help)")


def run(main, flags_parser=parse_flags) -> None:
    """`app.run(main)`, with bad input (a ValueError or a missing optional package, whose messages say what is
    wrong and what to do) and a full disk reported as one line and exit status 2, and a run stopped by a NaN/Inf
    as one line and exit status 1, instead of a traceback."""

    def guarded(argv):
        try:
            return main(argv)
        except storage.DiskFullError as error:
            fail(str(error), after_background_writers=True)
        except (ValueError, ImportError, app.UsageError) as error:
            fail(str(error))
        except FloatingPointError as error:
            print(f"stopped: {error}", file=sys.stderr)
            sys.exit(1)

    app.run(guarded, flags_parser=flags_parser)
