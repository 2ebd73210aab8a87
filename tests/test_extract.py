"""Video feature extraction: the official clip schedule, parity with marlin_pytorch, batching, the CLI."""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import shutil
import subprocess
import sys
import types

import av
import numpy as np
import pytest

from marlin_jax import Marlin
from marlin_jax.architectures import VIT_TINY, MarlinArchitecture
from marlin_jax.video_features import (
    ExtractionOptions,
    extract_to_directory,
    extract_video_features,
    extract_videos,
    find_videos,
    model_windows,
)
from marlin_jax.video import VideoDecodeError, extraction_windows, video_windows
from synthetic_videos import random_frames, write_video

try:  # only the tests that use torch need it: they ask for a torch fixture, which skips without it
    import torch
    from torch_reference import build_torch_marlin
except ImportError:
    pass

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_224 = dataclasses.replace(VIT_TINY, img_size=224)
# (sample_rate, stride) pairs; the official default first.
SCHEDULES = [(2, 16), (1, 16), (3, 4), (2, 8)]
FRAME_COUNTS = [1, 9, 15, 16, 17, 31, 32, 33, 47, 64, 65, 80, 97]


def jax_twin(torch_model, arch: MarlinArchitecture, directory: pathlib.Path) -> Marlin:
    """The same weights through an official-format .pt file."""
    path = directory / "encoder.pt"
    torch.save(torch_model.state_dict(), path)
    return Marlin.from_file(arch, path)


@pytest.fixture
def official(marlin_pytorch, monkeypatch):
    """marlin_pytorch's own video reading, made runnable here.

    It counts frames with ffprobe, and reads short videos with torchvision.io.read_video, which is stubbed in
    tests (see conftest): that stub is given PyAV, the library torchvision itself reads videos with.
    """
    if shutil.which("ffprobe") is None:
        pytest.skip("ffprobe not installed (apt-get install ffmpeg); marlin_pytorch counts frames with it")
    pytest.importorskip("ffmpeg")
    util = importlib.import_module("marlin_pytorch.util")

    def read_video(path, *_, **__):
        with av.open(str(path)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        return torch.from_numpy(frames), None, {}

    monkeypatch.setattr(util.torchvision.io, "read_video", read_video)
    return marlin_pytorch


def official_windows(marlin_pytorch, path: pathlib.Path, sample_rate: int, stride: int) -> list[np.ndarray]:
    """marlin_pytorch.Marlin._load_video's clips as (T, H, W, 3) float32; it needs only these two attributes."""
    owner = types.SimpleNamespace(clip_frames=16, device="cpu")
    clips = marlin_pytorch.Marlin._load_video(owner, str(path), sample_rate, stride)
    return [clip[0].permute(1, 2, 3, 0).numpy() for clip in clips]


@pytest.fixture(scope="module")
def counted_videos(tmp_path_factory) -> dict[int, pathlib.Path]:
    folder = tmp_path_factory.mktemp("counted")
    return {n: write_video(folder / f"frames{n}.mp4", random_frames(n, 32, 32, seed=n)) for n in FRAME_COUNTS}


@pytest.mark.parametrize("frames", [0, 1, 15, 16, 17, 32, 33, 64, 65, 66, 97, 200])
@pytest.mark.parametrize("sample_rate, stride", SCHEDULES)
def test_schedule_on_frame_indices(frames, sample_rate, stride):
    span = 16 * sample_rate
    if frames == 0:
        expected = []
    elif frames <= 16:
        expected = [list(range(frames)) + [frames - 1] * (16 - frames)]
    elif frames <= span:
        expected = [list(range(16))]
    else:
        expected = [list(range(start, start + span, sample_rate))
                    for start in range(0, frames - span, stride * sample_rate)]
    windows = extraction_windows(range(frames), np.asarray, 16, sample_rate, stride)
    assert [w.tolist() for w in windows] == expected


def test_schedule_converts_only_frames_it_uses():
    converted = []

    def to_array(index):
        converted.append(index)
        return np.asarray(index)

    list(extraction_windows(range(100), to_array, 16, 2, 16))
    assert converted == list(range(16)) + list(range(16, 100, 2))


@pytest.mark.slow
def test_windows_equal_official_load_video(official, counted_videos):
    """Same clip count and bit-identical pixels as the official reader, for every branch of its schedule."""
    for count, path in counted_videos.items():
        for sample_rate, stride in SCHEDULES:
            ours = list(video_windows(path, 16, None, sample_rate, stride))
            theirs = official_windows(official, path, sample_rate, stride)
            assert len(ours) == len(theirs), (count, sample_rate, stride)
            for a, b in zip(ours, theirs):
                np.testing.assert_array_equal(a.astype(np.float32) / 255, b)


@pytest.mark.slow
def test_features_equal_official_on_decoded_clips(official, tmp_path):
    torch_model = build_torch_marlin(official, VIT_TINY, seed=1, full=False)
    model = jax_twin(torch_model, VIT_TINY, tmp_path)
    for count in (10, 20, 97):  # padded, first 16 frames, three sliding clips
        path = write_video(tmp_path / f"clip{count}.mp4", random_frames(count, 64, 64, seed=count))
        clips = torch.from_numpy(np.stack(official_windows(official, path, 2, 16))).permute(0, 4, 1, 2, 3)
        for keep_seq in (False, True):
            expected = torch_model.extract_features(clips, keep_seq=keep_seq).numpy()
            ours = extract_video_features(model, path, keep_seq=keep_seq, batch_size=2)
            assert ours.shape == expected.shape
            np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
        pooled = torch_model.extract_features(clips, keep_seq=False).numpy()
        for reduction, reduce in (("mean", np.mean), ("max", np.max)):
            ours = extract_video_features(model, path, reduction=reduction)
            np.testing.assert_allclose(ours, reduce(pooled, axis=0), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_sample_videos_match_official_extract_video(official, samples_dir, tmp_path):
    """Real 224x224 face crops, every branch (15, 27 and 100+ frames), clips batched across videos."""
    torch_model = build_torch_marlin(official, TINY_224, seed=2, full=False)
    model = jax_twin(torch_model, TINY_224, tmp_path)
    paths = sorted(samples_dir.glob("cropped*.mp4"))
    results = list(extract_videos(model, paths, ExtractionOptions(batch_size=4)))
    assert sorted(r.path for r in results) == paths
    for result in results:
        expected = torch_model.extract_video(str(result.path)).numpy()
        assert result.error is None
        assert result.features.shape == expected.shape, result.path.name
        np.testing.assert_allclose(result.features, expected, rtol=0, atol=1e-4, err_msg=result.path.name)


def test_resizes_frames_that_are_not_img_size(tmp_path):
    frames = np.zeros((20, 48, 96, 3), np.uint8)
    frames[:, :, 48:] = 200  # left half black, right half bright
    windows = list(video_windows(write_video(tmp_path / "wide.mp4", frames), 16, 64, 2, 16))
    assert len(windows) == 1 and windows[0].shape == (16, 64, 64, 3)
    assert windows[0][:, :, :24].max() < 30 and windows[0][:, :, 40:].min() > 170


def test_crop_face_uses_face_cropper(tmp_path):
    import skimage.data

    from marlin_jax.faces import FaceCropper
    portrait = skimage.data.astronaut()
    frames = np.stack([np.roll(portrait, shift, axis=1) for shift in range(0, 40, 2)])
    path = write_video(tmp_path / "astronaut.mp4", frames)
    options = ExtractionOptions(crop_face=True)
    (clip,) = model_windows(path, VIT_TINY, options)
    (raw,) = video_windows(path, 16, None, 2, 16)
    np.testing.assert_array_equal(clip, FaceCropper(size=64).process_video(raw).frames)

    # Its first clip has a face, its second none: the video fails after one clip went into a shared batch.
    face_then_noise = np.concatenate([frames[:16].repeat(2, axis=0), random_frames(36, 512, 512, seed=3)])
    half = write_video(tmp_path / "half.mp4", face_then_noise)
    model = Marlin.random_init(VIT_TINY, seed=4, full=False)
    again = pathlib.Path(shutil.copy(path, tmp_path / "again.mp4"))
    alone = extract_video_features(model, again, crop_face=True)
    assert alone.shape == (1, VIT_TINY.encoder_embed_dim)
    # Batch 2: half.mp4's first clip is already in flight when it fails; batch 4: still queued.
    for batch_size in (2, 4):
        batched = ExtractionOptions(crop_face=True, batch_size=batch_size)
        results = {r.path.name: r for r in extract_videos(model, [path, half, again], batched)}
        for name in ("astronaut.mp4", "again.mp4"):
            np.testing.assert_allclose(results[name].features, alone, atol=1e-5)
        assert results["half.mp4"].features is None
        assert "half.mp4, clip 1: no face" in results["half.mp4"].error


def test_bad_videos_are_reported_and_skipped(tmp_path):
    model = Marlin.random_init(VIT_TINY, seed=5, full=False)
    (tmp_path / "in").mkdir()
    good = write_video(tmp_path / "in" / "good.mp4", random_frames(40, 64, 64, seed=6))
    (tmp_path / "in" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    (tmp_path / "in" / "empty.avi").write_bytes(b"")
    summary = extract_to_directory(model, [tmp_path / "in"], tmp_path / "out", ExtractionOptions(batch_size=2),
                                   progress=False)
    assert [str(path) for path in summary.written] == [str(tmp_path / "out" / "good.npy")]
    assert sorted(p.name for p, _ in summary.failed) == ["corrupt.mp4", "empty.avi"]
    np.testing.assert_allclose(np.load(summary.written[0]), extract_video_features(model, good), atol=1e-5)
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        extract_video_features(model, tmp_path / "in" / "corrupt.mp4")


def test_find_videos_mirrors_folders_and_refuses_collisions(tmp_path):
    for name in ("a.mp4", "sub/b.MKV", "sub/deeper/c.webm", "sub/notes.txt", "x.v2.mov"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).touch()
    found = find_videos([tmp_path / "in"])
    assert [str(out) for _, out in found] == ["a.npy", "sub/b.npy", "sub/deeper/c.npy", "x.v2.npy"]
    with pytest.raises(ValueError, match="would both write a.npy"):
        find_videos([tmp_path / "in" / "a.mp4", tmp_path / "in"])
    with pytest.raises(ValueError, match="named twice"):
        find_videos([tmp_path / "in", tmp_path / "in" / "sub"])
    with pytest.raises(ValueError, match="neither a video file nor a folder"):
        find_videos([tmp_path / "missing"])


@pytest.mark.parametrize("field, value", [("sample_rate", 0), ("stride", -1), ("batch_size", 2.5),
                                          ("reduction", "median")])
def test_bad_options(field, value):
    with pytest.raises(ValueError, match=field):
        ExtractionOptions(**{field: value})


@pytest.mark.slow
def test_cli_end_to_end(torch, tmp_path):
    """The module as a user runs it: config-file model, .pt weights, a folder with sub-folders and a bad file."""
    config = tmp_path / "tiny.py"
    config.write_text("import ml_collections\nfrom marlin_jax.architectures import VIT_TINY\n\n\n"
                      "def get_config(variant=None):\n"
                      "    return ml_collections.ConfigDict({'model': VIT_TINY.to_dict()})\n")
    model = Marlin.random_init(VIT_TINY, seed=7, full=False)
    weights = model.to_pytorch(tmp_path / "weights")["pt"]
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    write_video(videos / "a.mp4", random_frames(70, 64, 64, seed=8))
    write_video(videos / "sub" / "b.mkv", random_frames(20, 48, 80, seed=9))
    (videos / "sub" / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "features"
    command = [sys.executable, "-m", "marlin_jax.extract", "--model", str(config), "--weights", str(weights),
               "--output_dir", str(out), "--batch_size", "4", str(videos)]
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["a.npy", "sub/b.npy"]
    assert np.load(out / "a.npy").shape == (2, VIT_TINY.encoder_embed_dim)
    np.testing.assert_allclose(np.load(out / "a.npy"), extract_video_features(model, videos / "a.mp4"), atol=1e-5)
    assert "broken.mp4" in done.stdout and "1 video(s) failed" in done.stdout

    only_bad = command[:-1] + [str(videos / "sub" / "broken.mp4")]
    assert subprocess.run(only_bad, cwd=REPO_ROOT, capture_output=True, timeout=300).returncode == 1
    missing = subprocess.run(command[:-1] + [str(tmp_path / "missing.mp4")], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2 and "missing.mp4 is neither a video file nor a folder" in missing.stderr
