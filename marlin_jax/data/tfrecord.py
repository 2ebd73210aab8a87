"""TFRecord files without TensorFlow: the length + masked-CRC32C framing, a writer and a checking reader.

Each record on disk is

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

(little endian), the format `tf.io.TFRecordWriter` writes and `tf.data.TFRecordDataset` reads. Files carry
no header, so whole files concatenate into a valid file; the shard builder relies on that.

Paths may be local or in a bucket (`etils.epath`). A remote file is streamed: gcsfs fetches it in blocks with
read-ahead as records are read, so memory holds a block or two per open file, never the whole shard.

The reader checks both checksums. A record whose data checksum fails is counted and skipped (the length was
intact, so the next record is still found); a bad length checksum or a truncated tail loses the framing
(`LostFramingError`), so the rest of the file is counted as one corrupt record and skipped. `strict=True`
raises instead. `RecordReader.read_next` raises for each damaged record, for readers that count otherwise.
"""

import os
import struct
from typing import BinaryIO

import google_crc32c
from absl import logging
from etils import epath

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_HEADER_SIZE = _LENGTH.size + _CRC.size
_MASK_DELTA = 0xA282EAD8


class CorruptRecordError(ValueError):
    """A record whose checksum does not match, or a file cut inside a record."""


class LostFramingError(CorruptRecordError):
    """A damaged length or a file cut inside a record: where any further record starts is unknown."""


def masked_crc32c(data: bytes) -> int:
    """The rotated and offset CRC32C that TFRecord stores (a CRC of CRC-bearing data is weak otherwise)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One record's bytes as they are stored in a TFRecord file."""
    length = _LENGTH.pack(len(data))
    return b"".join((length, _CRC.pack(masked_crc32c(length)), data, _CRC.pack(masked_crc32c(data))))


class RecordWriter:
    """Appends framed records to a file; use as a context manager.

    `target` is a path (local or remote, created or truncated) or a binary file that is already open, which
    the writer leaves open for its owner (`marlin_jax.storage.write_once` makes the file appear only once it
    is complete)."""

    def __init__(self, target: str | os.PathLike | BinaryIO):
        self._owns_file = not hasattr(target, "write")
        self._file = epath.Path(target).open("wb") if self._owns_file else target

    def write(self, data: bytes) -> None:
        self._file.write(frame_record(data))

    def close(self) -> None:
        if self._owns_file:
            self._file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class RecordReader:
    """Iterates the records of one file from a byte offset, checking checksums.

    `offset` is where the next record starts, so `RecordReader(path, reader.offset)` resumes exactly.
    `corrupt_records` counts what was skipped (it is carried across resumes by whoever saves the offset).
    """

    def __init__(self, path: str | os.PathLike, offset: int = 0, *, corrupt_records: int = 0,
                 strict: bool = False):
        self.path = epath.Path(path)
        self.offset = offset
        self.corrupt_records = corrupt_records
        self._strict = strict
        self._file: BinaryIO | None = None

    def __iter__(self) -> "RecordReader":
        return self

    def __next__(self) -> bytes:
        while True:
            try:
                return self.read_next()
            except CorruptRecordError as error:
                if self._strict:
                    raise
                self.corrupt_records += 1
                logging.warning("Skipping corrupt TFRecord data (%d so far in this file): %s",
                                self.corrupt_records, error)

    def read_next(self) -> bytes:
        """The next record. A damaged one raises `CorruptRecordError` with the reader already past it (at the
        end of the file for `LostFramingError`); the end of the file raises StopIteration."""
        if self._file is None:
            self._file = self.path.open("rb")
            self._file.seek(self.offset)
        header = self._file.read(_HEADER_SIZE)
        if not header:
            self.close()
            raise StopIteration
        start = self.offset
        if len(header) < _HEADER_SIZE:
            self._lose_framing()
            raise LostFramingError(f"{self.path}: file ends inside a record header at byte {start}")
        length_bytes = header[:_LENGTH.size]
        if masked_crc32c(length_bytes) != _CRC.unpack(header[_LENGTH.size:])[0]:
            self._lose_framing()
            raise LostFramingError(f"{self.path}: length checksum mismatch at byte {start}; rest of file "
                                     "skipped")
        (length,) = _LENGTH.unpack(length_bytes)
        body = self._file.read(length + _CRC.size)
        if len(body) < length + _CRC.size:
            self._lose_framing()
            raise LostFramingError(f"{self.path}: file ends inside the record at byte {start}")
        self.offset = start + _HEADER_SIZE + len(body)
        data = body[:length]
        if masked_crc32c(data) != _CRC.unpack(body[length:])[0]:
            raise CorruptRecordError(f"{self.path}: data checksum mismatch in the record at byte {start}")
        return data

    def _lose_framing(self) -> None:
        self.offset = self._file.seek(0, os.SEEK_END)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(path: str | os.PathLike, *, strict: bool = True) -> list[bytes]:
    """Every record of a file; by default a corrupt one raises `CorruptRecordError`."""
    return list(RecordReader(path, strict=strict))
