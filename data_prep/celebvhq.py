"""CelebV-HQ from its download to face crops and splits: the layout the CelebV-HQ probes and fine-tuning read.

    python -m data_prep.celebvhq --root /data/CelebV-HQ --workers 8
    # reads  <root>/celebvhq_info.json and <root>/downloaded/<clip id>.mp4
    # writes <root>/cropped/<clip id>.mp4, <root>/{train,val,test}.txt and <root>/celebvhq_crop.json

Rerunning the same command resumes. See `data_prep.celebvhq_crop` for what is written and how it differs from the
official preprocessing.
"""

from absl import flags, logging
from etils import epath

from data_prep.celebvhq_crop import REPORT_NAME, CropConfig, crop_celebvhq
from marlin_jax import launch, storage

_DEFAULTS = CropConfig(root="")
_ROOT = flags.DEFINE_string("root", None, "CelebV-HQ folder holding celebvhq_info.json and downloaded/<clip id>.mp4.")
_WORKERS = flags.DEFINE_integer("workers", _DEFAULTS.workers, "Worker processes.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Face crop side in px.")
_CRF = flags.DEFINE_integer("crf", _DEFAULTS.crf, "H.264 quality of the crops (lower is better and larger).")
_TRACKING = flags.DEFINE_bool("tracking", _DEFAULTS.tracking, "Track the face with the landmark model between "
                              "detections; --notracking runs the face detector on every frame (slower).")
flags.mark_flags_as_required(["root"])


def main(argv: list[str]) -> None:
    launch.check_arguments(argv)
    storage.check_paths(inputs={"--root": _ROOT.value})
    logging.set_verbosity(logging.INFO)
    report = crop_celebvhq(CropConfig(root=_ROOT.value, workers=_WORKERS.value, image_size=_IMAGE_SIZE.value,
                                      tracking=_TRACKING.value, crf=_CRF.value))
    counts, splits = report["counts"], report["splits"] or {}
    split_text = ", ".join(f"{name} {splits[name]}" for name in ("train", "val", "test") if name in splits)
    root = epath.Path(_ROOT.value)
    print(f"cropped {counts['cropped']} of {counts['videos']} videos into {root / 'cropped'}"
          f"{f' (splits: {split_text})' if split_text else ''}; {counts['failed']} failed, {counts['skipped']} "
          f"skipped, {counts['pending']} pending; details in {root / REPORT_NAME}")


if __name__ == "__main__":
    launch.run(main)
