"""Build TFRecord shards of face clips from raw videos (or YouTube Faces frame folders).

    python -m data_prep.build --input /data/videos --output /data/shards --workers 8
    python -m data_prep.build --input /data/YouTubeFaces --layout ytf \
        --split_csv_dir MARLIN/dataset/misc/youtube_face --output /data/ytf_shards

    # As an Apache Beam pipeline (the [beam] extra), here with DirectRunner's worker processes or on Dataflow:
    python -m data_prep.build --runner=DirectRunner --input /data/videos --output /data/shards --workers 8
    python -m data_prep.build --runner=DataflowRunner --project=P --region=us-central1 \
        --temp_location=gs://B/tmp --input gs://B/videos --output gs://B/shards

Rerunning the same command resumes an interrupted build. See `data_prep.build_state` for how,
`data_prep.local_build` for the local run, and `data_prep.beam_pipeline` for the pipeline.
"""

import functools

from absl import flags, logging

from data_prep.build_state import BuildConfig
from data_prep.local_build import build_dataset
from data_prep.manifest import manifest_summary
from data_prep.sources import LAYOUTS
from marlin_jax import launch, storage

_DEFAULTS = BuildConfig(input_dir="", output_dir="")
BEAM_RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner")

_INPUT = flags.DEFINE_string("input", None, "Folder holding the sources (local or gs://).")
_OUTPUT = flags.DEFINE_string("output", None, "Shard folder to create or resume (local or gs://).")
_LAYOUT = flags.DEFINE_enum("layout", _DEFAULTS.layout, LAYOUTS,
                            "videos: every video file below --input; ytf: frame_images_DB/<person>/<n>/*.jpg.")
_WORKERS = flags.DEFINE_integer("workers", _DEFAULTS.workers, "Worker processes (locally, and DirectRunner's).")
_SPLIT_CSV_DIR = flags.DEFINE_string("split_csv_dir", None,
                                     "Folder with train_set.csv and val_set.csv (column 'path' = source id).")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", _DEFAULTS.val_fraction,
                                   "Share of groups put in val when no split CSVs are given.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", _DEFAULTS.shard_size, "Sources per shard.")
_SEGMENT_FRAMES = flags.DEFINE_integer("segment_frames", _DEFAULTS.segment_frames,
                                       "Longer sources are stored as several records of about this many frames.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Face crop side in px.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", _DEFAULTS.jpeg_quality, "JPEG quality of the face crops.")
_TRACKING = flags.DEFINE_bool("tracking", True, "Track the face with the landmark model between detections; "
                              "--notracking runs the face detector on every frame (slower; see "
                              "marlin_jax.faces.tracking).")
_RUNNER = flags.DEFINE_enum("runner", None, BEAM_RUNNERS,
                            "Run the build as an Apache Beam pipeline on this runner; the flags this command does not "
                            "know are Beam pipeline options (--project, --region, --temp_location, ...). Without it: "
                            "local worker processes.")
flags.mark_flags_as_required(["input", "output"])


def build_config(pipeline_args: list[str]) -> BuildConfig:
    """The build's config from the parsed flags; checks what the flags cannot check alone."""
    if pipeline_args and _RUNNER.value is None:
        raise ValueError(f"unknown flags: {' '.join(pipeline_args)} (Beam pipeline options need --runner)")
    if _RUNNER.value == "DataflowRunner" and not (storage.is_remote(_INPUT.value) and storage.is_remote(_OUTPUT.value)):
        raise ValueError("--runner=DataflowRunner runs on other machines, which cannot read this one's disk: give "
                         "--input and --output as bucket paths (gs://...)")
    return BuildConfig(input_dir=_INPUT.value, output_dir=_OUTPUT.value, layout=_LAYOUT.value, workers=_WORKERS.value,
                       split_csv_dir=_SPLIT_CSV_DIR.value, val_fraction=_VAL_FRACTION.value,
                       shard_size=_SHARD_SIZE.value, segment_frames=_SEGMENT_FRAMES.value,
                       image_size=_IMAGE_SIZE.value, jpeg_quality=_JPEG_QUALITY.value, tracking=_TRACKING.value)


def _build_with_beam(config: BuildConfig, runner: str, pipeline_args: list[str]) -> dict:
    try:
        from data_prep.beam_pipeline import build_with_beam  # the optional [beam] extra
    except ModuleNotFoundError as error:
        if error.name != "apache_beam":
            raise
        raise ImportError("--runner needs Apache Beam: pip install 'marlin_jax[beam]'") from error
    manifest, _ = build_with_beam(config, runner, pipeline_args)  # the counters are logged
    return manifest


def main(argv: list[str]) -> None:
    pipeline_args = list(argv[1:])
    config = build_config(pipeline_args)
    # A wrong path is named within a second, before any work.
    storage.check_paths(inputs={"--input": config.input_dir, "--split_csv_dir": config.split_csv_dir},
                        buckets={"--output": config.output_dir})
    logging.set_verbosity(logging.INFO)
    # A full disk is a storage.DiskFullError whose message names the file, the space needed and what to do:
    # launch.run prints it as one line.
    manifest = build_dataset(config) if _RUNNER.value is None else _build_with_beam(config, _RUNNER.value,
                                                                                     pipeline_args)
    print(manifest_summary(manifest, config.output_dir))


if __name__ == "__main__":
    # Flags this command does not know go to Beam (main's argv), which names any it does not know either.
    launch.run(main, flags_parser=functools.partial(launch.parse_flags, known_only=True))
