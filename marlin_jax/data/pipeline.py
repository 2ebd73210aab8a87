"""The pretraining input pipeline (grain): shard files -> per-host batches of clips and Fasking occupancy.

Per host: its share of the split's shard files (`files[process_index::process_count]`) is shuffled anew each
epoch and read `cycle_length` files at a time (interleaved); each record yields one clip sampled as in
`marlin_jax.video.pretraining_clip`, still encoded, which a window of `shuffle_window` clips shuffles; the clip is then
decoded, its region maps become occupancy, and clips are batched. With `worker_count > 0` all of this runs in
that many worker processes (each on its slice of the file stream) that prefetch whole batches.

Damaged records (bad checksums, a truncated file, bytes that do not parse or frames that do not decode) are
skipped and counted, never batched (`marlin_jax.data.record_dataset`); `corrupt_record_counts(iterator)` gives
the totals so far.

Masks are not drawn here: the train step draws them on device from `occupancy` and `fold_in(key, step)`, so
a resumed run draws the same masks and the pipeline stays cheap.

Every random choice comes from `seed` (and the host index), and the returned iterator's
`get_state()`/`set_state()` (or `grain.checkpoint.CheckpointSave/Restore` through orbax) resume exactly: a
restored loader yields the batches the original would have yielded next. The state depends on
`worker_count`, so restore with the same value.
"""

import copy
import os

import grain
import jax
import numpy as np
from absl import flags

from marlin_jax.data.record_dataset import (CheckedTFRecordDataset, CorruptRecordTotals, CountCorruptRecords,
                                            ShardFile, skip_corrupt)
from marlin_jax.data.shards import load_manifest, split_shard_paths
from marlin_jax.data.transforms import DecodeClip, SampleClipFrames
from marlin_jax.face_labels import NUM_LABELS


def batch_shapes(global_batch_size: int, *, num_frames: int, img_size: int, patch_size: int,
                 tubelet_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch that the hosts' loaders (`make_pretrain_loader`) assemble, as shapes: what the train step
    is compiled for."""
    grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
    return {"video": jax.ShapeDtypeStruct((global_batch_size, num_frames, img_size, img_size, 3), np.uint8),
            "occupancy": jax.ShapeDtypeStruct((global_batch_size, *grid, NUM_LABELS), np.bool_)}


def make_pretrain_loader(
    data_dir: str | os.PathLike,
    split: str,
    global_batch_size: int,
    seed: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 2,
    num_frames: int = 16,
    temporal_sample_rate: int = 2,
    patch_size: int = 16,
    tubelet_size: int = 2,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shuffle_window: int = 256,
    cycle_length: int = 4,
    worker_buffer_size: int = 2,
) -> grain.DatasetIterator:
    """This host's batches: {"video": uint8 (B, T, H, W, 3), "occupancy": bool (B, T/2, H/16, W/16, 11)}.

    B = global_batch_size // process_count. `num_epochs=None` repeats forever; a last partial batch is
    dropped. `process_index`/`process_count` default to JAX's. Worker processes are started with `spawn`,
    so a script that uses them needs the `if __name__ == "__main__":` guard. Call `.close()` on the
    iterator when done to stop them.
    """
    process_index, process_count = _process_placement(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or positive, got {num_epochs}")
    files = _host_files(data_dir, split, process_index, process_count)
    file_seed, sample_seed, window_seed = np.random.SeedSequence([seed, process_index]).generate_state(3)

    paths = grain.MapDataset.source(files)
    if shuffle:
        paths = paths.shuffle(seed=int(file_seed))
    paths = paths.repeat(num_epochs)
    records = _CopiedState(grain.experimental.InterleaveIterDataset(paths.map(CheckedTFRecordDataset),
                                                                    cycle_length=min(cycle_length, len(files))))
    clips = records.random_map(skip_corrupt(SampleClipFrames(num_frames, temporal_sample_rate)),
                               seed=int(sample_seed))
    if shuffle:
        clips = grain.experimental.WindowShuffleIterDataset(clips, window_size=shuffle_window,
                                                            seed=int(window_seed))
    clips = CountCorruptRecords(clips.map(skip_corrupt(DecodeClip(patch_size, tubelet_size))))
    batches = clips.batch(global_batch_size // process_count, drop_remainder=True)
    # A finite stream shorter than the worker count would leave workers with nothing to read.
    worker_count = min(worker_count, len(paths))
    if worker_count > 0:
        # grain's workers read absl flags; outside an absl app (scripts, pytest) nothing has parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                                   per_worker_buffer_size=worker_buffer_size))
    return iter(CorruptRecordTotals(batches, sum(shard.num_records for shard in files)))


class _CopiedStateIterator(grain.DatasetIterator):

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return copy.deepcopy(self._parent.get_state())

    def set_state(self, state: dict) -> None:
        self._parent.set_state(copy.deepcopy(state))


class _CopiedState(grain.IterDataset):
    """Passes its parent's elements through and only copies of states in and out. grain 0.2.18's interleave keeps
    the lists `set_state` hands it and mutates them as it reads on, while the window shuffle keeps the state it
    saved at its window start: without copies, a loader restored once checkpoints a wrong position later."""

    def __iter__(self) -> _CopiedStateIterator:
        return _CopiedStateIterator(self._parent.__iter__())


def _process_placement(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    return process_index, process_count


def _host_files(data_dir, split: str, process_index: int, process_count: int) -> list[ShardFile]:
    files = split_shard_paths(data_dir, split)
    if not files:
        raise ValueError(f"split {split!r} of {data_dir} has no records (see its manifest.json)")
    if len(files) < process_count:
        raise ValueError(f"split {split!r} of {data_dir} has {len(files)} non-empty shards, fewer than the "
                         f"{process_count} processes; rebuild it with a smaller --shard-size")
    num_records = {shard["file"]: shard["num_records"] for shard in load_manifest(data_dir)["shards"]}
    return [ShardFile(str(path), num_records[path.name]) for path in files[process_index::process_count]]
