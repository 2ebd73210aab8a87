"""`manifest.json`: what a build made, what it skipped and why, and with which tools.

    format, format_version   "marlin_jax.face_clips.tfrecord", 1
    complete                 true once every shard is written; loaders refuse an unfinished build
    shards_done              finished shard count
    updated                  UTC time of the last write
    settings                 the build settings that decide the contents (layout, sizes, quality, ...)
    input_dir                where the sources were read from
    plan_fingerprint         hash of settings + shard plan; a rerun with other settings is refused
    versions                 Python packages, FFmpeg libraries and face-model file hashes used
    splits                   per split: sources, ok, failed, pending, records, frames (stored), shards
    shards                   [{file, split, status: done|pending, num_sources, num_records, num_frames}]
    sources                  [{source_id, split, shard, status: ok|failed|pending, reason?, num_frames
                               (decoded), num_records, stored_frames, frames_with_face,
                               segments_without_face (no face at all: not stored), seconds}]
    failures                 [{source_id, reason}] for every failed source
    skipped                  [{source_id, reason}] sources left out by the split CSVs
"""

import datetime
import hashlib
import platform
from importlib import metadata, resources

import av
from etils import epath

from data_prep.plan import ShardPlan
from data_prep.sources import SPLITS
from marlin_jax.data.shards import FORMAT_NAME, FORMAT_VERSION

_PACKAGES = ("marlin_jax", "av", "numpy", "opencv-contrib-python", "mediapipe", "ai-edge-litert",
             "google-crc32c", "tensorflow-datasets", "protobuf")
_FACE_MODELS_PACKAGE = "marlin_jax.faces"


def tool_versions() -> dict:
    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    ffmpeg = {lib: ".".join(map(str, version)) for lib, version in av.library_versions.items()}
    return {"python": platform.python_version(), "packages": packages, "ffmpeg": ffmpeg,
            "face_models_sha256": _face_model_hashes()}


def _face_model_hashes() -> dict:
    assets = resources.files(_FACE_MODELS_PACKAGE) / "assets"
    return {entry.name: hashlib.sha256(entry.read_bytes()).hexdigest()
            for entry in sorted(assets.iterdir(), key=lambda e: e.name) if entry.name.endswith(".tflite")}


def make_manifest(*, shards: list[ShardPlan], done_shards: set[str], statuses: dict[str, dict],
                  skipped: list[dict], settings: dict, input_dir: str, fingerprint: str,
                  versions: dict) -> dict:
    """The manifest for the current state of a build; `statuses` maps source id -> its process status."""
    sources, shard_entries = [], []
    for shard in shards:
        entries = [_source_entry(source.source_id, source.split, shard.file, statuses)
                   for source in shard.sources]
        sources += entries
        shard_entries.append({
            "file": shard.file, "split": shard.split,
            "status": "done" if shard.file in done_shards else "pending",
            "num_sources": len(entries),
            "num_records": sum(e.get("num_records", 0) for e in entries if e["status"] == "ok"),
            "num_frames": sum(e.get("stored_frames", 0) for e in entries if e["status"] == "ok"),
        })
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "complete": len(done_shards) == len(shards), "shards_done": len(done_shards),
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings, "input_dir": input_dir, "plan_fingerprint": fingerprint, "versions": versions,
        "splits": _split_counts(sources, shard_entries),
        "shards": shard_entries, "sources": sources,
        "failures": [{"source_id": e["source_id"], "reason": e["reason"]} for e in sources
                     if e["status"] == "failed"],
        "skipped": skipped,
    }


def _source_entry(source_id: str, split: str, shard_file: str, statuses: dict[str, dict]) -> dict:
    status = statuses.get(source_id, {"status": "pending"})
    return {"source_id": source_id, "split": split, "shard": shard_file,
            **{key: value for key, value in status.items() if key not in ("source_id", "split")}}


def _split_counts(sources: list[dict], shard_entries: list[dict]) -> dict:
    counts = {}
    for split in SPLITS:
        members = [entry for entry in sources if entry["split"] == split]
        ok = [entry for entry in members if entry["status"] == "ok"]
        counts[split] = {
            "sources": len(members), "ok": len(ok),
            "failed": sum(entry["status"] == "failed" for entry in members),
            "pending": sum(entry["status"] == "pending" for entry in members),
            "records": sum(entry["num_records"] for entry in ok),
            "frames": sum(entry["stored_frames"] for entry in ok),
            "shards": sum(shard["split"] == split for shard in shard_entries),
        }
    return counts


def manifest_summary(manifest: dict, output) -> str:
    """One line: what the build holds and where its manifest is."""
    splits = ", ".join(f"{split} {counts['ok']} sources, {counts['records']} records, {counts['shards']} shards"
                       for split, counts in manifest["splits"].items() if counts["sources"])
    state = "complete" if manifest["complete"] else "incomplete (rerun the same command to finish it)"
    return (f"build {state}: {splits or 'no sources'}; {len(manifest['failures'])} source(s) failed, "
            f"{len(manifest['skipped'])} skipped; details in {epath.Path(output) / 'manifest.json'}")
