"""Face crops and face-region maps for MARLIN, on CPU with MediaPipe's shipped models.

    from marlin_jax.faces import FaceCropper
    crops = FaceCropper().process_video(frames)   # (T, H, W, 3) uint8 RGB

gives the official 224x224 face crop of every frame (crops.frames), a region map per frame in the
LaPa/FaRL label space (crops.region_maps, labels in REGION_LABELS), which frames had a face
(crops.face_found) and the crop squares in source pixels (crops.boxes).
"""

from marlin_jax.face_labels import REGION_LABELS
from marlin_jax.faces.cropper import FaceCropper, FaceCrops, NoFaceError

__all__ = ["REGION_LABELS", "FaceCropper", "FaceCrops", "NoFaceError"]
