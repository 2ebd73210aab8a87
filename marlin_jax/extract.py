"""Extract MARLIN features from videos: one .npy per video.

    python -m marlin_jax.extract --model marlin_vit_base_ytf --weights marlin_vit_base_ytf \
        --output_dir features/ videos/
    # raw footage (not 224x224 face crops): crop the face first
    python -m marlin_jax.extract --model marlin_vit_base_ytf --weights marlin_vit_base_ytf.encoder.pt \
        --output_dir features/ --crop_face --batch_size 16 videos/ extra_clip.mp4

--weights takes an official name (the release file, downloaded once into ~/.cache/marlin_jax; see
marlin_jax.interop.official_weights) or a file or workdir.

Each video gives `<output_dir>/<sub-folders>/<stem>.npy`: (clips, D) floats, (clips, tokens, D) with
--keep_seq, or (D,) with --reduction mean|max. The clip schedule is marlin_pytorch's extract_video (see
marlin_jax.video). Batches are split over this host's devices. With --distributed (or --coordinator_address
...) on several hosts, each host takes every N-th video of the sorted list, so each is done once. Videos that
cannot be read, or have no face with --crop_face, are skipped and listed at the end; the exit status is 1 only
when every video (of this host) failed.
"""

from __future__ import annotations

import logging
import sys

from absl import flags

from marlin_jax import launch, storage
from marlin_jax.video_features import REDUCTIONS
from marlin_jax.interop import official_weights

_MODEL = flags.DEFINE_string("model", None, "Official name (marlin_vit_base_ytf, ...) or pretraining config (file "
                                            "or name, marlin_vit_small[:variant]); optional when --weights is an "
                                            "official name or a workdir of this project, which say their model.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Official name (marlin_vit_base_ytf, downloaded once), official .pt / "
                                                ".ckpt, .safetensors, VideoMAE .pth, or a marlin_jax workdir.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the .npy files go (sub-folders mirror the inputs).")
_CROP_FACE = flags.DEFINE_bool("crop_face", False, "Crop the face of every frame first; without it, frames that are "
                                                   "not img_size squares are resized (not cropped) to one.")
_KEEP_SEQ = flags.DEFINE_bool("keep_seq", False, "Keep per-token features instead of their mean.")
_SAMPLE_RATE = flags.DEFINE_integer("sample_rate", 2, "Use every n-th frame.")
_STRIDE = flags.DEFINE_integer("stride", 16, "Clip stride in sampled frames.")
_REDUCTION = flags.DEFINE_enum("reduction", "none", REDUCTIONS, "Reduce over a video's clips.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Clips per model call, gathered across videos and split "
                                                       "over this host's devices (default: 1 per CPU, 8 per chip).")
_TRUST = flags.DEFINE_bool("trust_pickled_checkpoint", False, "Unpickle a .ckpt that holds arbitrary Python "
                                                              "objects; this runs code from the file.")
flags.mark_flags_as_required(["weights", "output_dir"])

# --help lists the flags launch defines (--config, --workdir, the multi-host ones) beside this module's own.
flags.adopt_module_key_flags(launch)


def main(argv) -> None:
    inputs = list(argv[1:])
    if not inputs:
        raise ValueError("name at least one video file or folder after the flags")
    videos = {f"input {index + 1}": path for index, path in enumerate(inputs)}
    # Before launch.start: a wrong path is named within a second, before JAX loads or the hosts join.
    official_weights.check_weights_argument(_WEIGHTS.value, "--weights")
    storage.check_paths(buckets={"--output_dir": _OUTPUT_DIR.value, **videos})
    launch.start(argv, positional=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("marlin_jax").setLevel(logging.INFO)
    from etils import epath
    from tqdm.contrib.logging import logging_redirect_tqdm

    from marlin_jax.video_features import ExtractionOptions, extract_to_directory
    from marlin_jax.marlin import Marlin
    options = ExtractionOptions(crop_face=_CROP_FACE.value, keep_seq=_KEEP_SEQ.value, sample_rate=_SAMPLE_RATE.value,
                                stride=_STRIDE.value, reduction=_REDUCTION.value, batch_size=_BATCH_SIZE.value)
    if _MODEL.value is not None:
        model = Marlin.from_file(_MODEL.value, _WEIGHTS.value, trust_pickled_checkpoint=_TRUST.value)
    elif official_weights.is_weights_name(_WEIGHTS.value):
        name, full_model = official_weights.parse_name(_WEIGHTS.value)
        model = Marlin.from_online(name, full_model=full_model)
    elif epath.Path(_WEIGHTS.value).is_dir():
        model = Marlin.from_checkpoint(_WEIGHTS.value)
    else:
        raise ValueError(f"--weights {_WEIGHTS.value} is a file: name its model with --model (an official name "
                         "such as marlin_vit_base_ytf, or a pretraining config)")
    with logging_redirect_tqdm():
        summary = extract_to_directory(model, inputs, _OUTPUT_DIR.value, options)
    print(f"wrote {len(summary.written)} feature file(s) to {_OUTPUT_DIR.value}; {len(summary.failed)} video(s) "
          "failed")
    for path, reason in summary.failed:
        print(f"  failed: {path}: {reason}")
    if summary.failed and not summary.written:
        sys.exit(1)


if __name__ == "__main__":
    launch.run(main)
