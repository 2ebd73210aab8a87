"""Compile a config's programs for a TPU slice on any machine, without a TPU, and say whether the run fits.

    python -m marlin_jax.aot --config configs/pretrain/marlin_vit_large.py --topology v5e:4x4 \
        --json vit_large_v5e_4x4.json

It compiles what a run on that slice would execute (the pretraining train step and the feature-extraction
forward; for a fine-tuning config its train step and evaluation forward) with the config's mesh, dtype, remat and
global batch, prints a summary and writes JSON with HBM per chip, FLOPs, collectives, the attention kernel and the
hours for the config's whole schedule at 50% MFU. A program that does not fit exits with status 1 and one line
naming the shortfall and the levers. Needs libtpu (pip install -e '.[tpu]'); see docs/tpu.md.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from marlin_jax import launch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining or fine-tuning config: a file "
                                          "(configs/pretrain/*.py[:variant], configs/finetune/*.py[:arg]) or a "
                                          "short name (marlin_vit_large, finetune/celebvhq_action:...).",
                                          lock_config=True)
launch.accept_config_names(None)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, <chip>:<shape>: v5e:2x2, v5e:4x4, v4:2x2x1, "
                                                  "v5p:2x2x2, v6e:2x4, ...")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-centre network (multislice).")
_JSON = flags.DEFINE_string("json", None, "Write the report here as JSON.")
_PROGRAMS = flags.DEFINE_list("programs", None, "Compile only these (train_step, extract_features, predict).")
_TRAIN_CLIPS = flags.DEFINE_integer("train_clips", None, "Clips per epoch for the schedule's length (pretraining "
                                                         "default: the config's data manifest, else YouTube Faces' "
                                                         "2,593).")
_NUM_OUTPUTS = flags.DEFINE_integer("num_outputs", None, "Fine-tuning: the head's width where only the labels "
                                                         "decide it.")
_EXTRACT_BATCH_SIZE = flags.DEFINE_integer("extract_batch_size", None, "Clips per extraction batch on one host "
                                                                       "(default: 8 per chip, as extract's).")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Write each compiled program's optimised HLO here "
                                              "(<program>.hlo.txt; benchmarks/tpu_memory.py reads it).")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    launch.start(argv)
    # This process compiles for the slice and runs nothing: keep JAX off any local accelerator (on a TPU VM the
    # TPU may be busy training).
    import jax
    jax.config.update("jax_platforms", "cpu")
    from marlin_jax import aot_compile
    config = _CONFIG.value
    report = aot_compile.compile_config(
        config, _TOPOLOGY.value, num_slices=_NUM_SLICES.value, programs=tuple(_PROGRAMS.value or ()),
        train_clips=_TRAIN_CLIPS.value, num_outputs=_NUM_OUTPUTS.value, extract_batch_size=_EXTRACT_BATCH_SIZE.value,
        hlo_dir=_HLO_DIR.value)
    print(aot_compile.summary(report))
    if _JSON.value:
        from etils import epath
        epath.Path(_JSON.value).write_text(json.dumps(report, indent=2))
    problem = aot_compile.shortfall(report)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    launch.run(main)
