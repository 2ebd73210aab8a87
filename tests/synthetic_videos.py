"""Videos made on the spot for tests, all written by `data_prep.demo_videos.write_mp4` (H.264 through PyAV): blocky
noise whose frames are told apart after lossy coding, and colour-cast clips whose binary class shows in every
pixel (for fine-tuning and probes)."""

from __future__ import annotations

import csv
import pathlib

import numpy as np

from data_prep.demo_videos import write_mp4

TINTED_CHANNEL = {0: 2, 1: 0}  # class -> the colour channel raised in every frame: blue or red


def write_video(path: pathlib.Path, frames: np.ndarray, fps: int = 25) -> pathlib.Path:
    """(T, H, W, 3) uint8 RGB -> an mp4 at `path` (its folder made if needed); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, frames, fps=fps)
    return path


def random_frames(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """Blocky noise: every frame differs, and survives lossy coding well enough to tell frames apart."""
    blocks = np.random.default_rng(seed).integers(0, 256, (count, height // 8, width // 8, 3), dtype=np.uint8)
    return blocks.repeat(8, axis=1).repeat(8, axis=2)


def tinted_video(label: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """20-40 noisy frames with one colour channel raised: the class is visible in every pixel."""
    frames = rng.uniform(30, 200, size=(int(rng.integers(20, 41)), size, size, 3))
    frames[..., TINTED_CHANNEL[label]] += 50
    return np.clip(frames, 0, 255).astype(np.uint8)


def write_colour_csv(root: pathlib.Path, split_sizes: dict[str, int], seed: int = 0) -> pathlib.Path:
    """Tinted videos under `root/videos` (labels alternate 0, 1 within each split) and `root/videos.csv` listing
    them (path relative to the CSV, split, label)."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, size in split_sizes.items():
        for index in range(size):
            path = f"videos/{split}_{index:02d}.mp4"
            write_video(root / path, tinted_video(index % 2, rng))
            rows.append([path, split, index % 2])
    with (root / "videos.csv").open("w", newline="") as file:
        csv.writer(file).writerows([["path", "split", "label"], *rows])
    return root / "videos.csv"
