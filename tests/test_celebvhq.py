"""CelebV-HQ from raw videos to probe results, on a miniature CelebV-HQ made of the sample and demo videos:
`python -m data_prep.celebvhq` (crops, failures, skipped clips, splits, resume), then `python -m marlin_jax.extract`
with official-format weights fetched by name from a local release server, then the CelebV-HQ linear probes; each
stage's output checked against what the next one reads."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
from release_server import RUN_MODULE_WITH_TINY_NAME, TINY, TINY_NAME, Release, ReleaseServer, official_weights_file

from data_prep import celebvhq_crop
from data_prep.demo_videos import synthesize_videos, write_mp4
from marlin_jax import Marlin
from marlin_jax.downstream import tasks
from marlin_jax.downstream.probe import run_linear_probe
from marlin_jax.video_features import extract_video_features
from marlin_jax.interop.official_weights import CACHE_VARIABLE, URL_VARIABLE

pytestmark = pytest.mark.slow  # crops real videos in worker processes, extracts and probes

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = {"sample_video05": "video05.mp4", "sample_cropped04": "cropped04.mp4", "sample_cropped05": "cropped05.mp4"}
NUM_DEMO_VIDEOS = 8
UNCROPPABLE = {"broken": "VideoDecodeError: cannot open",
               "faceless": "NoFaceError: no face found in any of the 20 frames"}
UNLABELLED = {"no_entry": "no entry in celebvhq_info.json",
              "short_action": "['attributes']['action'] must be a list of 35 labels"}


def info_entry(rng: np.random.Generator) -> dict:
    """A clip of celebvhq_info.json as the dataset has it (the labels drawn at random)."""
    return {"ytb_id": "x", "duration": {"start_sec": 0.0, "end_sec": 3.0},
            "bbox": {"top": 0, "bottom": 1, "left": 0, "right": 1},
            "attributes": {"appearance": rng.integers(0, 2, 40).tolist(), "action": rng.integers(0, 2, 35).tolist(),
                           "emotion": {"sep_flag": False, "labels": "neutral"}},
            "version": "v0.1"}


def frame_count(path) -> tuple[int, object, tuple[int, int]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), stream.average_rate, (stream.height, stream.width)


@pytest.fixture(scope="module")
def raw_root(samples_dir, tmp_path_factory) -> pathlib.Path:
    """The official layout: downloaded/<clip id>.mp4 and celebvhq_info.json."""
    root = tmp_path_factory.mktemp("celebvhq") / "CelebV-HQ"
    downloaded = root / "downloaded"
    downloaded.mkdir(parents=True)
    for clip_id, sample in SAMPLES.items():
        shutil.copy(samples_dir / sample, downloaded / f"{clip_id}.mp4")
    demo = synthesize_videos(root.parent / "demo", num_videos=NUM_DEMO_VIDEOS + 2)
    for index, path in enumerate(demo[:NUM_DEMO_VIDEOS]):
        shutil.move(path, downloaded / f"demo_{index:02d}.mp4")
    shutil.move(demo[-2], downloaded / "no_entry.mp4")
    shutil.move(demo[-1], downloaded / "short_action.mp4")
    (downloaded / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    write_mp4(downloaded / "faceless.mp4", np.full((20, 64, 64, 3), 128, np.uint8))
    rng = np.random.default_rng(0)
    clips = {path.stem: info_entry(rng) for path in sorted(downloaded.iterdir()) if path.stem != "no_entry"}
    clips["short_action"]["attributes"]["action"] = [0, 1]
    clips["never_downloaded"] = info_entry(rng)
    mapping = {f"{group}_mapping": [f"{group}_{k}" for k in range(count)]
               for group, count in tasks.ATTRIBUTE_COUNTS.items()}
    (root / "celebvhq_info.json").write_text(json.dumps({"meta_info": mapping, "clips": clips}))
    return root


@pytest.fixture(scope="module")
def cropped_root(raw_root) -> pathlib.Path:
    """The command as a user types it, with two worker processes."""
    done = subprocess.run([sys.executable, "-m", "data_prep.celebvhq", "--root", str(raw_root), "--workers", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"cropped {len(cropped_ids())} of "), done.stdout
    return raw_root


def cropped_ids() -> list[str]:
    return sorted([*SAMPLES, *(f"demo_{index:02d}" for index in range(NUM_DEMO_VIDEOS))])


def test_crops_every_labelled_video_and_records_the_rest(cropped_root, raw_root):
    report = json.loads((cropped_root / celebvhq_crop.REPORT_NAME).read_text())
    assert report["complete"] and report["settings"] == {"image_size": 224, "face_tracking": True, "crf": 18}
    assert sorted(path.stem for path in (cropped_root / "cropped").iterdir()) == cropped_ids()
    for clip_id in cropped_ids():
        frames, rate, size = frame_count(cropped_root / "cropped" / f"{clip_id}.mp4")
        source_frames, source_rate, _ = frame_count(raw_root / "downloaded" / f"{clip_id}.mp4")
        assert (frames, rate, size) == (source_frames, source_rate, (224, 224)), clip_id
    failures = {entry["clip_id"]: entry["reason"] for entry in report["failures"]}
    assert sorted(failures) == sorted(UNCROPPABLE)
    for clip_id, reason in UNCROPPABLE.items():
        assert reason in failures[clip_id]
    skipped = {entry["clip_id"]: entry["reason"] for entry in report["skipped"]}
    assert sorted(skipped) == sorted(UNLABELLED)
    for clip_id, reason in UNLABELLED.items():
        assert reason in skipped[clip_id]
    assert report["counts"] == {"videos": 15, "cropped": 11, "failed": 2, "skipped": 2, "pending": 0,
                                "labelled_clips_without_video": 1}
    assert not (cropped_root / celebvhq_crop.WORK_DIR).exists()

    # The splits are the sorted clip ids cut at 80% and 90%, and fine-tuning reads exactly these crops.
    ids = cropped_ids()
    expected = {"train": ids[:8], "val": ids[8:9], "test": ids[9:]}
    assert {split: (cropped_root / f"{split}.txt").read_text().split() for split in expected} == expected
    for attribute in tasks.ATTRIBUTE_COUNTS:
        task = tasks.read_celebvhq_task(cropped_root, "cropped", ".mp4", attribute)
        assert {split: list(task.splits[split].ids) for split in expected} == expected
        tasks.check_files_exist(task, "cropped")


def test_rerun_resumes_and_keeps_split_files_it_did_not_write(cropped_root, tmp_path):
    root = tmp_path / "CelebV-HQ"
    shutil.copytree(cropped_root, root)
    (root / "cropped" / "demo_03.mp4").unlink()
    (root / "cropped" / "demo_05.mp4.tmp").write_bytes(b"a killed run's half-written crop")
    kept = {path.name: path.stat().st_mtime_ns for path in (root / "cropped").glob("*.mp4")}
    report = celebvhq_crop.crop_celebvhq(celebvhq_crop.CropConfig(root=str(root), workers=1))
    assert sorted(path.name for path in (root / "cropped").iterdir()) == [f"{c}.mp4" for c in cropped_ids()]
    assert {name: (root / "cropped" / name).stat().st_mtime_ns for name in kept} == kept
    before = json.loads((cropped_root / celebvhq_crop.REPORT_NAME).read_text())
    redone = [entry["clip_id"] for entry, earlier in zip(report["clips"], before["clips"]) if entry != earlier]
    assert redone == ["demo_03"] and report["counts"] == before["counts"]

    # Split files written by someone else stay; the ones this command wrote follow the crops.
    for split, clip_ids in {"train": ["demo_00"], "val": ["demo_01"], "test": ["nowhere"]}.items():
        (root / f"{split}.txt").write_text("".join(f"{c}\n" for c in clip_ids))
    assert celebvhq_crop.crop_celebvhq(celebvhq_crop.CropConfig(root=str(root), workers=1))["splits"] == {
        "source": "kept", "train": 1, "val": 1, "test": 1}
    assert (root / "test.txt").read_text() == "nowhere\n"

    with pytest.raises(ValueError, match="was cropped with .*'image_size': 224.*not .*'image_size': 112"):
        celebvhq_crop.crop_celebvhq(celebvhq_crop.CropConfig(root=str(root), workers=1, image_size=112))


def test_bad_roots_say_what_is_missing(tmp_path):
    (tmp_path / "downloaded").mkdir()
    done = subprocess.run([sys.executable, "-m", "data_prep.celebvhq", "--root", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert "CelebV-HQ label file not found" in done.stderr
    (tmp_path / "celebvhq_info.json").write_text(json.dumps({"clips": {}}))
    with pytest.raises(ValueError, match="downloaded holds no .mp4 videos"):
        celebvhq_crop.crop_celebvhq(celebvhq_crop.CropConfig(root=str(tmp_path)))


def load_probe_config(name: str, feature_dir: str):
    spec = importlib.util.spec_from_file_location(f"probe_{name}", REPO_ROOT / "configs/probe" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(feature_dir)


def test_extract_by_name_then_probe(cropped_root, marlin_pytorch, tmp_path):
    weights = official_weights_file(marlin_pytorch, TINY, seed=5, full=False)
    release = Release({f"{TINY_NAME}.encoder.pt": weights})
    features = cropped_root / TINY_NAME  # where the probe configs look: <root>/<backbone name>
    with ReleaseServer(release) as url:
        env = dict(os.environ, JAX_PLATFORMS="cpu", **{URL_VARIABLE: url, CACHE_VARIABLE: str(tmp_path / "cache")})
        done = subprocess.run(
            [sys.executable, "-c", RUN_MODULE_WITH_TINY_NAME, "marlin_jax.extract", "--model", TINY_NAME,
             "--weights", TINY_NAME, "--output_dir", str(features), str(cropped_root / "cropped")],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert release.requests == [f"{TINY_NAME}.encoder.pt", "SHA256SUMS"]
    assert sorted(path.stem for path in features.iterdir()) == cropped_ids()
    (tmp_path / "weights.pt").write_bytes(weights)
    model = Marlin.from_file(TINY, tmp_path / "weights.pt")
    crop = cropped_root / "cropped" / "sample_video05.mp4"
    np.testing.assert_allclose(np.load(features / "sample_video05.npy"), extract_video_features(model, crop),
                               atol=1e-5)

    split_sizes = {split: len((cropped_root / f"{split}.txt").read_text().split()) for split in tasks.SPLITS}
    for attribute in tasks.ATTRIBUTE_COUNTS:
        config = load_probe_config(f"celebvhq_{attribute}", TINY_NAME)
        config.data.root = str(cropped_root)
        results = run_linear_probe(config, tmp_path / attribute)
        assert results == json.loads((tmp_path / attribute / "results.json").read_text())
        assert results["num_examples"] == split_sizes and results["num_outputs"] == tasks.ATTRIBUTE_COUNTS[attribute]
        assert results["label_names"][0] == f"{attribute}_0" and 0.0 <= results["auc"] <= 1.0
