"""Export a training checkpoint to PyTorch: the official `.pt` state_dict, its YAML config and `.safetensors`.

    python -m marlin_jax.export --workdir /tmp/marlin_vit_base --output exported/
    python -m marlin_jax.export --workdir /tmp/marlin_vit_base --step 20000 --output exported/ --encoder_only

The `.pt` loads strictly in the official package:
    marlin_pytorch.config.register_model_from_yaml("my_marlin", "exported/<name>.yaml")
    marlin_pytorch.Marlin.from_file("my_marlin", "exported/<name>.pt")
"""

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoints/ folder).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; the latest when omitted.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for <name>.pt, <name>.yaml and <name>.safetensors.")
_NAME = flags.DEFINE_string("name", None, "File stem; defaults to <model_name>_step<N>[_encoder].")
_ENCODER_ONLY = flags.DEFINE_bool("encoder_only", False, "Export only the encoder (like *.encoder.pt).")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from marlin_jax.export_checkpoint import export_checkpoint
    files = export_checkpoint(_WORKDIR.value, _OUTPUT.value, step=_STEP.value, name=_NAME.value,
                              encoder_only=_ENCODER_ONLY.value)
    for kind, path in files.items():
        logging.info("wrote %s: %s", kind, path)
        print(path)


if __name__ == "__main__":
    app.run(main)
