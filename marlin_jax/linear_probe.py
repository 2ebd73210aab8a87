"""Linear probe on extracted MARLIN features.

    python -m marlin_jax.linear_probe --config configs/probe/celebvhq_appearance.py \
        --config.data.root=/data/CelebV-HQ --workdir runs/probe/appearance

Writes `<workdir>/results.json`; see `marlin_jax.downstream.probe.run_linear_probe`.
"""

from marlin_jax import launch, storage

_CONFIG, _WORKDIR = launch.define_config_and_workdir(
    "Probe config file (configs/probe/*.py[:arg]).", "Folder for results.json.")


def main(argv):
    config = _CONFIG.value
    # Before launch.start: a wrong path is named within a second, before JAX loads or the hosts join.
    storage.check_paths(inputs={"--config.data.csv": config.data.csv, "--config.data.root": config.data.root},
                        buckets={"--workdir": _WORKDIR.value})
    launch.start(argv)
    from marlin_jax.downstream.probe import run_linear_probe
    run_linear_probe(config, _WORKDIR.value)


if __name__ == "__main__":
    launch.run(main)
