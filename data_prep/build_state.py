"""What a shard build is and how it resumes, whoever runs it: `BuildConfig`, and `BuildState` (the plan, the finished
work, assembling shards, the manifest). `data_prep.local_build` runs a build in local worker processes,
`data_prep.beam_pipeline` as an Apache Beam pipeline.

Work happens per source (`data_prep.process`): each finished source leaves a part file and a status file
under `<output>/_work/`. When all sources of a planned shard are finished, their parts are concatenated (in
plan order) into the shard, which appears whole or not at all (`marlin_jax.storage.write_once`: renamed into
place on a local disk, an upload finalised at the end in a bucket), the manifest is rewritten the same way,
and only then are the parts deleted. A rerun therefore skips finished shards (manifest) and finished sources
(status files), and redoes at most the sources that were in flight; shard files that exist but are not
marked done in the manifest are rebuilt, and loaders read only the manifest's list. The manifest that says
`complete` is written after the last shard.

The input and the output may be local folders or bucket paths (`etils.epath`).
"""

import dataclasses
import os
import shutil

from absl import logging
from etils import epath

from data_prep import process
from data_prep.manifest import make_manifest, tool_versions
from data_prep.plan import ShardPlan, part_name, plan_fingerprint
from data_prep.sources import Source
from marlin_jax import storage
from marlin_jax.data.shards import MANIFEST_NAME, load_manifest

WORK_DIR = "_work"
_COPY_CHUNK_BYTES = 4 * 2**20  # parts are copied into a shard in reads this large: few requests to a bucket


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    input_dir: str
    output_dir: str
    layout: str = "videos"
    workers: int = os.cpu_count() or 1
    split_csv_dir: str | None = None
    val_fraction: float = 0.05
    shard_size: int = 64  # sources per shard
    segment_frames: int = 256
    image_size: int = 224
    jpeg_quality: int = 95
    tracking: bool = True  # detect, then track with the landmark model; False: the detector on every frame

    def content_settings(self) -> dict:
        """The settings that decide what the shards hold (not where, nor how fast)."""
        return {"layout": self.layout, "shard_size": self.shard_size, "segment_frames": self.segment_frames,
                "image_size": self.image_size, "jpeg_quality": self.jpeg_quality, "face_tracking": self.tracking}


class BuildState:
    """The state of one build: which shards are done, which sources are finished, the manifest. Shared with
    the Beam pipeline (`data_prep.beam_pipeline`)."""

    def __init__(self, config: BuildConfig, shards: list[ShardPlan], skipped: list[dict]):
        self.config = config
        self.shards = shards
        self.output = epath.Path(config.output_dir)
        self.work = self.output / WORK_DIR
        self.skipped = skipped
        self.fingerprint = plan_fingerprint(shards, config.content_settings())
        self.versions = tool_versions()
        self.shard_of = {source.source_id: shard for shard in shards for source in shard.sources}
        self.done_shards: set[str] = set()
        self.statuses: dict[str, dict] = {}

    def part_path(self, source: Source) -> epath.Path:
        return self.work / source.split / f"{part_name(source.source_id)}.tfrecord"

    def resume(self) -> None:
        """Loads what an earlier run finished, writes the manifest, and assembles any complete shard."""
        self.output.mkdir(parents=True, exist_ok=True)
        storage.remove_temporaries(self.output)  # a killed run's half-written files only take space
        if (self.output / MANIFEST_NAME).is_file():
            self._adopt_manifest(load_manifest(self.output))
        finished = self._status_files()
        for shard in self.shards:
            if shard.file in self.done_shards:
                continue
            for source in shard.sources:
                if process.status_path(self.part_path(source)) in finished:
                    self.statuses[source.source_id] = process.read_status(self.part_path(source))
        self._write_manifest()
        for shard in self.shards:
            self._assemble_if_complete(shard)

    def _status_files(self) -> set[epath.Path]:
        """The status files of finished sources, found with one listing (not a request per source in a bucket)."""
        if not self.work.is_dir():
            return set()
        return {path for path in storage.files_under(self.work) if path.suffix == ".json"}

    def _adopt_manifest(self, manifest: dict) -> None:
        if manifest["plan_fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.output} holds a build with other sources or settings "
                             f"({manifest['settings']}); use a new output directory")
        if manifest["versions"] != self.versions:
            logging.warning("resuming a build made with other tool versions; the manifest records the new ones")
        self.done_shards = {shard["file"] for shard in manifest["shards"]
                            if shard["status"] == "done" and (self.output / shard["file"]).is_file()}
        self.statuses = {entry["source_id"]: entry for entry in manifest["sources"]
                         if entry["shard"] in self.done_shards}

    def pending_sources(self) -> list[Source]:
        return [source for shard in self.shards if shard.file not in self.done_shards
                for source in shard.sources if source.source_id not in self.statuses]

    def failed_count(self) -> int:
        return sum(status["status"] == "failed" for status in self.statuses.values())

    def record(self, status: dict) -> None:
        self.statuses[status["source_id"]] = status
        self._assemble_if_complete(self.shard_of[status["source_id"]])

    def _assemble_if_complete(self, shard: ShardPlan) -> None:
        if shard.file in self.done_shards or any(s.source_id not in self.statuses for s in shard.sources):
            return
        write_shard(self.output / shard.file,
                    [self.part_path(s) for s in shard.sources if self.statuses[s.source_id]["status"] == "ok"])
        self.done_shards.add(shard.file)
        self._write_manifest()
        for source in shard.sources:
            self.part_path(source).unlink(missing_ok=True)
            process.status_path(self.part_path(source)).unlink(missing_ok=True)

    def add_done_shard(self, shard_file: str, statuses: list[dict]) -> None:
        """Records a shard written elsewhere (by a Beam worker) and the statuses of its sources."""
        self.statuses.update((status["source_id"], status) for status in statuses)
        self.done_shards.add(shard_file)

    def _write_manifest(self) -> dict:
        manifest = make_manifest(shards=self.shards, done_shards=self.done_shards, statuses=self.statuses,
                                 skipped=self.skipped, settings=self.config.content_settings(),
                                 input_dir=_absolute(self.config.input_dir),
                                 fingerprint=self.fingerprint, versions=self.versions)
        storage.write_json(self.output / MANIFEST_NAME, manifest)
        return manifest

    def disk_full(self, error: storage.DiskFullError) -> storage.DiskFullError:
        """`error`, with what the rest of the build needs and how to finish it."""
        storage.remove_temporaries(self.output)  # worker processes stopped mid-write leave theirs
        pending = len(self.pending_sources())
        finished_bytes, finished_sources = self._finished_output()
        if finished_sources:
            per_source = finished_bytes / finished_sources
            needed = per_source * (pending + self.config.shard_size)
            free = shutil.disk_usage(self.output).free
            size = storage.format_size
            estimate = (f"the {pending} sources left need about {size(needed)} more (at the {size(per_source)} per "
                        f"source written so far, plus room to assemble a shard) and {size(free)} is free")
        else:
            estimate = f"no source has finished yet, so what the {pending} sources need is not known"
        return storage.DiskFullError(error.errno, (
            f"{error.strerror}. In {self.output}, {estimate}. Finished shards ({len(self.done_shards)} of "
            f"{len(self.shards)}) and sources are kept: free space and rerun the same command to finish the build."))

    def _finished_output(self) -> tuple[int, int]:
        """Bytes written for the finished sources (in done shards and in part files), and their count."""
        size, count = 0, 0
        for shard in self.shards:
            ok = [s for s in shard.sources if self.statuses.get(s.source_id, {}).get("status") == "ok"]
            if shard.file in self.done_shards:
                size, count = size + (self.output / shard.file).stat().length, count + len(ok)
                continue
            parts = [path for path in map(self.part_path, ok) if path.is_file()]
            size, count = size + sum(path.stat().length for path in parts), count + len(parts)
        return size, count

    def finish(self) -> dict:
        manifest = self._write_manifest()
        if manifest["complete"] and self.work.exists():
            self.work.rmtree()
        return manifest


def write_shard(path: epath.Path, parts: list[epath.Path]) -> None:
    """Concatenates the part files, in order, into the shard `path`, which appears whole or not at all."""
    if not storage.is_remote(path):
        size = sum(part.stat().length for part in parts)
        if shutil.disk_usage(path.parent).free < size:
            raise storage.disk_full_error(path, f"assembling it needs {storage.format_size(size)}")
    with storage.write_once(path) as out:
        for part in parts:
            with part.open("rb") as data:
                shutil.copyfileobj(data, out, _COPY_CHUNK_BYTES)


def _absolute(path: str) -> str:
    return path if storage.is_remote(path) else str(epath.Path(path).resolve())
