"""Per-element steps of the pretraining pipeline, as module-level grain transforms (so worker processes,
started with `spawn`, can unpickle them).

`SampleClipFrames` keeps only the frames of one training clip, still encoded (cheap to hold in a shuffle
window); `DecodeClip` then decodes them and turns the region maps of the tubelets' first frames into Fasking
occupancy.
"""

import dataclasses

import grain
import numpy as np

from marlin_jax import masking
from marlin_jax.data import codecs
from marlin_jax.video import pretraining_clip
from marlin_jax.data.schema import parse_clip


@dataclasses.dataclass(frozen=True)
class SampleClipFrames(grain.transforms.RandomMap):
    """Serialized clip record -> the encoded frames, maps and face flags of one sampled training clip."""

    num_frames: int
    sample_rate: int

    def random_map(self, element: bytes, rng: np.random.Generator) -> dict:
        record = parse_clip(element)
        indices = pretraining_clip(record.num_frames, self.num_frames, self.sample_rate, rng)
        return {
            "frames_jpeg": [record.frames_jpeg[i] for i in indices],
            "region_maps_png": [record.region_maps_png[i] for i in indices],
            "face_found": record.face_found[indices],
        }


@dataclasses.dataclass(frozen=True)
class DecodeClip(grain.transforms.Map):
    """Encoded clip -> {"video": (T, H, W, 3) uint8, "occupancy": (T/tubelet, H/patch, W/patch, 11) bool}."""

    patch_size: int
    tubelet_size: int

    def map(self, element: dict) -> dict:
        video = np.stack([codecs.decode_jpeg(data) for data in element["frames_jpeg"]])
        if len(video) % self.tubelet_size or len(element["region_maps_png"]) != len(video):
            raise ValueError(f"{len(video)} frames and {len(element['region_maps_png'])} region maps do not make "
                             f"whole tubelets of {self.tubelet_size} frames")
        # Fasking reads only each tubelet's first map, so only those are decoded.
        first_maps = np.stack([codecs.decode_label_map(data)
                               for data in element["region_maps_png"][::self.tubelet_size]])
        if first_maps.shape[1:] != video.shape[1:3]:
            raise ValueError(f"region maps {first_maps.shape[1:]} do not match frames {video.shape[1:3]}")
        occupancy = masking.occupancy_from_region_maps(first_maps, self.patch_size, tubelet_size=1,
                                                       has_map=element["face_found"][::self.tubelet_size])
        return {"video": video, "occupancy": occupancy}
