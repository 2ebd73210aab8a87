"""Which frames of a stored clip make one training clip: MARLIN's temporal sampling.

With `span = num_frames * sample_rate` (32 for the official 16 frames at stride 2):

* `available >= span`: `num_frames` frames at stride `sample_rate` from a start drawn uniformly in
  `[0, available - span]`, the official training sampler (`util.misc.sample_indexes`).
* `num_frames < available < span`: the first `num_frames` consecutive frames, as the official
  `marlin_pytorch` `extract_video` does for short videos (it sends exactly `span` frames this way too; here
  that length takes the strided path, which the training sampler allows).
* `available <= num_frames`: every frame, then the last one repeated up to `num_frames` (the official
  "same" padding at the tail). The official extractor also pads when a 17..32-frame video decodes to fewer
  than `num_frames` frames, but then discards the padded copy; here every short input is padded.
"""

import numpy as np


def clip_frame_indices(available: int, num_frames: int, sample_rate: int,
                       rng: np.random.Generator) -> np.ndarray:
    """(num_frames,) int64 indices into a stored clip of `available` frames (see the module docstring)."""
    if available < 1:
        raise ValueError(f"cannot sample a clip from {available} frames")
    if num_frames < 1 or sample_rate < 1:
        raise ValueError(f"num_frames and sample_rate must be positive, got {num_frames} and {sample_rate}")
    span = num_frames * sample_rate
    if available >= span:
        start = rng.integers(0, available - span + 1)
        return start + np.arange(num_frames, dtype=np.int64) * sample_rate
    if available > num_frames:
        return np.arange(num_frames, dtype=np.int64)
    return np.minimum(np.arange(num_frames, dtype=np.int64), available - 1)
