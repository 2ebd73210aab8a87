"""Linear probe on extracted MARLIN features.

    python -m marlin_jax.linear_probe --config configs/probe/celebvhq_appearance.py \
        --config.data.root=/data/CelebV-HQ --workdir runs/probe/appearance

Writes `<workdir>/results.json`; see `marlin_jax.downstream.probe.run_linear_probe`.
"""

from absl import flags

from marlin_jax import launch, storage

_CONFIG, _WORKDIR = launch.define_config_and_workdir(
    "probe", "Probe config: a file (configs/probe/*.py[:arg]) or a name (celebvhq_appearance, csv[:arg]).",
    "Folder for results.json.")

# --help lists --config and --workdir, which launch defines (a probe runs on one host: no multi-host flags).
flags.declare_key_flag("config")
flags.declare_key_flag("workdir")


def main(argv):
    config = _CONFIG.value
    # Before launch.start: a wrong path is named within a second, before JAX loads or the hosts join.
    storage.check_paths(inputs={"--config.data.csv": config.data.csv, "--config.data.root": config.data.root},
                        buckets={"--workdir": _WORKDIR.value})
    launch.start(argv)
    from etils import epath

    from marlin_jax.downstream.metrics import summary_metrics
    from marlin_jax.downstream.probe import run_linear_probe
    results = run_linear_probe(config, _WORKDIR.value)
    print(f"done: test {launch.metrics_text(summary_metrics(results))} (mean over {len(results['seeds'])} seed(s)); "
          f"results in {epath.Path(_WORKDIR.value) / 'results.json'}")


if __name__ == "__main__":
    launch.run(main)
