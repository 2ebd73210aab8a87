"""Batches of labelled face-video clips (grain), each host loading its share of every global batch: fine-tuning's
training and evaluation, and the in-training linear probe.

Training: the train split is reshuffled each epoch (grain's `shuffle` then `repeat`), cut into global batches
of `batch_size` videos with each epoch's last partial batch dropped (as the official DataLoader's
drop_last), and every video gives a clip from a random start. All randomness derives from `seed` and the
batch's position in the stream, so the iterator's state (`grain.checkpoint.CheckpointSave/Restore`) resumes
exactly, and every host agrees on the global batch while decoding only its own rows.

Evaluation: every video in order, one clip each whose start is drawn from `(seed, video index)`, the official
single random clip per video made the same at every evaluation. The last global batch is padded with
all-zero clips, which the caller drops.

Decoding runs in `threads` threads per process and, with `workers` > 0, in that many worker processes (grain's
`mp_prefetch`, spawned, each taking every `workers`-th batch; the batches come out in the same order). PyAV
holds the GIL for part of each frame, so threads alone stop scaling at a few cores. A loader's state depends
on `workers`: resume with the same value. Call `.close()` on an iterator to stop its workers. An evaluation
starts at most one worker per batch, and none for a single batch.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np
from absl import flags

from marlin_jax.downstream.tasks import LabelledSplit
from marlin_jax.video import ClipSettings, read_finetuning_clip

PADDING = -1


def host_rows(global_batch_size: int) -> slice:
    """This host's rows of a global batch (global_batch splits the global array the same way)."""
    local = global_batch_size // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


@dataclasses.dataclass(frozen=True)
class LoadTrainBatch:
    """Global batch of video indices -> this host's {"video": uint8 clips, "label": labels}."""

    split: LabelledSplit
    settings: ClipSettings

    def __call__(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        clip_seeds = rng.integers(2**63, size=len(indices))  # drawn for the whole batch: hosts agree
        rows = host_rows(len(indices))
        videos = [read_finetuning_clip(self.split.paths[i], self.settings, np.random.default_rng(s))
                  for i, s in zip(indices[rows], clip_seeds[rows])]
        return {"video": np.stack(videos), "label": self.split.labels[indices[rows]]}


@dataclasses.dataclass(frozen=True)
class LoadEvalBatch:
    """Global batch of video indices (PADDING for none) -> this host's uint8 clips."""

    split: LabelledSplit
    settings: ClipSettings
    seed: int

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        blank = np.zeros((self.settings.clip_frames, self.settings.size, self.settings.size, 3), np.uint8)
        return np.stack([blank if i == PADDING else
                         read_finetuning_clip(self.split.paths[i], self.settings, np.random.default_rng([self.seed, i]))
                         for i in indices[host_rows(len(indices))]])


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How batches are decoded: `threads` per process, `workers` processes (0: in this one), and how many
    batches each process reads ahead."""

    threads: int = 8
    prefetch: int = 8
    workers: int = 0


def _iterate(batches: grain.MapDataset, parallelism: Parallelism) -> grain.DatasetIterator:
    dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=parallelism.threads,
                                                        prefetch_buffer_size=parallelism.prefetch))
    if parallelism.workers > 0:
        # grain's workers read absl flags; outside an absl app (scripts, pytest) nothing has parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=parallelism.workers,
                                                                   per_worker_buffer_size=parallelism.prefetch))
    return iter(dataset)


def clip_shapes(global_batch_size: int, settings: ClipSettings) -> jax.ShapeDtypeStruct:
    """The global uint8 clips of a batch (training's "video", and every evaluation batch), as a shape."""
    return jax.ShapeDtypeStruct((global_batch_size, settings.clip_frames, settings.size, settings.size, 3), np.uint8)


def train_batch_shapes(global_batch_size: int, settings: ClipSettings, task: str,
                       num_outputs: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch that the hosts' loaders (`make_train_loader`) assemble, as shapes: what the train
    step is compiled for. Labels are int32, one per clip, or one per output for multilabel tasks."""
    labels = (global_batch_size, num_outputs) if task == "multilabel" else (global_batch_size,)
    return {"video": clip_shapes(global_batch_size, settings), "label": jax.ShapeDtypeStruct(labels, np.int32)}


def make_train_loader(split: LabelledSplit, global_batch_size: int, seed: int, settings: ClipSettings,
                      parallelism: Parallelism = Parallelism()) -> grain.DatasetIterator:
    """An endless iterator of this host's training batches."""
    if len(split) < global_batch_size:
        raise ValueError(f"the train split has {len(split)} videos, fewer than one batch ({global_batch_size})")
    batches = (grain.MapDataset.range(len(split)).shuffle(seed=seed)
               .batch(global_batch_size, drop_remainder=True).repeat(None)
               .random_map(LoadTrainBatch(split, settings), seed=seed))
    return _iterate(batches, parallelism)


def eval_batches(split: LabelledSplit, global_batch_size: int, seed: int, settings: ClipSettings,
                 parallelism: Parallelism = Parallelism()) -> grain.DatasetIterator:
    """This host's clips of every video of `split`, ceil(N / global_batch_size) batches."""
    count = -(-len(split) // global_batch_size) * global_batch_size
    indices = np.full(count, PADDING)
    indices[:len(split)] = np.arange(len(split))
    batches = grain.MapDataset.source(indices.reshape(-1, global_batch_size)).map(LoadEvalBatch(split, settings, seed))
    # Each evaluation starts its own worker processes, and starting one costs seconds (it imports JAX and grain):
    # no more workers than batches, and none for a single batch (there is no other batch to decode meanwhile).
    # The batches are the same with any number of workers.
    workers = min(parallelism.workers, len(batches)) if len(batches) > 1 else 0
    return _iterate(batches, dataclasses.replace(parallelism, workers=workers))
