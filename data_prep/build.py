"""Build TFRecord shards of face clips from raw videos (or YouTube Faces frame folders).

    python -m data_prep.build --input /data/videos --output /data/shards --workers 8
    python -m data_prep.build --input /data/YouTubeFaces --layout ytf \
        --split-csv-dir MARLIN/dataset/misc/youtube_face --output /data/ytf_shards

    # As an Apache Beam pipeline (the [beam] extra), here with DirectRunner's worker processes or on Dataflow:
    python -m data_prep.build --runner=DirectRunner --input /data/videos --output /data/shards --workers 8
    python -m data_prep.build --runner=DataflowRunner --project=P --region=us-central1 \
        --temp_location=gs://B/tmp --input gs://B/videos --output gs://B/shards

Rerunning the same command resumes an interrupted build. See `data_prep.builder` for how, and
`data_prep.beam_pipeline` for the pipeline.
"""

import argparse
import json
import sys

from absl import logging

from data_prep.atomic import DiskFullError
from data_prep.builder import BuildConfig, build_dataset
from data_prep.sources import LAYOUTS
from marlin_jax import storage

_DEFAULTS = BuildConfig(input_dir="", output_dir="")
BEAM_RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner")


def parse_args(argv: list[str]) -> tuple[BuildConfig, str | None, list[str]]:
    """The build's config, the Beam runner (None: local worker processes) and the Beam pipeline options."""
    # No abbreviations: an option this command does not know exactly is a Beam pipeline option.
    parser = argparse.ArgumentParser(prog="python -m data_prep.build", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--input", required=True, help="folder holding the sources")
    parser.add_argument("--output", required=True, help="shard folder to create or resume")
    parser.add_argument("--layout", choices=LAYOUTS, default=_DEFAULTS.layout,
                        help="videos: every video file below --input; ytf: frame_images_DB/<person>/<n>/*.jpg")
    parser.add_argument("--workers", type=int, default=_DEFAULTS.workers,
                        help="worker processes (locally, and DirectRunner's)")
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
    parser.add_argument("--runner", choices=BEAM_RUNNERS, default=None,
                        help="run the build as an Apache Beam pipeline on this runner; the arguments this command "
                             "does not know are Beam pipeline options (--project, --region, --temp_location, ...). "
                             "Without it: local worker processes")
    args, pipeline_args = parser.parse_known_args(argv)
    if pipeline_args and args.runner is None:
        parser.error(f"unrecognized arguments: {' '.join(pipeline_args)} (Beam pipeline options need --runner)")
    if args.runner == "DataflowRunner" and not (storage.is_remote(args.input) and storage.is_remote(args.output)):
        parser.error("--runner=DataflowRunner runs on other machines, which cannot read this one's disk: give "
                     "--input and --output as bucket paths (gs://...)")
    config = BuildConfig(input_dir=args.input, output_dir=args.output, layout=args.layout, workers=args.workers,
                         split_csv_dir=args.split_csv_dir, val_fraction=args.val_fraction,
                         shard_size=args.shard_size, segment_frames=args.segment_frames,
                         image_size=args.image_size, jpeg_quality=args.jpeg_quality, tracking=args.tracking)
    return config, args.runner, pipeline_args


def _build_with_beam(config: BuildConfig, runner: str, pipeline_args: list[str]) -> dict:
    try:
        from data_prep.beam_pipeline import PipelineOptionsError, build_with_beam  # the optional [beam] extra
    except ModuleNotFoundError as error:
        if error.name != "apache_beam":
            raise
        print("error: --runner needs Apache Beam: pip install 'marlin_jax[beam]'", file=sys.stderr)
        sys.exit(2)
    try:
        manifest, _ = build_with_beam(config, runner, pipeline_args)  # the counters are logged
    except PipelineOptionsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return manifest


def main(argv: list[str] | None = None) -> None:
    logging.set_verbosity(logging.INFO)
    config, runner, pipeline_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        storage.check_paths(inputs={"--input": config.input_dir, "--split-csv-dir": config.split_csv_dir},
                            buckets={"--output": config.output_dir})
    except storage.StorageError as error:  # a wrong path, said in one line as the other entry points do
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        manifest = build_dataset(config) if runner is None else _build_with_beam(config, runner, pipeline_args)
    except DiskFullError as error:  # its message names the file, the space needed and what to do
        print(f"error: {error.strerror}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"complete": manifest["complete"], "splits": manifest["splits"],
                      "failures": len(manifest["failures"]), "skipped": len(manifest["skipped"])}, indent=1))


if __name__ == "__main__":
    main()
