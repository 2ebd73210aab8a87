"""Fasking cost: host occupancy per clip, and jitted mask sampling per batch, on real face region maps.

    python benchmarks/masking_throughput.py
    python benchmarks/masking_throughput.py --batch-size 32 --repeats 50

The region maps are the face path's own (FaceCropper on 16 frames of skimage's astronaut portrait, shifted a
little each frame), so the label layout is a real face's. Prints one JSON object: milliseconds per 16-frame
224x224 clip for `occupancy_from_region_maps`, and per batch for `sample_masks` with every strategy.
"""

import argparse
import functools
import json
import time

import jax
import numpy as np
import skimage.data

from marlin_jax import masking
from marlin_jax.faces import FaceCropper


def face_region_maps(num_frames: int = 16) -> np.ndarray:
    offsets = np.round(6 * np.sin(np.arange(num_frames) / 3)).astype(int)
    frames = np.stack([np.roll(skimage.data.astronaut(), offset, axis=1) for offset in offsets])
    return FaceCropper(size=224).process_video(frames).region_maps


def best_ms(fn, repeats: int) -> float:
    """Best of `repeats` calls, in milliseconds (the minimum is the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    maps = face_region_maps()
    occupancy = masking.occupancy_from_region_maps(maps)
    batch = jax.device_put(np.repeat(occupancy[None], args.batch_size, axis=0))
    keys = jax.random.split(jax.random.key(0), args.repeats)
    sampling_ms = {}
    for strategy in masking.STRATEGIES:
        sample = jax.jit(functools.partial(masking.sample_masks, strategy=strategy, visible_ratio=0.1))
        sample(keys[0], batch).block_until_ready()  # compile outside the timing
        calls = iter(keys)
        sampling_ms[strategy] = round(best_ms(lambda: sample(next(calls), batch).block_until_ready(),
                                              args.repeats), 3)
    print(json.dumps({
        "backend": jax.default_backend(),
        "occupancy_ms_per_clip": round(best_ms(lambda: masking.occupancy_from_region_maps(maps), args.repeats), 3),
        "sample_masks_ms_per_batch": sampling_ms,
        "batch_size": args.batch_size,
        "labels_present": sorted(int(label) for label in np.unique(maps)),
    }, indent=1))


if __name__ == "__main__":
    main()
