"""The demo dataset (`python -m data_prep.demo`): face videos made on the spot, with no download.

The videos are camera moves over the public-domain portrait `skimage.data.astronaut()`: each pans, zooms and
rolls a little while the lighting drifts, from its own seed. They are written as H.264 mp4 files with PyAV
(`data_prep.frames.encode_mp4`) and then built by the same `data_prep.local_build.build_dataset` as real data.
"""

from pathlib import Path

import cv2
import numpy as np
from skimage import data as skimage_data

from data_prep.build_state import BuildConfig
from data_prep.local_build import build_dataset
from data_prep.frames import encode_mp4
from marlin_jax.config_builders import DEMO_IMAGE_SIZE

# Centre of the astronaut's face in the 512 px portrait, and a view side that frames it loosely.
_FACE_CENTRE = np.array([224.0, 121.0])
_VIEW_SIDE = 240.0
# The face crop undoes pan and zoom but not roll, so roll is what varies the face's layout between clips. At
# +-10 degrees the tiny demo model averaged it into blurred eyes and mouth within its CPU budget; +-4 keeps them.
_MAX_ROLL_DEGREES = 4.0
DEMO_FPS = 25


def camera_path(num_frames: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-frame view centre (x, y) in portrait pixels, zoom, roll in degrees and light gain."""
    def ramp(low: float, high: float, size: int = 1) -> np.ndarray:
        start, end = rng.uniform(low, high, size), rng.uniform(low, high, size)
        return np.linspace(start, end, num_frames)

    wobble = np.sin(np.linspace(0, rng.uniform(1, 3) * np.pi, num_frames))
    return {"centre": _FACE_CENTRE + ramp(-30, 30, 2), "zoom": ramp(0.85, 1.4)[:, 0],
            "roll": rng.uniform(-_MAX_ROLL_DEGREES, _MAX_ROLL_DEGREES) * wobble,
            "gain": ramp(0.7, 1.25)[:, 0]}


def render_video(portrait: np.ndarray, num_frames: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """(num_frames, side, side, 3) uint8 RGB frames of a camera moving over `portrait`."""
    path = camera_path(num_frames, rng)
    frames = []
    for t in range(num_frames):
        scale = path["zoom"][t] * side / _VIEW_SIDE
        centre = path["centre"][t]
        matrix = cv2.getRotationMatrix2D(tuple(centre), float(path["roll"][t]), float(scale))
        matrix[:, 2] += side / 2 - centre  # put the view centre in the middle of the frame
        frame = cv2.warpAffine(portrait, matrix, (side, side), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
        frames.append(np.clip(frame * path["gain"][t], 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_mp4(path: Path, frames: np.ndarray, fps: int = DEMO_FPS) -> None:
    Path(path).write_bytes(encode_mp4(frames, fps))


def synthesize_videos(folder: Path, num_videos: int = 10, side: int = 320, seed: int = 0) -> list[Path]:
    """Writes `num_videos` mp4 files of 40 to 64 frames into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    portrait = skimage_data.astronaut()
    paths = []
    for index in range(num_videos):
        rng = np.random.default_rng([seed, index])
        path = folder / f"astronaut_{index:02d}.mp4"
        write_mp4(path, render_video(portrait, int(rng.integers(40, 65)), side, rng))
        paths.append(path)
    return paths


def make_demo_dataset(output: str | Path, *, num_videos: int = 10, workers: int = 2,
                      image_size: int = DEMO_IMAGE_SIZE) -> dict:
    """Synthesises the videos under `<output>/videos` and builds `<output>/shards` of `image_size` px face
    crops; returns the manifest."""
    output = Path(output)
    synthesize_videos(output / "videos", num_videos)
    config = BuildConfig(input_dir=str(output / "videos"), output_dir=str(output / "shards"), workers=workers,
                         val_fraction=0.2, shard_size=2, image_size=image_size)
    return build_dataset(config)
