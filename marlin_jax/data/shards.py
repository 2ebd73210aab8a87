"""The shard directory that `data_prep.build` writes: `manifest.json` plus `<split>-NNNNN-of-MMMMM.tfrecord`.

Readers take the shard list from the manifest, never from a directory listing, so a file that a running
or interrupted build left behind is never read. The directory may be local or in a bucket (`etils.epath`).
The manifest's layout is documented in `data_prep.manifest`.
"""

import json
import os

from etils import epath

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "marlin_jax.face_clips.tfrecord"
FORMAT_VERSION = 1


def shard_file_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def load_manifest(data_dir: str | os.PathLike) -> dict:
    path = epath.Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{data_dir} has no {MANIFEST_NAME}; build it with `python -m data_prep.build`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a v{FORMAT_VERSION} {FORMAT_NAME} manifest")
    return manifest


def split_shard_paths(data_dir: str | os.PathLike, split: str) -> list[epath.Path]:
    """The finished, non-empty shards of `split`, in manifest order; ValueError if the build is unfinished."""
    manifest = load_manifest(data_dir)
    if not manifest["complete"]:
        raise ValueError(f"the build in {data_dir} is unfinished ({manifest['shards_done']} of "
                         f"{len(manifest['shards'])} shards); rerun `python -m data_prep.build` to finish it")
    if split not in manifest["splits"]:
        raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
    return [epath.Path(data_dir) / shard["file"] for shard in manifest["shards"]
            if shard["split"] == split and shard["num_records"] > 0]
