"""Clip records for grain, read so that damaged ones are counted and skipped, never trained on.

A record is damaged when its checksums fail or its file ends inside it (`tfrecord.RecordReader`), when its
bytes do not parse as a clip `tf.train.Example` with the expected features, or when a frame or region map does
not decode. Only the first is found while reading; parsing and decoding happen later, in the pipeline's
transforms. So a damaged record travels on as a `CorruptRecords` marker:

* `CheckedTFRecordDataset` yields each record's bytes, or a marker where the file is damaged. Where the
  framing is lost (a damaged length, a truncated tail) the marker stands for every record the manifest says
  is left in the file, since none of them can be read.
* `skip_corrupt(transform)` wraps a pipeline transform: markers pass through it, and an element it fails on
  with one of `CORRUPT_RECORD_ERRORS` becomes a marker.
* `CountCorruptRecords`, just before batching, drops the markers and puts their count into the next clip
  (`CORRUPT_RECORDS_KEY`), so the count travels inside the batches, through worker processes if any.
* `CorruptRecordTotals`, last in the pipeline, takes that key out of each batch again and keeps totals of the
  corrupt records and of all records read. `corrupt_record_counts(loader)` returns them; the iterator state
  saves them, so after a resume they still cover the whole run. `check_corrupt_fraction` turns them into a
  clear error once too much of the data is damaged.

Markers that no clip follows (at the end of a finite stream) and the clips of a dropped last partial batch are
not counted. Iterator states hold byte offsets and totals only, so a restored pipeline resumes exactly.
"""

import dataclasses
from typing import Any, NamedTuple

import cv2
import grain
import numpy as np
from absl import logging
from google.protobuf.message import DecodeError

from marlin_jax.data.tfrecord import CorruptRecordError, LostFramingError, RecordReader

CORRUPT_RECORDS_KEY = "corrupt_records"
# What parsing a clip record (protobuf, `schema.parse_clip`) or decoding its images (`codecs`) raises on bad
# bytes. A programming error of one of these types would make every record look corrupt, which
# `check_corrupt_fraction` then stops, and the warnings name the error.
CORRUPT_RECORD_ERRORS = (ValueError, DecodeError, cv2.error)


@dataclasses.dataclass(frozen=True)
class CorruptRecords:
    """Stands for `count` damaged records in the element stream."""

    count: int
    reason: str


@dataclasses.dataclass(frozen=True)
class ShardFile:
    """A shard and the record count its manifest gives, to count the records a truncated shard lost."""

    path: str
    num_records: int


class _CheckedRecordIterator(grain.DatasetIterator):

    def __init__(self, shard: ShardFile):
        super().__init__()
        self._shard = shard
        self._reader = RecordReader(shard.path)
        self._next_record = 0  # index of the next record, damaged ones included

    def __next__(self) -> bytes | CorruptRecords:
        index = self._next_record
        try:
            record = self._reader.read_next()
        except LostFramingError as error:
            self._next_record = max(self._shard.num_records, index + 1)
            return _corrupt(self._next_record - index, error)
        except CorruptRecordError as error:
            self._next_record += 1
            return _corrupt(1, error)
        self._next_record += 1
        return record

    def get_state(self) -> dict[str, int]:
        return {"offset": self._reader.offset, "next_record": self._next_record}

    def set_state(self, state: dict[str, int]) -> None:
        self._reader.close()
        self._reader = RecordReader(self._shard.path, state["offset"])
        self._next_record = state["next_record"]

    def close(self) -> None:
        self._reader.close()
        super().close()


class CheckedTFRecordDataset(grain.IterDataset):
    """The records of one TFRecord file as bytes, and a `CorruptRecords` marker where it is damaged."""

    def __init__(self, shard: ShardFile):
        super().__init__()
        self._shard = shard

    def __iter__(self) -> _CheckedRecordIterator:
        return _CheckedRecordIterator(self._shard)

    def __str__(self) -> str:
        return f"CheckedTFRecordDataset({self._shard.path})"


def _corrupt(count: int, error: Exception) -> CorruptRecords:
    reason = f"{type(error).__name__}: {error}"
    logging.warning("Skipping %d corrupt record(s): %s", count, reason)
    return CorruptRecords(count, reason)


@dataclasses.dataclass(frozen=True)
class _SkipCorruptMap(grain.transforms.Map):
    transform: grain.transforms.Map

    def map(self, element):
        if isinstance(element, CorruptRecords):
            return element
        try:
            return self.transform.map(element)
        except CORRUPT_RECORD_ERRORS as error:
            return _corrupt(1, error)


@dataclasses.dataclass(frozen=True)
class _SkipCorruptRandomMap(grain.transforms.RandomMap):
    transform: grain.transforms.RandomMap

    def random_map(self, element, rng: np.random.Generator):
        if isinstance(element, CorruptRecords):
            return element
        try:
            return self.transform.random_map(element, rng)
        except CORRUPT_RECORD_ERRORS as error:
            return _corrupt(1, error)


def skip_corrupt(transform: grain.transforms.Map | grain.transforms.RandomMap):
    """`transform`, passing `CorruptRecords` through and turning an element it cannot read into one."""
    if isinstance(transform, grain.transforms.RandomMap):
        return _SkipCorruptRandomMap(transform)
    if isinstance(transform, grain.transforms.Map):
        return _SkipCorruptMap(transform)
    raise TypeError(f"skip_corrupt wraps a grain Map or RandomMap, not a {type(transform).__name__}")


class _CountCorruptRecordsIterator(grain.DatasetIterator):

    def __next__(self) -> dict:
        corrupt = 0
        while isinstance(element := next(self._parent), CorruptRecords):
            corrupt += element.count
        return {**element, CORRUPT_RECORDS_KEY: np.int64(corrupt)}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class CountCorruptRecords(grain.IterDataset):
    """Dict clips with `CorruptRecords` between them -> the clips, each with the count of corrupt records
    skipped just before it under `CORRUPT_RECORDS_KEY`."""

    def __iter__(self) -> _CountCorruptRecordsIterator:
        return _CountCorruptRecordsIterator(self._parent.__iter__())


class RecordCounts(NamedTuple):
    corrupt: int  # damaged records skipped
    read: int  # all records read, damaged ones included
    records_per_epoch: int  # records in this host's shards, by the manifest


class _CorruptRecordTotalsIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, records_per_epoch: int):
        super().__init__(parent)
        self.records_per_epoch = records_per_epoch
        self.corrupt = 0
        self.read = 0

    def __next__(self) -> dict:
        batch = dict(next(self._parent))
        per_clip = batch.pop(CORRUPT_RECORDS_KEY)
        corrupt = int(per_clip.sum())
        self.corrupt += corrupt
        self.read += len(per_clip) + corrupt
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"batches": self._parent.get_state(), "corrupt_records": self.corrupt, "records_read": self.read}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["batches"])
        self.corrupt, self.read = state["corrupt_records"], state["records_read"]


class CorruptRecordTotals(grain.IterDataset):
    """Batches from `CountCorruptRecords` clips -> the batches without the count, which is summed up here."""

    def __init__(self, parent: grain.IterDataset, records_per_epoch: int):
        super().__init__(parent)
        self._records_per_epoch = records_per_epoch

    def __iter__(self) -> _CorruptRecordTotalsIterator:
        return _CorruptRecordTotalsIterator(self._parent.__iter__(), self._records_per_epoch)


def corrupt_record_counts(loader: grain.DatasetIterator) -> RecordCounts:
    """The corrupt and total records behind the batches `loader` has yielded so far (this host only)."""
    if not isinstance(loader, _CorruptRecordTotalsIterator):
        raise TypeError(f"{type(loader).__name__} does not count corrupt records; use the iterator that "
                        "marlin_jax.data.pipeline.make_pretrain_loader returns")
    return RecordCounts(loader.corrupt, loader.read, loader.records_per_epoch)


class CorruptDataError(ValueError):
    """More of the training data is damaged than the run allows."""


def check_corrupt_fraction(corrupt: int, read: int, max_fraction: float, *, records_per_epoch: int = 0) -> None:
    """Raises `CorruptDataError` once more than `max_fraction` of the records are corrupt.

    Until a whole epoch is read, the fraction is taken over `records_per_epoch` (`RecordCounts`): it is then the
    share of the data already known to be damaged, which reading on can only raise, so a damaged record met in
    the first few batches does not stop a run that is almost all intact.
    """
    if not 0 <= max_fraction <= 1:
        raise ValueError(f"max_corrupt_fraction must be in [0, 1], got {max_fraction}")
    fraction = corrupt / max(read, records_per_epoch, 1)
    if fraction > max_fraction:
        raise CorruptDataError(
            f"{corrupt} of {read} records read are corrupt ({fraction:.2%} of "
            f"{max(read, records_per_epoch)}), more than config.data.max_corrupt_fraction={max_fraction}. The "
            "warnings above name each damaged shard and byte offset: rebuild those shards with "
            "`python -m data_prep.build` (or restore them from a copy), or raise config.data.max_corrupt_fraction.")
