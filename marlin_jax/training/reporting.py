"""What a run shows: TensorBoard scalars and images, `metrics.jsonl`, and PNG images.

Only process 0 writes. `metrics.jsonl` has one row per reported step: {"step": N, name: value, ...}, training
metrics under their plain names (`rec_loss`, `lr`, ...) and evaluator values under theirs (`val/rec_loss`,
`probe/demo/auc`). TensorBoard shows training metrics as `train/<name>`. tensorboardX writes the event files
without TensorFlow (flax's and clu's writers need TensorFlow, which the default install does not carry).

In a bucket (`--workdir gs://...`) nothing can be appended to: metrics.jsonl and the event file are uploaded
whole at each flush, each upload replacing the previous object at once, so a reader never sees half a row.
An event file that reaches `EVENT_PART_BYTES` is left as it is and the next events go to a new part
(`<name>.part00001`, ...; TensorBoard reads a folder's event files in name order), so a long run with images does
not upload its whole history again at every flush. Event files go through epath like every other path
(tensorboardX's own gs:// writer uses another client, which does not retry the first upload of a file), so
transient store errors are retried.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Mapping

import jax
import numpy as np
from etils import epath
from PIL import Image

from marlin_jax.storage import is_remote

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
EVENT_PART_BYTES = 256 * 2**10


class _WholeObjectEventFile:
    """A TensorBoard event file in a bucket: buffered, and uploaded whole through epath at each flush, in parts of
    about `EVENT_PART_BYTES`. tensorboardX flushes between whole records, so every part holds whole records."""

    def __init__(self, path: str):
        self._path = path
        self._part = 0
        self._buffer = io.BytesIO()
        self._uploaded = 0  # bytes of the buffer already in the store

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if self._buffer.tell() == self._uploaded:
            return
        name = self._path if self._part == 0 else f"{self._path}.part{self._part:05d}"
        epath.Path(name).write_bytes(self._buffer.getvalue())
        self._uploaded = self._buffer.tell()
        if self._uploaded >= EVENT_PART_BYTES:
            self._part, self._buffer, self._uploaded = self._part + 1, io.BytesIO(), 0

    def close(self) -> None:
        self.flush()


class _EpathEventFiles:
    """tensorboardX's writer-factory interface (`record_writer.register_writer_factory`)."""

    def open(self, path: str) -> _WholeObjectEventFile:
        return _WholeObjectEventFile(path)

    def directory_check(self, path: str) -> None:
        """Buckets have no folders to create."""


def _import_tensorboardx() -> None:
    """Imports tensorboardX without the `import torch` it attempts at import time, which costs about a second of
    every run's start wherever torch is installed and serves only its type hints. A torch imported later (export)
    is unaffected."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]


def _summary_writer(logdir: epath.Path):
    _import_tensorboardx()
    from tensorboardX import SummaryWriter, record_writer
    if is_remote(logdir):
        record_writer.register_writer_factory(str(logdir).partition("://")[0], _EpathEventFiles())
    return SummaryWriter(str(logdir))


class RunReporter:
    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        self.workdir = epath.Path(workdir)
        self._writer = None
        if self.enabled:
            self._writer = _summary_writer(self.workdir / TENSORBOARD_SUBDIR)
            self._jsonl_path = self.workdir / JSONL_NAME
            # An object store cannot append: its metrics.jsonl is rewritten whole, in one upload, at each row.
            self._remote_rows = (self._jsonl_path.read_text() if is_remote(self.workdir) and self._jsonl_path.exists()
                                 else "")
            self._jsonl = None if is_remote(self.workdir) else self._jsonl_path.open("a")

    def record(self, step: int, values: Mapping[str, float]) -> None:
        """One metrics.jsonl row for this step and a TensorBoard scalar per value."""
        if not self.enabled or not values:
            return
        for name, value in values.items():
            self._writer.add_scalar(name if "/" in name else f"train/{name}", value, step)
        row = json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(row)
            self._jsonl.flush()  # a row is visible as soon as it is logged (tests and tail -f read it)
        else:
            self._remote_rows += row
            self._jsonl_path.write_text(self._remote_rows)
        self._writer.flush()

    def image(self, step: int, name: str, grid: np.ndarray) -> epath.Path | None:
        """grid: (H, W, 3) floats in [0, 1] -> `<workdir>/<name>/step_<step>.png` and a TensorBoard image."""
        if not self.enabled:
            return None
        pixels = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
        path = self.workdir / name / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="png")
        path.write_bytes(encoded.getvalue())
        self._writer.add_image(name, pixels, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            if self._jsonl is not None:
                self._jsonl.close()

