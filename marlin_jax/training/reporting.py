"""What a training run shows: TensorBoard scalars and images, `metrics.jsonl`, and reconstruction PNGs.

Only process 0 writes. tensorboardX writes TensorBoard event files without TensorFlow (flax's and clu's
writers need TensorFlow, which the default install does not carry).
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping

import jax
import numpy as np
from PIL import Image

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.model import patchify, unpatchify

JSONL_NAME = "metrics.jsonl"


class RunReporter:
    def __init__(self, workdir: pathlib.Path):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self.images_dir = workdir / "reconstructions"
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.images_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = (workdir / JSONL_NAME).open("a", buffering=1)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._writer.add_scalar(f"train/{name}", value, step)
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")

    def image(self, step: int, grid: np.ndarray) -> pathlib.Path | None:
        """grid: (H, W, 3) floats in [0, 1]."""
        if not self.enabled:
            return None
        pixels = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
        path = self.images_dir / f"step_{step:08d}.png"
        Image.fromarray(pixels).save(path)
        self._writer.add_image("reconstruction", pixels, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()


def reconstruction_grid(arch: MarlinArchitecture, video: np.ndarray, visible_idx: np.ndarray,
                        masked_idx: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """original | masked (grey where hidden) | reconstruction, for the first frame of one clip.

    video (T, H, W, 3) in [0, 1]; indices (N_v,), (N_m,); predicted (N_m, patch_dim).
    """
    patches = np.asarray(patchify(video[None], arch.tubelet_size, arch.patch_size))[0]
    masked = patches.copy()
    masked[masked_idx] = 0.5
    rebuilt = patches.copy()
    rebuilt[masked_idx] = predicted
    frames = [np.asarray(unpatchify(p[None], arch.grid, arch.tubelet_size, arch.patch_size))[0, 0]
              for p in (patches, masked, rebuilt)]
    return np.concatenate(frames, axis=1)

