"""Per-element steps of the pretraining pipeline, as module-level grain transforms (so worker processes,
started with `spawn`, can unpickle them).

`SampleClipFrames` keeps only the frames of one training clip, still encoded (cheap to hold in a shuffle
window); `DecodeClip` then decodes them and turns the region maps into Fasking occupancy.
"""

import dataclasses

import grain
import numpy as np

from marlin_jax import masking
from marlin_jax.data import codecs
from marlin_jax.data.sampling import clip_frame_indices
from marlin_jax.data.schema import parse_clip


@dataclasses.dataclass(frozen=True)
class SampleClipFrames(grain.transforms.RandomMap):
    """Serialized clip record -> the encoded frames, maps and face flags of one sampled training clip."""

    num_frames: int
    sample_rate: int

    def random_map(self, element: bytes, rng: np.random.Generator) -> dict:
        record = parse_clip(element)
        indices = clip_frame_indices(record.num_frames, self.num_frames, self.sample_rate, rng)
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
        region_maps = np.stack([codecs.decode_label_map(data) for data in element["region_maps_png"]])
        if region_maps.shape != video.shape[:3]:
            raise ValueError(f"region maps {region_maps.shape} do not match frames {video.shape}")
        occupancy = masking.occupancy_from_region_maps(region_maps, self.patch_size, self.tubelet_size,
                                                       has_map=element["face_found"])
        return {"video": video, "occupancy": occupancy}
