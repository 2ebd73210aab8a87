"""Export a training checkpoint to PyTorch: the official `.pt` state_dict, its YAML config and `.safetensors`.

    python -m marlin_jax.export --workdir /tmp/marlin_vit_base                 # -> /tmp/marlin_vit_base/exported/
    python -m marlin_jax.export --workdir /tmp/marlin_vit_base --best --output exported/ --encoder_only
    python -m marlin_jax.export --workdir /tmp/marlin_vit_base --step 20000 --output exported/

The `.pt` loads strictly in the official package:
    marlin_pytorch.config.register_model_from_yaml("my_marlin", "exported/<name>.yaml")
    marlin_pytorch.Marlin.from_file("my_marlin", "exported/<name>.pt")
A damaged newest checkpoint is skipped with a warning naming it; the newest intact one is exported.
"""

from absl import flags

from marlin_jax import launch, storage

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoints/ folder).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; the newest intact one when omitted.")
_BEST = flags.DEFINE_bool("best", False, "Export <workdir>/best: the model with the best validation score.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for <name>.pt, <name>.yaml and <name>.safetensors "
                                              "(default: <workdir>/exported).")
_NAME = flags.DEFINE_string("name", None, "File stem; defaults to <model_name>_step<N>[_best][_encoder].")
_ENCODER_ONLY = flags.DEFINE_bool("encoder_only", False, "Export only the encoder (like *.encoder.pt).")
flags.mark_flags_as_required(["workdir"])


def _default_output(workdir: str) -> str:
    """<run workdir>/exported, also when --workdir names the run's checkpoints/ or best/ folder (kept free of
    anything but checkpoint steps)."""
    run, _, last = workdir.rstrip("/").rpartition("/")
    return f"{run if last in ('checkpoints', 'best') and run else workdir.rstrip('/')}/exported"


def main(argv):
    # Before launch.start: a wrong path is named within a second, before JAX loads or the hosts join.
    output = _OUTPUT.value or _default_output(_WORKDIR.value)
    storage.check_paths(inputs={"--workdir": _WORKDIR.value}, buckets={"--output": output})
    launch.start(argv)
    from etils import epath

    from marlin_jax.marlin import Marlin
    from marlin_jax.training import checkpoints
    if _BEST.value and _STEP.value is not None:
        raise ValueError("pass --best or --step, not both")
    source = epath.Path(_WORKDIR.value) / checkpoints.BEST_SUBDIR if _BEST.value else _WORKDIR.value
    model = Marlin.from_checkpoint(source, _STEP.value)
    if _ENCODER_ONLY.value:
        model = Marlin(model.architecture, {"encoder": model.params["encoder"]}, None, model.name)
    name = _NAME.value or (f"{model.name}_step{model.step}{'_best' if _BEST.value else ''}"
                           f"{'_encoder' if _ENCODER_ONLY.value else ''}")
    written = model.to_pytorch(epath.Path(output) / name).values()
    print(f"exported {model.name} step {model.step}{' (best)' if _BEST.value else ''}: {', '.join(map(str, written))}")


if __name__ == "__main__":
    launch.run(main)
