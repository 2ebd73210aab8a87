"""Build TFRecord shards of face clips from raw videos (or YouTube Faces frame folders).

    python -m data_prep.build --input /data/videos --output /data/shards --workers 8
    python -m data_prep.build --input /data/YouTubeFaces --layout ytf \
        --split-csv-dir MARLIN/dataset/misc/youtube_face --output /data/ytf_shards

Rerunning the same command resumes an interrupted build. See `data_prep.builder` for how.
"""

import argparse
import json
import sys

from absl import logging

from data_prep.atomic import DiskFullError
from data_prep.builder import BuildConfig, build_dataset
from data_prep.sources import LAYOUTS

_DEFAULTS = BuildConfig(input_dir="", output_dir="")


def parse_args(argv: list[str]) -> BuildConfig:
    parser = argparse.ArgumentParser(prog="python -m data_prep.build", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="folder holding the sources")
    parser.add_argument("--output", required=True, help="shard folder to create or resume")
    parser.add_argument("--layout", choices=LAYOUTS, default=_DEFAULTS.layout,
                        help="videos: every video file below --input; ytf: frame_images_DB/<person>/<n>/*.jpg")
    parser.add_argument("--workers", type=int, default=_DEFAULTS.workers, help="worker processes")
    parser.add_argument("--split-csv-dir", default=None,
                        help="folder with train_set.csv and val_set.csv (column 'path' = source id)")
    parser.add_argument("--val-fraction", type=float, default=_DEFAULTS.val_fraction,
                        help="share of groups put in val when no split CSVs are given")
    parser.add_argument("--shard-size", type=int, default=_DEFAULTS.shard_size, help="sources per shard")
    parser.add_argument("--segment-frames", type=int, default=_DEFAULTS.segment_frames,
                        help="longer sources are stored as several records of about this many frames")
    parser.add_argument("--image-size", type=int, default=_DEFAULTS.image_size, help="face crop side in px")
    parser.add_argument("--jpeg-quality", type=int, default=_DEFAULTS.jpeg_quality)
    parser.add_argument("--no-tracking", dest="tracking", action="store_false",
                        help="run the face detector on every frame instead of tracking the face with the landmark "
                             "model between detections (slower; see marlin_jax.faces.tracking)")
    args = parser.parse_args(argv)
    return BuildConfig(input_dir=args.input, output_dir=args.output, layout=args.layout, workers=args.workers,
                       split_csv_dir=args.split_csv_dir, val_fraction=args.val_fraction,
                       shard_size=args.shard_size, segment_frames=args.segment_frames,
                       image_size=args.image_size, jpeg_quality=args.jpeg_quality, tracking=args.tracking)


def main(argv: list[str] | None = None) -> None:
    logging.set_verbosity(logging.INFO)
    try:
        manifest = build_dataset(parse_args(sys.argv[1:] if argv is None else argv))
    except DiskFullError as error:  # its message names the file, the space needed and what to do
        print(f"error: {error.strerror}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"complete": manifest["complete"], "splits": manifest["splits"],
                      "failures": len(manifest["failures"]), "skipped": len(manifest["skipped"])}, indent=1))


if __name__ == "__main__":
    main()
