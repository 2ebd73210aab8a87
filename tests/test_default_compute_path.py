"""Pretraining as a user runs it (`python -m marlin_jax.train` on the demo data), on the default compute path:
bf16 compute, remat, 2 data-loading workers and a warmup, against the same run in float32; and the logged
learning rate against the official formula, for both `learning_rate.schedule_unit`s.

Every run logs each step to <workdir>/metrics.jsonl. The demo data has 12 training clips and the runs use
batch 8: the official trainer's epoch is len(DataLoader) = ceil(12 / 8) = 2 iterations (no drop_last).
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_prep.demo_videos import make_demo_dataset
from marlin_jax.config_files import load_config
from official_lr import official_lr_curve, official_lr_per_batch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs/pretrain/marlin_vit_small.py") + ":tiny"
BATCH = 8
WARMUP_EPOCHS = 2
# The largest relative gaps allowed between the bf16 + remat run and the float32 run at any step; the two runs
# start from the same weights and see the same clips and masks. Measured on CPU: rec_loss at most 0.06% apart
# and the generator's gradient norm 0.2% (bf16 changes the gradients more than the loss, which the pixel
# statistics dominate in these first steps).
BF16_RTOL = {"rec_loss": 0.005, "g_grad_norm": 0.01}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> tuple[pathlib.Path, int]:
    """(shards, number of training clips): 15 demo videos, 3 of them in val."""
    output = tmp_path_factory.mktemp("demo15")
    manifest = make_demo_dataset(output, num_videos=15, workers=1)
    return output / "shards", manifest["splits"]["train"]["records"]


def official_iterations_per_epoch(clips: int) -> int:
    return math.ceil(clips / BATCH)


def train(workdir: pathlib.Path, shards: pathlib.Path, num_epochs: int, steps: int, *overrides: str) -> list[dict]:
    """Runs the CLI with every step logged; returns the metrics.jsonl rows in step order."""
    command = [sys.executable, "-m", "marlin_jax.train", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
               f"--config.data.path={shards}", f"--config.batch_size={BATCH}",
               f"--config.learning_rate.warmup_epochs={WARMUP_EPOCHS}", f"--config.num_epochs={num_epochs}",
               f"--config.total_steps={steps}", "--config.log_every=1", "--config.checkpoint_every=1000",
               "--config.evals.val.max_clips=1", "--config.evals.val.images=0", *overrides]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "rec_loss" in row]  # train-step rows (evaluations log val/* rows too)
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    return rows


def _default_path_run(demo_data, workdir, compute: tuple[str, ...]) -> list[dict]:
    shards, clips = demo_data
    epochs = 10
    steps = epochs * official_iterations_per_epoch(clips)
    return train(workdir, shards, epochs, steps, "--config.data.worker_count=2", *compute)


@pytest.fixture(scope="module")
def bf16_run(demo_data, tmp_path_factory) -> list[dict]:
    return _default_path_run(demo_data, tmp_path_factory.mktemp("bf16"),
                             ("--config.compute_dtype=bfloat16", "--config.remat=true"))


@pytest.fixture(scope="module")
def fp32_run(demo_data, tmp_path_factory) -> list[dict]:
    return _default_path_run(demo_data, tmp_path_factory.mktemp("fp32"),
                             ("--config.compute_dtype=float32", "--config.remat=false"))


def test_bf16_remat_workers_warmup_tracks_float32(bf16_run, fp32_run):
    assert len(fp32_run) >= 20
    fp32 = np.array([row["rec_loss"] for row in fp32_run])
    bf16 = np.array([row["rec_loss"] for row in bf16_run])
    assert not np.array_equal(fp32, bf16), "the bf16 run computed exactly what float32 did: was it bf16?"
    assert fp32[-5:].mean() < 0.8 * fp32[:5].mean(), "the float32 run did not learn; the comparison means nothing"
    for name, tolerance in BF16_RTOL.items():
        ours, reference = (np.array([row[name] for row in run]) for run in (bf16_run, fp32_run))
        gaps = np.abs(ours - reference) / reference
        worst = int(np.argmax(gaps))
        assert gaps[worst] <= tolerance, (f"step {worst + 1}: bf16 {name} {ours[worst]:.5g} vs float32 "
                                          f"{reference[worst]:.5g} ({gaps[worst]:.2%} apart)")


def _peak_and_minimum() -> tuple[float, float]:
    """The tiny config's base and minimum rates, scaled by batch / 256 as the official train.py does."""
    rates = load_config(TINY_CONFIG).learning_rate
    return rates.base * BATCH / 256, rates.min * BATCH / 256


def test_logged_lr_is_the_official_curve_per_step(demo_data, fp32_run, bf16_run):
    _, clips = demo_data
    iterations = official_iterations_per_epoch(clips)
    peak, minimum = _peak_and_minimum()
    expected = official_lr_curve(peak, minimum, WARMUP_EPOCHS * iterations, len(fp32_run))
    for run in (fp32_run, bf16_run):
        np.testing.assert_allclose([row["lr"] for row in run], expected, rtol=1e-5, atol=1e-10)


def test_logged_lr_is_the_official_per_epoch_stepping(demo_data, tmp_path):
    shards, clips = demo_data
    assert clips % BATCH, "a partial last batch is what tells floor from the official ceil"
    iterations, epochs = official_iterations_per_epoch(clips), 4
    rows = train(tmp_path, shards, epochs, epochs * iterations, "--config.learning_rate.schedule_unit=epoch",
                 "--config.data.worker_count=0")
    peak, minimum = _peak_and_minimum()
    expected = official_lr_per_batch(peak, minimum, WARMUP_EPOCHS, epochs, iterations)
    np.testing.assert_allclose([row["lr"] for row in rows], expected, rtol=1e-5, atol=1e-10)
