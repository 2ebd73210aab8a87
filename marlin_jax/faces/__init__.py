"""Face crops and face-region maps for MARLIN, on CPU with MediaPipe's shipped models.

    from marlin_jax.faces import FaceCropper
    crops = FaceCropper().process_video(frames)   # (T, H, W, 3) uint8 RGB

gives the official 224x224 face crop of every frame (crops.frames), a region map per frame in the
LaPa/FaRL label space (crops.region_maps, labels in REGION_LABELS), which frames had a face
(crops.face_found), the crop squares in source pixels (crops.boxes) and the 468 Face Mesh landmarks
(crops.landmarks). `FaceCropper().iter_video(frames)` does the same for frames streamed from a decoder,
one FrameCrop at a time, holding only the few frames it still needs.

The detector runs on the first frame, when the face is lost and every `redetect_every` frames; the
landmark model follows the face in between (`marlin_jax.faces.tracking`). `tracking=False` runs the
detector on every frame.
"""

from marlin_jax.face_labels import REGION_LABELS
from marlin_jax.faces.cropper import FaceCropper, FaceCrops, FrameCrop, NoFaceError

__all__ = ["REGION_LABELS", "FaceCropper", "FaceCrops", "FrameCrop", "NoFaceError"]
