"""What a run shows: TensorBoard scalars and images, `metrics.jsonl`, and PNG images.

Only process 0 writes. `metrics.jsonl` has one row per reported step: {"step": N, name: value, ...}, training
metrics under their plain names (`rec_loss`, `lr`, ...) and evaluator values under theirs (`val/rec_loss`,
`probe/demo/auc`). TensorBoard shows training metrics as `train/<name>`. tensorboardX writes the event files
without TensorFlow (flax's and clu's writers need TensorFlow, which the default install does not carry).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import jax
import numpy as np
from etils import epath
from PIL import Image

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"


def is_remote(path) -> bool:
    return "://" in str(path)


class RunReporter:
    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        self.workdir = epath.Path(workdir)
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(self.workdir / TENSORBOARD_SUBDIR))
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

