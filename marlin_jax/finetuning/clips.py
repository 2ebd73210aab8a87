"""One clip from a face video, sampled as the official fine-tuning samples it (dataset/celebv_hq.py).

A video of N frames gives `clip_frames` (16) frames, every `sample_rate`-th (2), from a start drawn uniformly
in [0, N - clip_frames * rate]. A video too short for that span uses the largest rate that fits,
N // clip_frames; a video of at most `clip_frames` frames is taken whole and padded by repeating its last
frame. The official code takes N from the container's `nb_frames`; here N is the number of decoded frames
(see marlin_jax/video_features.py for why), so the whole video is decoded and only the chosen frames are
converted to RGB and resized (not cropped) to the model's square `img_size`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from marlin_jax.video_features import VideoDecodeError, decoded_frames, rgb_frame


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    clip_frames: int = 16
    sample_rate: int = 2
    size: int = 224


def clip_frame_indices(num_frames: int, settings: ClipSettings, rng: np.random.Generator) -> np.ndarray:
    """Frame indices (clip_frames,) of one clip of a `num_frames`-frame video."""
    length = settings.clip_frames
    if num_frames <= length:
        return np.minimum(np.arange(length), num_frames - 1)
    rate = min(settings.sample_rate, num_frames // length)
    start = rng.integers(0, num_frames - length * rate + 1)
    return start + rate * np.arange(length)


def read_clip(path: Path, settings: ClipSettings, rng: np.random.Generator) -> np.ndarray:
    """(clip_frames, size, size, 3) uint8 RGB; VideoDecodeError (a ValueError) names an unreadable file."""
    frames = list(decoded_frames(path))
    if not frames:
        raise VideoDecodeError(f"{path} has no decodable frames")
    indices = clip_frame_indices(len(frames), settings, rng)
    pixels = {index: rgb_frame(frames[index], settings.size) for index in set(indices.tolist())}
    return np.stack([pixels[index] for index in indices.tolist()])
