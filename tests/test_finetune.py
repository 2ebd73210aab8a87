"""Fine-tuning end to end on synthetic videos whose class is their colour (the session's `colour_csv`,
conftest.py).

The tiny 64 px encoder learns a planted colour in a few dozen steps; the tests check what it writes, that a
SIGTERM-interrupted and resumed run selects and tests exactly what the uninterrupted run does, that official
`.pt` weights become the starting encoder, that the CLI on a 4-device mesh matches one device, the CelebV-HQ
layout and early stopping, the clip sampling (also on the real face crops), worker processes, and input errors.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from marlin_jax.interop import saved_models
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.config_files import load_config
from marlin_jax.downstream import tasks
from marlin_jax.downstream.clip_loader import Parallelism, eval_batches, make_train_loader
from marlin_jax.downstream.classifier_trainer import build_finetuning, finetune_and_evaluate
from marlin_jax.marlin import Marlin
from marlin_jax.model import sincos_table
from marlin_jax.video import ClipSettings, VideoDecodeError, finetuning_clip, read_finetuning_clip
from synthetic_videos import tinted_video, write_video
from tiny_pretraining import run_env

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CSV_CONFIG = str(REPO_ROOT / "configs/finetune/csv.py") + ":binary,tiny"
SPLIT_SIZES = {"train": 32, "val": 12, "test": 12}  # the session's colour_csv (conftest.py)


def tiny_config(csv_path, **overrides):
    config = load_config(CSV_CONFIG)
    config.data.csv = str(csv_path)
    config.total_steps, config.eval_every, config.checkpoint_every, config.log_every = 24, 8, 8, 4
    config.select_metric = "acc"
    for name, value in overrides.items():
        config[name] = value
    return config


@pytest.fixture(scope="module")
def straight_run(colour_csv, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("straight")
    finetune_and_evaluate(tiny_config(colour_csv), workdir)
    return workdir


def read_records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def val_by_step(workdir: pathlib.Path) -> dict[int, dict]:
    """step -> the validation values logged at that step (the LAST row for it)."""
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("val/")} for r in read_records(workdir)
            if "val/acc" in r}


@pytest.mark.slow
def test_learns_the_planted_colour(straight_run):
    results = json.loads((straight_run / "results.json").read_text())
    assert results["acc"] >= 0.9 and results["auc"] >= 0.9, results
    assert results["val"]["acc"] >= 0.9


@pytest.mark.slow
def test_results_and_logs(straight_run):
    results = json.loads((straight_run / "results.json").read_text())
    assert {"acc", "auc", "f1", "task", "num_outputs", "num_examples", "selected_step", "val",
            "steps_run", "stopped_by", "config"} <= set(results)
    assert results["task"] == "binary" and results["num_outputs"] == 1
    assert results["num_examples"] == SPLIT_SIZES
    assert results["steps_run"] == 24 and results["stopped_by"] == "total_steps"
    assert results["selected_step"] in (8, 16, 24)
    assert sorted(val_by_step(straight_run)) == [8, 16, 24]
    assert list((straight_run / "tensorboard").glob("events.out.tfevents.*"))
    arch = MarlinArchitecture.from_dict(results["config"]["model"])
    selected = Marlin.from_file(arch, straight_run / "best")
    latest = Marlin.from_file(arch, straight_run)
    assert saved_models.read_saved_model(straight_run / "best").step == results["selected_step"]
    assert saved_models.read_saved_model(straight_run).step == 24
    assert selected.extract_features(np.zeros((1, 3, 16, 64, 64)), keep_seq=False).shape == (1, 64)
    assert latest.params["encoder"].keys() == selected.params["encoder"].keys()
    table = latest.params["encoder"]["pos_embedding"]["table"]  # fixed: zero gradients, zero Adam updates
    np.testing.assert_array_equal(table, sincos_table(arch.num_tokens, arch.encoder_embed_dim))


def _send_sigterm_after_first_step(workdir: pathlib.Path) -> threading.Thread:
    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            if (workdir / "metrics.jsonl").is_file() and read_records(workdir):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_uninterrupted_run(colour_csv, straight_run, tmp_path, capsys):
    config = tiny_config(colour_csv, log_every=1)
    watcher = _send_sigterm_after_first_step(tmp_path)
    assert finetune_and_evaluate(config, tmp_path) is None
    watcher.join()
    stopped_at = saved_models.read_saved_model(tmp_path).step
    assert 1 <= stopped_at < 24

    capsys.readouterr()
    resumed = finetune_and_evaluate(config, tmp_path)
    assert f"resumed from step {stopped_at} in {tmp_path}" in capsys.readouterr().out
    reference = json.loads((straight_run / "results.json").read_text())
    for key in ("acc", "auc", "f1", "selected_step", "val", "steps_run"):
        assert resumed[key] == reference[key], key
    assert val_by_step(tmp_path) == val_by_step(straight_run)
    ours, theirs = saved_models.read_saved_model(tmp_path), saved_models.read_saved_model(straight_run)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours.generator, theirs.generator)


@pytest.mark.slow
def test_init_from_official_pt_loads_the_encoder(colour_csv, straight_run, torch, tmp_path):
    """The fine-tuned encoder, written as an official marlin_pytorch `.pt`, is the next run's start."""
    config = tiny_config(colour_csv)
    arch = MarlinArchitecture.from_dict(config.model.to_dict())
    official = Marlin.from_file(arch, straight_run / "best").to_pytorch(tmp_path / "official")["pt"]
    config.init_from = str(official)
    run = build_finetuning(config, tmp_path / "work")
    expected = Marlin.from_file(arch, official).params["encoder"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(run.trainer.state.params["encoder"]),
                           expected)
    selected = saved_models.read_saved_model(straight_run / "best").generator["encoder"]
    jax.tree_util.tree_map(np.testing.assert_allclose, expected, selected)
    run.trainer.loader.close()


@pytest.mark.slow
def test_sharded_cli_run_matches_one_device(colour_csv, tmp_path):
    """The entry point on 4 fake devices, parameters sharded over fsdp=2 and batches over data x fsdp, against
    the same run on one device; the 0/1 labels read as two classes."""
    config_arg, steps = CSV_CONFIG.replace("binary", "multiclass"), ("--config.total_steps=4", "--config.eval_every=4")
    env = run_env(devices=4)
    command = [sys.executable, "-m", "marlin_jax.finetune", f"--config={config_arg}", f"--workdir={tmp_path / 'mesh'}",
               f"--config.data.csv={colour_csv}", *steps, "--config.mesh.shape=(2,2,1)"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    one_device = load_config(config_arg)
    one_device.data.csv, one_device.total_steps, one_device.eval_every = str(colour_csv), 4, 4
    finetune_and_evaluate(one_device, tmp_path / "one")
    sharded, single = read_records(tmp_path / "mesh"), read_records(tmp_path / "one")
    assert json.loads((tmp_path / "mesh/results.json").read_text())["num_outputs"] == 2
    for key in ("loss", "grad_norm", "param_norm", "val/auc"):
        expected = [r[key] for r in single if key in r]
        assert expected, key
        np.testing.assert_allclose([r[key] for r in sharded if key in r], expected, rtol=2e-5, err_msg=key)


@pytest.mark.slow
def test_celebvhq_layout_trains_multilabel_and_stops_on_the_learning_rate(tmp_path):
    rng = np.random.default_rng(1)
    clips = {f"clip{i:02d}": {"attributes": {"appearance": rng.integers(0, 2, 40).tolist(),
                                             "action": rng.integers(0, 2, 35).tolist()}} for i in range(10)}
    (tmp_path / "celebvhq_info.json").write_text(json.dumps({"clips": clips}))
    for clip_id in clips:
        write_video(tmp_path / "cropped" / f"{clip_id}.mp4", tinted_video(0, rng))
    dataset = tasks.read_celebvhq_task(tmp_path, "cropped", ".mp4", "action")
    assert {name: len(split) for name, split in dataset.splits.items()} == {"train": 8, "val": 1, "test": 1}
    assert dataset.num_outputs == 35 and dataset.splits["train"].labels.shape == (8, 35)

    config = load_config(str(REPO_ROOT / "configs/finetune/celebvhq_appearance.py") + ":tiny")
    config.data.root, config.batch_size, config.eval_batch_size = str(tmp_path), 4, 4
    config.optimizer.stop_learning_rate = 1.0  # above the rate: stops at the end of the first epoch (2 steps)
    results = finetune_and_evaluate(config, tmp_path / "work")
    assert results["stopped_by"] == "learning_rate" and results["steps_run"] == 2
    assert results["num_outputs"] == 40 and results["task"] == "multilabel"
    assert {"acc", "auc", "auc_per_label_mean", "num_labels_scored"} <= set(results)


def test_clip_sampling_follows_the_official_rule():
    settings, rng = ClipSettings(clip_frames=16, sample_rate=2, size=64), np.random.default_rng(0)
    assert finetuning_clip(10, settings, rng).tolist() == list(range(10)) + [9] * 6
    short = finetuning_clip(20, settings, rng)  # too short for stride 2: stride 20 // 16 = 1
    assert np.all(np.diff(short) == 1) and 0 <= short[0] <= 4
    starts = set()
    for _ in range(200):
        long = finetuning_clip(100, settings, rng)
        assert np.all(np.diff(long) == 2) and long[-1] <= 99
        starts.add(int(long[0]))
    assert min(starts) == 0 and max(starts) == 100 - 32


def test_real_face_crops_give_full_clips(samples_dir):
    """The official crops include a 15-frame video (padded) and a 27-frame one (stride 1)."""
    settings, rng = ClipSettings(16, 2, 224), np.random.default_rng(0)
    clips = {path.name: read_finetuning_clip(path, settings, rng) for path in sorted(samples_dir.glob("cropped*.mp4"))}
    assert len(clips) == 5 and all(clip.shape == (16, 224, 224, 3) for clip in clips.values())
    padded = clips["cropped04.mp4"]
    np.testing.assert_array_equal(padded[14], padded[15])
    assert np.abs(padded[13].astype(int) - padded[14]).max() > 0


def test_clips_are_resized_and_eval_clips_fixed(colour_csv):
    split = tasks.read_csv_task(colour_csv, "binary").splits["val"]
    settings = ClipSettings(16, 2, 32)
    assert read_finetuning_clip(split.paths[0], settings, np.random.default_rng(0)).shape == (16, 32, 32, 3)
    first, again = (list(eval_batches(split, 8, 0, settings, Parallelism(1, 1))) for _ in range(2))
    assert [b.shape[0] for b in first] == [8, 8]
    assert not first[1][len(split) - 8:].any()  # padding rows are blank
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    # Decoded in worker processes (3 asked for, one per batch started): the same batches.
    in_workers = list(eval_batches(split, 8, 0, settings, Parallelism(1, 1, workers=3)))
    np.testing.assert_array_equal(np.concatenate(in_workers), np.concatenate(first))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(colour_csv):
    split, settings = tasks.read_csv_task(colour_csv, "binary").splits["train"], ClipSettings(16, 2, 32)
    in_process = make_train_loader(split, 8, 0, settings, Parallelism(1, 1))
    expected = [next(in_process) for _ in range(6)]
    in_process.close()
    workers = make_train_loader(split, 8, 0, settings, Parallelism(1, 1, workers=2))
    got = [next(workers) for _ in range(3)]
    state = workers.get_state()
    workers.close()
    resumed = make_train_loader(split, 8, 0, settings, Parallelism(1, 1, workers=2))
    resumed.set_state(state)
    got += [next(resumed) for _ in range(3)]
    resumed.close()
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(want["video"], have["video"])
        np.testing.assert_array_equal(want["label"], have["label"])


def _write_rows(path: pathlib.Path, header: list[str], rows: list[list]) -> pathlib.Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_bad_input_is_named(colour_csv, tmp_path):
    video = colour_csv.parent / "videos/train_00.mp4"
    rows = [[str(video), split, 0] for split in ("train", "val", "test")]
    missing = _write_rows(tmp_path / "missing.csv", ["path", "split", "label"], rows + [["gone.mp4", "test", 1]])
    with pytest.raises(ValueError, match="do not exist.*gone.mp4"):
        tasks.check_files_exist(tasks.read_csv_task(missing, "binary"), str(missing))
    gapped = _write_rows(tmp_path / "gapped.csv", ["path", "split", "label_0", "label_2"],
                         [[str(video), split, 0, 1] for split in ("train", "val", "test")])
    with pytest.raises(ValueError, match="label_0..label_K-1"):
        tasks.read_csv_task(gapped, "multilabel")
    with pytest.raises(ValueError, match="config.task must be one of"):
        finetune_and_evaluate(tiny_config(colour_csv, task="regression"), tmp_path / "work")
    with pytest.raises(ValueError, match="unknown config arg 'regression'"):
        load_config(str(REPO_ROOT / "configs/finetune/csv.py") + ":regression")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        read_finetuning_clip(broken, ClipSettings(), np.random.default_rng(0))


@pytest.mark.slow
def test_workdir_of_another_task_refuses_to_resume(colour_csv, straight_run):
    config = tiny_config(colour_csv, task="multilabel")
    config.data.csv = str(_write_rows(straight_run.parent / "multilabel.csv", ["path", "split", "label_0", "label_1"],
                                      [[str(colour_csv.parent / "videos/train_00.mp4"), s, 0, 1]
                                       for s in ("train", "val", "test")]))
    config.batch_size = config.eval_batch_size = 1
    with pytest.raises(ValueError, match="finetune checkpoint with task='binary'"):
        finetune_and_evaluate(config, straight_run)
