"""Make the demo dataset: face videos synthesised on the spot (no download), built into shards like real data.

    python -m data_prep.demo --output runs/demo
    # -> runs/demo/videos/*.mp4 and runs/demo/shards (manifest + shards)

See data_prep.demo_videos for how the videos are made.
"""

from pathlib import Path

from absl import flags

from data_prep.demo_videos import make_demo_dataset
from data_prep.manifest import manifest_summary
from marlin_jax import launch
from marlin_jax.config_builders import DEMO_IMAGE_SIZE

_OUTPUT = flags.DEFINE_string("output", None, "Folder for videos/ and shards/.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 10, "How many videos to synthesise.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes for the build.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", DEMO_IMAGE_SIZE, "Face crop side in px.")
flags.mark_flags_as_required(["output"])


def main(argv: list[str]) -> None:
    launch.check_arguments(argv)
    output = Path(_OUTPUT.value)
    manifest = make_demo_dataset(output, num_videos=_NUM_VIDEOS.value, workers=_WORKERS.value,
                                 image_size=_IMAGE_SIZE.value)
    print(f"wrote {_NUM_VIDEOS.value} videos to {output / 'videos'}; {manifest_summary(manifest, output / 'shards')}")


if __name__ == "__main__":
    launch.run(main)
