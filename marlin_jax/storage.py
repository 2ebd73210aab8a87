"""Local paths and bucket paths (gs://...) through one layer, `etils.epath` (gcsfs underneath for gs://).

- `is_remote(path)`: a path in an object store rather than on a local disk.
- `check_paths(inputs=..., buckets=...)`, built on `check_bucket(path, what)` and `check_exists(path, what)`:
  called by every entry point before any compute. A bucket that does not exist, missing credentials or a
  store that does not answer raise a `StorageError` (a ValueError, which the entry points print as one line)
  that names the path and what it was given for, after one request of at most `CHECK_TIMEOUT_S`, instead of
  a gcsfs traceback after the first step.
- `files_under(folder)`: every file below a local or remote folder; `move(source, target)` a file or folder.
- `readable_source(path)`: what a library that opens local files itself (FFmpeg) reads.
- `write_once(path)`: a binary file that appears under `path` whole or not at all. Object stores have no
  rename, but an upload becomes visible only when it is finalised, so a remote file is uploaded straight
  under its final name and finalised only when the block ends without an error; a local one is written
  beside it (`atomic_path`) and renamed. `write_json`, `write_bytes_once` build on it, and
  `remove_temporaries(folder)` deletes what killed local writers left.
- A full local filesystem (or quota) raises `DiskFullError` (an OSError; entry points print it as one line)
  naming the file and the free space, with the temporary deleted, so a failed write leaves no
  partial file and frees what it took.

Transient store errors are retried below this module: gcsfs retries every request that fails with 408, 429,
500-504 or a dropped connection (6 tries, about 30 s of exponential backoff) and tensorstore (orbax's array
store) retries its own. A bucket that does not exist (404) or refuses access (401, 403) is not retried.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import posixpath
import shutil
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from etils import epath

# epath hands bucket paths to TensorFlow's gfile when TensorFlow is installed (TPU VM images often carry it). A
# gfile upload cannot be abandoned (closing it uploads what was written, also after an error), so write_once
# needs gcsfs, the layer the emulator tests check.
os.environ.setdefault("EPATH_USE_TF", "false")

CHECK_TIMEOUT_S = 20.0
TEMP_SUFFIX = ".tmp"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageError(ValueError):
    """A path that cannot be used: its bucket is missing, access is refused, or the store does not answer."""


class DiskFullError(OSError):
    """No space or quota left where something is written; the message says where and what to do. Not a ValueError,
    which per-item handlers record and skip (a bad video): a full disk must stop the job. The entry points report it
    as one line (launch.run)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def format_size(size: float) -> str:
    """Bytes as a person reads them: 812 B, 40.1 kB, 3.25 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 999.5:  # what .3g would write as 1e+03
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"


def disk_full_error(path, message: str) -> DiskFullError:
    """A `DiskFullError` about writing the local `path`, with the free space of its filesystem."""
    existing = epath.Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    return DiskFullError(errno.ENOSPC, f"no space left for {path} ({format_size(free)} free there): {message}")


def is_remote(path) -> bool:
    return "://" in str(path)


def split_bucket(path) -> tuple[str, str, str]:
    """gs://bucket/some/key -> ("gs", "bucket", "some/key")."""
    scheme, _, rest = str(path).partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{path} names no bucket")
    return scheme, bucket, key


def check_bucket(path, what: str) -> None:
    """Fails unless `path`'s bucket exists and this machine may list it; local paths pass.

    `what` says what the path was given for (`--workdir`, `config.data.path`), for the message."""
    if not path or not is_remote(path):
        return
    scheme, bucket, key = split_bucket(path)
    if scheme != "gs":
        if not epath.Path(f"{scheme}://{bucket}").exists():
            raise StorageError(f"{what} {path}: the bucket {scheme}://{bucket} does not exist or cannot be reached")
        return
    from fsspec.exceptions import FSTimeoutError

    filesystem = _filesystem(path)
    try:
        # One object of the path's prefix: needs only the object-listing permission that reading or writing
        # implies (bucket metadata needs more), and answers 404 for a missing bucket.
        with _quiet("gcsfs"):  # it logs a refused request with a traceback; the error below says it in a line
            filesystem.call("GET", "b/{}/o", bucket, prefix=key, maxResults=1, json_out=True,
                            timeout=CHECK_TIMEOUT_S)
    except FileNotFoundError:
        raise StorageError(f"{what} {path}: the bucket gs://{bucket} does not exist (create it with `gcloud "
                           f"storage buckets create gs://{bucket}`, or correct the path)") from None
    except FSTimeoutError:
        raise StorageError(f"{what} {path}: Cloud Storage ({_endpoint(filesystem)}) did not answer within "
                           f"{CHECK_TIMEOUT_S:.0f} s; check the network (or STORAGE_EMULATOR_HOST)") from None
    except Exception as error:  # noqa: BLE001 - gcsfs reports refusals with several types; all end the run here
        raise StorageError(f"{what} {path}: cannot list gs://{bucket} ({_reason(error)}){_credentials_hint(filesystem)}"
                           ) from None


def check_exists(path, what: str) -> None:
    """`check_bucket`, then fails unless `path` (local or remote) exists."""
    check_bucket(path, what)
    if not epath.Path(path).exists():
        raise StorageError(f"{what} {path} does not exist")


def check_paths(*, inputs: Mapping[str, Any] | None = None, buckets: Mapping[str, Any] | None = None) -> None:
    """A job's startup check: every path of `inputs` exists (in a bucket that can be listed); the buckets of
    `buckets` (outputs, and inputs whose absence the job reports itself) can be listed. Keys say what each path
    was given for (`--workdir`); empty paths (unset options) are skipped."""
    for what, path in (inputs or {}).items():
        if path:
            check_exists(path, what)
    for what, path in (buckets or {}).items():
        check_bucket(path, what)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _filesystem(path):
    """The fsspec filesystem (gcsfs for gs://) that epath reads and writes `path` with: the same instance, so its
    listing cache sees what this module changes."""
    from etils.epath import backend
    return backend.fsspec_backend.fs(str(path))


def _endpoint(filesystem) -> str:
    return getattr(filesystem, "_location", "storage.googleapis.com")


def _reason(error: Exception) -> str:
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message[:300]}" if message else type(error).__name__


def _credentials_hint(filesystem) -> str:
    if getattr(getattr(filesystem, "credentials", None), "method", None) != "anon":
        return "; check that these credentials may read and write it"
    return ("; no Google credentials were found, so the request was anonymous: run `gcloud auth "
            "application-default login`, or on a TPU VM give its service account access to the bucket")


def files_under(folder) -> list[epath.Path]:
    """Every file below `folder`, sorted. epath refuses rglob on a bucket, and its walk yields a bucket's folders
    without their gs://, so each path is rebuilt from `folder` and the part below it."""
    folder = epath.Path(folder)
    top = _without_scheme(folder)
    files = []
    for directory, _, names in folder.walk():
        below = posixpath.relpath(_without_scheme(directory), top)
        files += [folder / name if below == "." else folder / below / name for name in names]
    return sorted(files)


def move(source, target) -> None:
    """Moves a file or a folder (everything below it) to `target`, creating the folders above it. A bucket has no
    rename and no empty folders (epath refuses to rename into a folder that holds nothing yet): there each object
    is copied, then deleted."""
    source, target = epath.Path(source), epath.Path(target)
    if is_remote(source):
        # Not gcsfs's mv: it first tries a move request per object, which buckets without a hierarchical
        # namespace refuse.
        filesystem = _filesystem(source)
        filesystem.copy(str(source), str(target), recursive=True)
        filesystem.rm(str(source), recursive=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)


def _without_scheme(path) -> str:
    return str(path).partition("://")[2] if is_remote(path) else str(path)


@contextlib.contextmanager
def readable_source(path) -> Iterator[str | BinaryIO]:
    """A local file's name, for libraries that open local files themselves (FFmpeg); a remote file opened for
    reading (gcsfs fetches blocks as they are read, so nothing is downloaded first), closed after the block."""
    if not is_remote(path):
        yield str(path)
        return
    with epath.Path(path).open("rb") as file:
        yield file


@contextlib.contextmanager
def write_once(path) -> Iterator[BinaryIO]:
    """A binary file to write whose content appears under `path` only if the block ends without an error.

    A reader, and a rerun after a crash or SIGKILL, sees the previous object (or none) or the complete new one.
    """
    path = epath.Path(path)
    if not is_remote(path):
        with atomic_path(path) as temp, temp.open("wb") as file:
            yield file
        return
    file = path.open("wb")
    try:
        yield file
    except BaseException:
        _abandon(file)
        raise
    file.close()


@contextlib.contextmanager
def atomic_path(path) -> Iterator[epath.Path]:
    """A local temporary path to write (for writers that take a file name); renamed to `path` when the block ends
    without an error (`os.replace` within one filesystem is atomic), deleted otherwise. A full filesystem raises
    DiskFullError naming `path`."""
    path = epath.Path(path)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        yield temp
        temp.replace(path)
    except OSError as error:
        written = temp.stat().length if temp.exists() else 0
        temp.unlink(missing_ok=True)
        if error.errno in DISK_FULL_ERRNOS:
            got = f"more than the {format_size(written)} written" if written else "space"
            raise disk_full_error(path, f"it needs {got} before the filesystem filled up") from error
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _abandon(file) -> None:
    """Drops an unfinished upload. fsspec files finalise what was written when closed (also when garbage
    collected), so the file is marked closed instead. A resumable upload already under way is left unfinalised:
    the store never shows it and expires it (cancelling it is one more request that can fail)."""
    import fsspec.spec

    if isinstance(file, fsspec.spec.AbstractBufferedFile):
        file.closed = True
    else:
        file.close()


def write_bytes_once(path, data: bytes) -> None:
    with write_once(path) as file:
        file.write(data)


def write_json(path, value) -> None:
    """`value` as indented JSON, written once (see write_once)."""
    write_bytes_once(path, (json.dumps(value, indent=1) + "\n").encode())


def remove_temporaries(folder) -> None:
    """Deletes the temporaries that crashed or killed writers left anywhere under a local `folder` (a bucket
    holds none: an unfinished upload is never visible)."""
    if is_remote(folder):
        return
    for temp in pathlib.Path(folder).rglob(f"*{TEMP_SUFFIX}"):  # local: epath's rglob refuses '**'
        temp.unlink(missing_ok=True)
