"""Two JAX processes over loopback (gloo CPU collectives, 2 devices each): the multi-host paths as a TPU pod runs
them, with every cadence on (logging, checkpoints, validation with images, the in-training probe, the NaN
check, best/).

One uninterrupted two-process pretraining run (`reference_run`, tests/tiny_pretraining.py's tiny config at 32 px)
carries the FSDP, every-cadence and init_from checks and is what the SIGTERM test's interrupted and resumed run
must reproduce. Its mesh (1, 4, 1) shards the parameters over all four devices of both processes; fine-tuning
below runs data-parallel across the processes.

These runs are also the guard against host fetches of global arrays: JAX refuses to fetch an array that spans
another process's devices (RuntimeError), so any such fetch on these paths fails the run and the test.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from marlin_jax import Marlin
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.config_files import load_config
from marlin_jax.downstream.classifier_trainer import finetune_and_evaluate
from marlin_jax.video_features import extract_video_features
from marlin_jax.interop import saved_models
from tiny_pretraining import (
    IMAGE_SIZE,
    REPO_ROOT,
    TINY_CONFIG,
    TOTAL_STEPS,
    apply_overrides,
    committed_steps,
    make_small_demo,
    read_metrics,
    tiny_config,
    write_tiny_config_file,
)

pytestmark = pytest.mark.slow

LOSSES = ("rec_loss", "adv_loss", "d_loss", "val/rec_loss", "val/loss", "probe/demo/auc")
# Every cadence fires during the run: rows and checkpoints every step, validation (with images) every 2 steps,
# the probe every 3. One warm-up epoch (2 steps of 4 clips) starts the learning rate at 0, so the checkpoint of
# step 1 holds the weights the run started from.
RUN = (f"--config.model.img_size={IMAGE_SIZE}", f"--config.total_steps={TOTAL_STEPS}", "--config.log_every=1",
       "--config.checkpoint_every=1", "--config.keep_checkpoints=10", "--config.evals.val.every=2",
       "--config.evals.probe.every=3", "--config.evals.probe.batch_size=4", "--config.evals.probe.name=demo",
       "--config.learning_rate.warmup_epochs=1", "--config.mesh.shape=(1,4,1)")
CACHE_EVERY_PROCESS = pathlib.Path(__file__).with_name("cache_every_process.py")
PROCESS_ENV = {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_processes(module: str, *args: str, count: int = 2) -> list[subprocess.Popen]:
    """`python -m <module> <args>` as `count` JAX processes of one job, each writing the programs it compiles to
    the session's compilation cache (tests/cache_every_process.py)."""
    port, env = _free_port(), {**os.environ, **PROCESS_ENV}
    return [subprocess.Popen([sys.executable, str(CACHE_EVERY_PROCESS), module, *args,
                              f"--coordinator_address=127.0.0.1:{port}",
                              f"--num_processes={count}", f"--process_id={index}"],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for index in range(count)]


def finish(processes: list[subprocess.Popen], timeout: float = 900) -> list[str]:
    """Waits for every process; fails with its stderr if one did not exit 0. Returns their stdouts."""
    outputs = [process.communicate(timeout=timeout) for process in processes]
    for index, (process, (_, stderr)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"process {index} exited {process.returncode}:\n{stderr[-4000:]}"
    return [stdout for stdout, _ in outputs]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, marlin_pytorch) -> dict:
    """Demo shards at 32 px (4 train shards: 2 per host), a labelled CSV of its face videos for the probe
    evaluator, an official-format encoder .pt to start from, and the tiny config file at that size."""
    root = tmp_path_factory.mktemp("demo")
    shards = make_small_demo(root, num_videos=10)
    videos = sorted((root / "videos").glob("*.mp4"))
    with (root / "probe.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "split", "label"])
        for index, video in enumerate(videos):  # 6 train, 2 val, 2 test; each split holds both labels
            split = "train" if index < 6 else "val" if index < 8 else "test"
            writer.writerow([f"videos/{video.name}", split, index % 2])
    arch = MarlinArchitecture.from_dict(tiny_config(shards).model.to_dict())
    weights = Marlin.random_init(arch, seed=3, full=False).to_pytorch(root / "official_encoder")["pt"]
    return {"shards": shards, "csv": root / "probe.csv", "weights": weights, "arch": arch,
            "config_file": write_tiny_config_file(root)}


def pretrain_args(workdir: pathlib.Path, demo: dict) -> tuple[str, ...]:
    return (f"--config={TINY_CONFIG}", f"--workdir={workdir}", f"--config.data.path={demo['shards']}",
            f"--config.evals.probe.csv={demo['csv']}", f"--config.init_from={demo['weights']}", *RUN)


@pytest.fixture(scope="module")
def reference_run(demo, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("reference_1x4")
    stdouts = finish(start_processes("marlin_jax.train", *pretrain_args(workdir, demo)))
    for index, stdout in enumerate(stdouts):  # every process announces itself once
        assert f"process {index}/2: cpu backend, 2 local x cpu (4 global), mesh {{'data': 1, 'fsdp': 4, " \
               "'tensor': 1}, per-host batch 2" in stdout
    return workdir


def test_fsdp_across_processes_runs_every_cadence(reference_run):
    records = read_metrics(reference_run)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert [s for s in records if "val/loss" in records[s]] == [2, 4, 6]
    assert [s for s in records if "probe/demo/auc" in records[s]] == [3, 6]
    assert all(np.isfinite(records[s][k]) for s in records for k in ("rec_loss", "d_loss", "data/corrupt_records"))
    assert sorted(p.name for p in (reference_run / "reconstructions").glob("*.png")) == [
        "step_00000002.png", "step_00000004.png", "step_00000006.png"]
    assert saved_models.read_saved_model(reference_run).step == 6
    best = min((2, 4, 6), key=lambda step: records[step]["val/loss"])
    assert saved_models.read_saved_model(reference_run / "best").step == best
    saved = json.loads((reference_run / "config.json").read_text())
    assert saved["resolved"]["process_count"] == 2 and saved["resolved"]["mesh"] == {"data": 1, "fsdp": 4,
                                                                                    "tensor": 1}


def test_init_from_lands_in_pure_fsdp_across_processes(reference_run, demo):
    """Mesh (1, 4, 1): parameters sharded over all four devices of both processes. The official .pt was loaded
    on every host straight into that layout: step 1, at learning rate 0 (the first warm-up step), keeps it."""
    assert read_metrics(reference_run)[1]["lr"] == 0.0
    expected = Marlin.from_file(demo["arch"], demo["weights"]).params["encoder"]
    saved = saved_models.read_saved_model(reference_run, 1).generator["encoder"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, saved, expected)


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_resumes(reference_run, demo, tmp_path):
    args = pretrain_args(tmp_path, demo)  # the reference run's exact config
    processes = start_processes("marlin_jax.train", *args)
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in processes) and not committed_steps(tmp_path):
        time.sleep(0.02)
    processes[1].send_signal(signal.SIGTERM)
    finish(processes)
    stopped = saved_models.read_saved_model(tmp_path)
    assert 1 <= stopped.step < TOTAL_STEPS, "the preempted run should stop early, at a step both processes agreed on"
    assert max(read_metrics(tmp_path)) == stopped.step

    stdouts = finish(start_processes("marlin_jax.train", *args))
    assert f"resumed from step {stopped.step} in {tmp_path}" in stdouts[0], stdouts[0][-3000:]
    reference, resumed = read_metrics(reference_run), read_metrics(tmp_path)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        for key in LOSSES:
            if key in reference[step]:
                assert resumed[step][key] == reference[step][key], (step, key)


def test_finetuning_with_two_processes_and_decode_workers_matches_one_process(demo, tmp_path):
    """Data-parallel over both processes' devices, each process decoding in 2 worker processes, against this
    process on one device decoding in process (the workers' batches equal in-process decoding:
    test_finetune.py)."""
    config = str(REPO_ROOT / "configs/finetune/csv.py") + ":binary,tiny"
    settings = {"data.csv": str(demo["csv"]), "batch_size": 4, "eval_batch_size": 4, "total_steps": 4,
                "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "data.worker_count": 2}
    finish(start_processes("marlin_jax.finetune", f"--config={config}", f"--workdir={tmp_path / 'two'}",
                           *(f"--config.{key}={value}" for key, value in settings.items())))
    finetune_and_evaluate(apply_overrides(load_config(config), {**settings, "data.worker_count": 0}), tmp_path / "one")
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        for key in ("loss", "grad_norm", "val/auc"):
            if key in one[step]:
                np.testing.assert_allclose(two[step][key], one[step][key], rtol=2e-5, err_msg=f"{key} at {step}")
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["steps_run"] == 4 and "auc" in results


def test_extraction_splits_videos_over_processes(demo, tmp_path):
    videos = demo["csv"].parent / "videos"
    args = ("--model", str(demo["config_file"]), "--weights", str(demo["weights"]), "--batch_size", "2")
    finish(start_processes("marlin_jax.extract", *args, "--output_dir", str(tmp_path / "two"), str(videos)))
    model = Marlin.from_file(demo["arch"], demo["weights"])
    written = sorted(p.name for p in (tmp_path / "two").glob("*.npy"))
    assert written == sorted(f"{v.stem}.npy" for v in videos.glob("*.mp4"))
    for name in written:
        np.testing.assert_allclose(np.load(tmp_path / "two" / name),
                                   extract_video_features(model, videos / name.replace(".npy", ".mp4")),
                                   atol=1e-5, err_msg=name)
