"""The build plan: which sources go into which shard file, fixed before any work starts.

Within a split, sources are ordered by a hash of their id (so a shard mixes people and folders rather than
holding one alphabetical run) and cut into shards of `shard_size` sources. The plan depends only on the
sources and the settings, so a rerun over the same input recomputes the same plan and can tell finished work
from unfinished; its fingerprint, stored in the manifest, guards against resuming with other settings.
"""

import dataclasses
import hashlib
import json

from data_prep.sources import SPLITS, Source
from marlin_jax.data.shards import FORMAT_VERSION, shard_file_name


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    file: str
    split: str
    sources: tuple[Source, ...]


def part_name(source_id: str) -> str:
    """The stable file stem of a source's part file (ids may hold '/' and odd characters)."""
    return hashlib.sha1(source_id.encode()).hexdigest()[:20]


def plan_shards(sources: list[Source], shard_size: int) -> list[ShardPlan]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    shards = []
    for split in SPLITS:
        members = sorted((s for s in sources if s.split == split), key=lambda s: part_name(s.source_id))
        chunks = [tuple(members[i:i + shard_size]) for i in range(0, len(members), shard_size)]
        shards += [ShardPlan(shard_file_name(split, i, len(chunks)), split, chunk) for i, chunk in enumerate(chunks)]
    return shards


def plan_fingerprint(shards: list[ShardPlan], settings: dict) -> str:
    """A hash of everything that decides the shards' contents."""
    content = {"format_version": FORMAT_VERSION, "settings": settings,
               "shards": [[shard.file, [s.source_id for s in shard.sources]] for shard in shards]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
