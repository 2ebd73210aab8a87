"""The shard build as an Apache Beam pipeline: `python -m data_prep.build --runner=...` (the `[beam]` extra).

The sources, the shard plan, the per-source code, the shards and the manifest are the local build's
(`data_prep.build_state`), so a source gives the same records either way. What changes is who runs the sources:
any Beam runner, from DirectRunner's processes on one machine to Dataflow, Flink or Spark workers.

The launcher (the machine that runs the command) plans the build and adopts what an earlier run finished, as a
local build does (`BuildState.resume`), then writes the plan and the work left under `<output>/_work/`: a
million sources inlined in the pipeline graph would exceed what a runner accepts (Dataflow takes 20 MB). The
pipeline then
1. reads the task files and spreads the tasks over the workers;
2. runs `process.process_source` on each source with a face cropper that each DoFn instance loads once, in
   `setup`; the part file and the status land in `_work/`, as in a local build;
3. groups the statuses by shard and concatenates each shard's parts in plan order (`build_state.write_shard`);
4. writes manifest.json from all statuses through `BuildState`, as a local build does, and removes `_work/`.

A source that cannot be decoded or shows no face gets a `failed` status with the reason (process_source
decides, as in a local build) and the job goes on. Any other error fails the job, after the runner's retries,
with the finished work kept: every file appears whole or not at all, a retried source or shard is rewritten
with the same bytes, and running the same command again adopts the finished sources and shards and gives the
same shards as an uninterrupted run.
"""

import dataclasses
import json
import operator
from collections.abc import Callable, Iterable, Iterator

import apache_beam as beam
import cv2
from absl import logging
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult
from etils import epath

from data_prep import process
from data_prep.build_state import BuildConfig, BuildState, write_shard
from data_prep.local_build import default_cropper_factory
from data_prep.plan import ShardPlan, plan_shards
from data_prep.sources import Source, plan_sources
from marlin_jax import storage
from marlin_jax.data.shards import load_manifest

_TASKS_PER_FILE = 4096
_PLAN_NAME = "plan.json"
_TASKS_DIR = "tasks"
_METRICS = "data_prep"


class PipelineOptionsError(ValueError):
    """Arguments that are neither build options nor pipeline options of the chosen runner."""


def build_with_beam(config: BuildConfig, runner: str, pipeline_args: list[str],
                    cropper_factory: Callable[[], process.Cropper] | None = None) -> tuple[dict, dict[str, int]]:
    """Builds (or finishes building) the shard directory as a Beam pipeline; returns the final manifest and the
    pipeline's counters (`counters`; empty when nothing was left to process).

    `pipeline_args` are Beam pipeline options (`--project=...`). DirectRunner defaults to `config.workers`
    worker processes."""
    if config.workers < 1:
        raise ValueError(f"workers must be at least 1, got {config.workers}")
    options = pipeline_options(runner, config.workers, pipeline_args)
    config = dataclasses.replace(config, input_dir=_absolute(config.input_dir),
                                 output_dir=_absolute(config.output_dir))
    sources, skipped = plan_sources(config.input_dir, config.layout, config.split_csv_dir, config.val_fraction)
    state = BuildState(config, plan_shards(sources, config.shard_size), skipped)
    try:
        state.resume()
    except storage.DiskFullError as error:
        raise state.disk_full(error) from error
    tasks = _tasks(state)
    if not tasks:  # everything was finished, or assembled just now from finished sources
        return state.finish(), {}
    logging.info("%d sources in %d shards; %d left to process, on %s", len(state.shard_of), len(state.shards),
                 sum(task["status"] is None for task in tasks), runner)
    plan_file = _write_plan(state)
    task_files = _write_tasks(state.work / _TASKS_DIR, tasks)
    pipeline = beam.Pipeline(options=options)
    _add_build(pipeline, config, cropper_factory or default_cropper_factory(config.image_size, config.tracking),
               plan_file, task_files)
    result = pipeline.run()
    result.wait_until_finish()
    totals = counters(result)
    logging.info("Beam counters: %s", json.dumps(totals))
    return load_manifest(state.output), totals


def pipeline_options(runner: str, workers: int, pipeline_args: list[str]) -> PipelineOptions:
    """The options for `runner`; PipelineOptionsError names any argument that no option of Beam or of the
    runner takes (Beam would only log it and drop it: a mistyped build flag, `--shard_sise`, would be lost)."""
    # DirectRunner runs in one thread unless told otherwise; `--workers` then means what it means locally.
    # Options given in `pipeline_args` come later and win.
    direct = [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    options = PipelineOptions([f"--runner={runner}", *(direct if runner == "DirectRunner" else []), *pipeline_args])
    # Beam keeps an unknown flag under its name with '_' for '-': a new key, or a known option's key (--flink-master
    # for --flink_master) whose value it changes.
    known = options.get_all_options()
    unknown = {key for key, value in options.get_all_options(retain_unknown_options=True).items()
               if key not in known or known[key] != value}
    flags = [arg for arg in pipeline_args if arg.startswith("-") and
             arg.lstrip("-").split("=", 1)[0].replace("-", "_") in unknown]
    if unknown:
        raise PipelineOptionsError(f"{' '.join(flags) or ', '.join(sorted(unknown))}: neither a build option "
                                   f"(see python -m data_prep.build --help) nor a pipeline option of {runner}")
    return options


def counters(result: PipelineResult) -> dict[str, int]:
    """The pipeline's data_prep counters (sources processed and failed, frames, face-model loads)."""
    found = result.metrics().query(MetricsFilter().with_namespace(_METRICS))["counters"]
    totals: dict[str, int] = {}
    for counter in found:  # one entry per step that updates the counter
        # Committed: without the attempts the runner retried. A runner that does not commit reports attempts.
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + value
    return totals


def _absolute(path: str) -> str:
    # Workers (and the manifest step) must find the same files whatever their working directory.
    return path if storage.is_remote(path) else str(epath.Path(path).resolve())


def _tasks(state: BuildState) -> list[dict]:
    """One task per source of each unfinished shard: the source to process, or the status of an earlier run."""
    return [{"shard": shard.file, "index": index, "source": dataclasses.asdict(source),
             "part": str(state.part_path(source)), "status": state.statuses.get(source.source_id)}
            for shard in state.shards if shard.file not in state.done_shards
            for index, source in enumerate(shard.sources)]


def _write_plan(state: BuildState) -> str:
    """What the manifest step needs to rebuild `state` on a worker: the plan, skipped sources, done shards."""
    plan = {"skipped": state.skipped,
            "shards": [{"file": shard.file, "split": shard.split,
                        "sources": [dataclasses.asdict(source) for source in shard.sources]}
                       for shard in state.shards],
            "done": {shard.file: [state.statuses[source.source_id] for source in shard.sources]
                     for shard in state.shards if shard.file in state.done_shards}}
    state.work.mkdir(parents=True, exist_ok=True)
    path = state.work / _PLAN_NAME
    storage.write_json(path, plan)
    return str(path)


def _write_tasks(folder: epath.Path, tasks: list[dict]) -> list[str]:
    """The tasks as JSON lines in files of `_TASKS_PER_FILE` (a rerun's list replaces the last one's)."""
    if folder.exists():
        folder.rmtree()
    folder.mkdir(parents=True)
    paths = []
    for start in range(0, len(tasks), _TASKS_PER_FILE):
        path = folder / f"tasks-{start // _TASKS_PER_FILE:05d}.jsonl"
        storage.write_bytes_once(path, "".join(json.dumps(task) + "\n" for task in
                                               tasks[start:start + _TASKS_PER_FILE]).encode())
        paths.append(str(path))
    return paths


def _read_tasks(path: str) -> Iterator[dict]:
    for line in epath.Path(path).read_text().splitlines():
        yield json.loads(line)


def _add_build(pipeline: beam.Pipeline, config: BuildConfig, cropper_factory: Callable[[], process.Cropper],
               plan_file: str, task_files: list[str]) -> None:
    settings = process.EncodeSettings(config.layout, config.segment_frames, config.jpeg_quality)
    _ = (pipeline
         | "TaskFiles" >> beam.Create(task_files)
         | "ReadTasks" >> beam.FlatMap(_read_tasks)
         | "Spread" >> beam.Reshuffle()  # one task file's sources over all the workers
         | "ProcessSources" >> beam.ParDo(_ProcessSource(cropper_factory, settings))
         | "ByShard" >> beam.GroupByKey()
         | "AssembleShards" >> beam.ParDo(_AssembleShard(config.output_dir))
         | "AllShards" >> beam.combiners.ToList()
         | "WriteManifest" >> beam.ParDo(_WriteManifest(config, plan_file)))


class _ProcessSource(beam.DoFn):
    """A task -> (shard file, (index in the shard, part path, status)), processing its source unless an earlier
    run did."""

    def __init__(self, cropper_factory: Callable[[], process.Cropper], settings: process.EncodeSettings):
        self._cropper_factory = cropper_factory
        self._settings = settings
        self._model_loads = Metrics.counter(_METRICS, "face_model_loads")
        self._processed = Metrics.counter(_METRICS, "sources_processed")
        self._failed = Metrics.counter(_METRICS, "sources_failed")
        self._frames = Metrics.counter(_METRICS, "frames_decoded")

    def setup(self) -> None:
        # One source at a time per instance, one thread each: OpenCV's and FFmpeg's pools would only compete
        # with the runner's other workers (see local_build._init_worker and process.DECODE_THREADS).
        cv2.setNumThreads(1)
        self._cropper = self._cropper_factory()
        self._load_counted = False  # a counter updated in setup is not reported: counted with the first source

    def process(self, task: dict) -> Iterator[tuple[str, tuple[int, str, dict]]]:
        status = task["status"]
        if status is None:
            status = process.process_source(Source(**task["source"]), epath.Path(task["part"]), self._cropper,
                                            self._settings)
            self._count(status)
        yield task["shard"], (task["index"], task["part"], status)

    def _count(self, status: dict) -> None:
        if not self._load_counted:
            self._model_loads.inc()
            self._load_counted = True
        self._processed.inc()
        if status["status"] == "failed":
            self._failed.inc()
        self._frames.inc(status["num_frames"])


class _AssembleShard(beam.DoFn):
    """(shard file, its sources' results) -> the shard written, and (shard file, statuses in plan order)."""

    def __init__(self, output_dir: str):
        self._output_dir = output_dir

    def process(self, element: tuple[str, Iterable[tuple[int, str, dict]]]) -> Iterator[tuple[str, list[dict]]]:
        shard_file, members = element
        members = sorted(members, key=operator.itemgetter(0))
        write_shard(epath.Path(self._output_dir) / shard_file,
                    [epath.Path(part) for _, part, status in members if status["status"] == "ok"])
        yield shard_file, [status for _, _, status in members]


class _WriteManifest(beam.DoFn):
    """Every assembled shard -> manifest.json, written by the local build's `BuildState`; `_work/` removed."""

    def __init__(self, config: BuildConfig, plan_file: str):
        self._config = config
        self._plan_file = plan_file

    def process(self, assembled: list[tuple[str, list[dict]]]) -> None:
        plan = json.loads(epath.Path(self._plan_file).read_text())
        shards = [ShardPlan(shard["file"], shard["split"], tuple(Source(**source) for source in shard["sources"]))
                  for shard in plan["shards"]]
        state = BuildState(self._config, shards, plan["skipped"])
        for shard_file, statuses in [*plan["done"].items(), *assembled]:
            state.add_done_shard(shard_file, statuses)
        state.finish()
