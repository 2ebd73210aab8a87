"""Linear probe on extracted MARLIN features.

    python -m marlin_jax.linear_probe --config configs/probe/celebvhq_appearance.py \
        --config.data.root=/data/CelebV-HQ --workdir runs/probe/appearance

Writes `<workdir>/results.json`; see `marlin_jax.evaluation.linear_probe.run_linear_probe`.
"""

from absl import app, flags
from ml_collections import config_flags

from marlin_jax.evaluation.linear_probe import run_linear_probe

_CONFIG = config_flags.DEFINE_config_file("config", None, "Probe config file (configs/probe/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run_linear_probe(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
