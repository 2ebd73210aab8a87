"""A grain `IterDataset` over one TFRecord file that checks checksums (grain's own reader does not).

Its iterator state is the byte offset of the next record plus the count of corrupt records skipped so far,
so a restored pipeline resumes at exactly the next record.
"""

import grain

from marlin_jax.data.tfrecord import RecordReader


class _CheckedRecordIterator(grain.DatasetIterator):

    def __init__(self, path: str):
        super().__init__()
        self._reader = RecordReader(path)

    def __next__(self) -> bytes:
        return next(self._reader)

    def get_state(self) -> dict[str, int]:
        return {"offset": self._reader.offset, "corrupt_records": self._reader.corrupt_records}

    def set_state(self, state: dict[str, int]) -> None:
        self._reader.close()
        self._reader = RecordReader(self._reader.path, state["offset"],
                                    corrupt_records=state["corrupt_records"])

    def close(self) -> None:
        self._reader.close()
        super().close()


class CheckedTFRecordDataset(grain.IterDataset):
    """The records of one TFRecord file as bytes; corrupt ones are logged, counted and skipped."""

    def __init__(self, path: str):
        super().__init__()
        self._path = str(path)

    def __iter__(self) -> _CheckedRecordIterator:
        return _CheckedRecordIterator(self._path)

    def __str__(self) -> str:
        return f"CheckedTFRecordDataset({self._path})"
