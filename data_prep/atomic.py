"""Files that appear whole or not at all: written under a temporary name in the same folder, then renamed.

`os.replace` within one filesystem is atomic, so a reader (or a rerun after a crash) sees either the old
file or the complete new one. Temporary names end in `.tmp`; a crash can leave one behind, which the next
write to the same path overwrites.
"""

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; renames it to `path` on success, deletes it on an exception."""
    path = Path(path)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, value) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(value, indent=1) + "\n")
