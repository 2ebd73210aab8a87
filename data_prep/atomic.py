"""Files that appear whole or not at all, on a local disk or in a bucket.

Locally a file is written under a temporary name in the same folder, then renamed: `os.replace` within one
filesystem is atomic, so a reader (or a rerun after a crash) sees either the old file or the complete new one.
Temporary names end in `.tmp`; a crash can leave one behind, which the next write to the same path overwrites
(or `remove_temporaries` deletes). Object stores have no rename: there a file is uploaded under its final
name and the upload is finalised only once the file is complete (`marlin_jax.storage.write_once`), so a
killed writer leaves nothing behind.

A full local filesystem (or quota) raises `DiskFullError` naming the file, with the temporary deleted, so a
failed write leaves no partial file behind and frees what it took.
"""

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from marlin_jax import storage

TEMP_SUFFIX = storage.TEMP_SUFFIX
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space or quota left where a build writes."""


def disk_full_error(path: Path, message: str) -> DiskFullError:
    """A `DiskFullError` about writing `path`, with the free space of its filesystem."""
    free = shutil.disk_usage(_existing_parent(path)).free
    return DiskFullError(errno.ENOSPC, f"no space left for {path} ({format_size(free)} free there): {message}")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def format_size(size: float) -> str:
    """Bytes as a person reads them: 812 B, 40.1 kB, 3.25 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 999.5:  # what .3g would write as 1e+03
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; renames it to `path` on success, deletes it on an exception."""
    path = Path(path)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        yield temp
        os.replace(temp, path)
    except OSError as error:
        written = temp.stat().st_size if temp.exists() else 0
        temp.unlink(missing_ok=True)
        if error.errno in _DISK_FULL_ERRNOS:
            got = f"more than the {format_size(written)} written" if written else "space"
            raise disk_full_error(path, f"it needs {got} before the filesystem filled up") from error
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path) -> Iterator[BinaryIO]:
    """A binary file to write that appears under `path` (local or remote) only once the block ends without an
    error: `atomic_path` on a local disk, an upload finalised at the end in a bucket."""
    if storage.is_remote(path):
        with storage.write_once(path) as file:
            yield file
        return
    with atomic_path(path) as temp, open(temp, "wb") as file:
        yield file


def remove_temporaries(folder) -> None:
    """Deletes the temporaries that crashed or killed writers left anywhere under a local `folder` (a bucket
    holds none: an unfinished upload is never visible)."""
    if storage.is_remote(folder):
        return
    for temp in Path(folder).rglob(f"*{TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)


def write_json(path, value) -> None:
    with atomic_file(path) as file:
        file.write((json.dumps(value, indent=1) + "\n").encode())
