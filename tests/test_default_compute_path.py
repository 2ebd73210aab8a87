"""Pretraining as a user runs it (`python -m marlin_jax.train` on the demo data), on the default compute path:
bf16 compute, remat, 2 data-loading workers and a warmup, against the same run in float32; the compiled step
holds the rematerialisation and the bf16 matmuls; the workers feed the clips the training process would read
itself; and the learning rate against the official formula: logged by the runs (per step), and the per-epoch
schedule the trainer builds.

Every run logs each step to <workdir>/metrics.jsonl. The demo data (tiny_pretraining's 32 px shards of 15 videos)
has 12 training clips and the runs use batch 8: the official trainer's epoch is len(DataLoader) = ceil(12 / 8) = 2
iterations (no drop_last).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import typing

import jax
import numpy as np
import pytest

from marlin_jax.data import codecs
from marlin_jax.data.schema import parse_clip
from marlin_jax.data.shards import load_manifest
from marlin_jax.data.tfrecord import read_records
from marlin_jax.pretraining.trainer import build_trainer, schedule_lengths
from marlin_jax.training.schedules import learning_rate_schedule
from marlin_jax.interop import saved_models
from official_lr import official_lr_curve, official_lr_per_batch
from tiny_pretraining import IMAGE_SIZE, REPO_ROOT, TINY_CONFIG, make_small_demo, tiny_config

pytestmark = pytest.mark.slow

BATCH = 8
WARMUP_EPOCHS = 2
# The largest relative gaps allowed between the bf16 + remat run and the float32 run at any step; the two runs
# start from the same weights and see the same clips and masks. Measured on CPU (AMD EPYC, 2026-12-07): rec_loss
# at most 0.03% apart and the generator's gradient norm 0.09% (bf16 changes the gradients more than the loss,
# which the pixel statistics dominate in these first steps).
BF16_RTOL = {"rec_loss": 0.005, "g_grad_norm": 0.01}
# The train step's program as JAX lowers it (StableHLO), dumped by each run: JAX_DUMP_IR_TO.
TRAIN_STEP_PROGRAM = "*jit_train_step*.mlir"
DOT = re.compile(r"stablehlo\.dot_general[^\n]*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> tuple[pathlib.Path, int]:
    """(shards, number of training clips): 15 demo videos, 3 of them in val."""
    shards = make_small_demo(tmp_path_factory.mktemp("demo15"), num_videos=15)
    return shards, load_manifest(shards)["splits"]["train"]["records"]


def official_iterations_per_epoch(clips: int) -> int:
    return math.ceil(clips / BATCH)


def train(workdir: pathlib.Path, shards: pathlib.Path, num_epochs: int, steps: int, *overrides: str) -> list[dict]:
    """Runs the CLI with every step logged and its programs dumped to <workdir>/ir; returns the metrics.jsonl
    rows in step order."""
    command = [sys.executable, "-m", "marlin_jax.train", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
               f"--config.data.path={shards}", f"--config.model.img_size={IMAGE_SIZE}", f"--config.batch_size={BATCH}",
               f"--config.learning_rate.warmup_epochs={WARMUP_EPOCHS}", f"--config.num_epochs={num_epochs}",
               f"--config.total_steps={steps}", "--config.log_every=1", "--config.checkpoint_every=1000",
               "--config.evals.val.max_clips=1", "--config.evals.val.images=0", *overrides]
    done = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, JAX_DUMP_IR_TO=str(workdir / "ir")),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "rec_loss" in row]  # train-step rows (evaluations log val/* rows too)
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    return rows


class Run(typing.NamedTuple):
    rows: list[dict]  # the logged train-step rows
    program: str  # the train step's lowered program
    workdir: pathlib.Path


def _default_path_run(demo_data, workdir, compute: tuple[str, ...]) -> Run:
    shards, clips = demo_data
    epochs = 10
    steps = epochs * official_iterations_per_epoch(clips)
    rows = train(workdir, shards, epochs, steps, "--config.data.worker_count=2", *compute)
    (program,) = (workdir / "ir").glob(TRAIN_STEP_PROGRAM)
    return Run(rows, program.read_text(), workdir)


@pytest.fixture(scope="module")
def bf16_run(demo_data, tmp_path_factory) -> Run:
    return _default_path_run(demo_data, tmp_path_factory.mktemp("bf16"),
                             ("--config.compute_dtype=bfloat16", "--config.remat=true"))


@pytest.fixture(scope="module")
def fp32_run(demo_data, tmp_path_factory) -> Run:
    return _default_path_run(demo_data, tmp_path_factory.mktemp("fp32"),
                             ("--config.compute_dtype=float32", "--config.remat=false"))


def test_bf16_remat_workers_warmup_tracks_float32(bf16_run, fp32_run):
    bf16_rows, fp32_rows = bf16_run.rows, fp32_run.rows
    assert len(fp32_rows) >= 20
    fp32 = np.array([row["rec_loss"] for row in fp32_rows])
    bf16 = np.array([row["rec_loss"] for row in bf16_rows])
    assert not np.array_equal(fp32, bf16), "the bf16 run computed exactly what float32 did: was it bf16?"
    assert fp32[-5:].mean() < 0.8 * fp32[:5].mean(), "the float32 run did not learn; the comparison means nothing"
    for name, tolerance in BF16_RTOL.items():
        ours, reference = (np.array([row[name] for row in rows]) for rows in (bf16_rows, fp32_rows))
        gaps = np.abs(ours - reference) / reference
        worst = int(np.argmax(gaps))
        assert gaps[worst] <= tolerance, (f"step {worst + 1}: bf16 {name} {ours[worst]:.5g} vs float32 "
                                          f"{reference[worst]:.5g} ({gaps[worst]:.2%} apart)")


def test_the_compiled_step_rematerialises_every_block(bf16_run, fp32_run):
    """jax.checkpoint fences each rematerialised block's recomputation with an optimization barrier, so that XLA
    cannot merge it back into the forward pass: one per transformer block of the encoder and the decoder with
    --config.remat=true, none without."""
    model = tiny_config("").model
    blocks = model.encoder_depth + model.decoder_depth
    assert bf16_run.program.count("stablehlo.optimization_barrier") == blocks
    assert fp32_run.program.count("stablehlo.optimization_barrier") == 0


def test_the_compiled_step_multiplies_in_bf16(bf16_run, fp32_run):
    """With --config.compute_dtype=bfloat16 the encoder's and decoder's matmuls take bf16 operands (the
    discriminator and the parameters stay float32); the float32 run has no bf16 matmul."""
    def operand_types(program: str) -> collections.Counter:
        return collections.Counter(tuple(re.sub(r".*x", "", t.rstrip(">")) for t in match)
                                   for match in DOT.findall(program))

    bf16_dots, fp32_dots = operand_types(bf16_run.program), operand_types(fp32_run.program)
    assert set(fp32_dots) == {("f32", "f32")}, fp32_dots
    assert set(bf16_dots) == {("bf16", "bf16"), ("f32", "f32")}, bf16_dots
    assert bf16_dots["bf16", "bf16"] > bf16_dots["f32", "f32"], bf16_dots


def test_bf16_compute_keeps_float32_parameters(bf16_run):
    """bf16 compute with remat updates float32 parameters: every step past the first (learning rate 0, the warm-up's
    start) moved them, and the run's checkpoint holds float32 weights only."""
    assert all(np.isfinite(row["rec_loss"]) for row in bf16_run.rows)
    assert all(row["g_update_norm"] > 0 for row in bf16_run.rows if row["lr"] > 0)
    assert sum(row["lr"] > 0 for row in bf16_run.rows) == len(bf16_run.rows) - 1
    saved = saved_models.read_saved_model(bf16_run.workdir)
    leaves = jax.tree_util.tree_leaves((saved.generator, saved.discriminator))
    assert leaves and {np.asarray(leaf).dtype for leaf in leaves} == {np.dtype(np.float32)}


def _record_of_each_frame(shards: pathlib.Path) -> dict[str, str]:
    """sha1 of every decoded training frame -> the source of its record."""
    owner = {}
    for shard in load_manifest(shards)["shards"]:
        if shard["split"] == "train":
            for data in read_records(shards / shard["file"]):
                record = parse_clip(data)
                for frame in record.frames_jpeg:
                    owner[hashlib.sha1(codecs.decode_jpeg(frame).tobytes()).hexdigest()] = record.source_id
    return owner


def test_two_workers_feed_the_clips_the_training_process_reads_itself(demo_data, tmp_path):
    """The loader the trainer builds for the default-path run, with its 2 worker processes and with none. Each
    worker reads every other shard of the shuffled shard stream and shuffles in windows of its own, so batch
    order differs; but over two shuffle windows per worker both have read the same shards, and must have fed each
    record as often as each other (a worker that dropped or repeated clips would not)."""
    shards, clips = demo_data
    owner = _record_of_each_frame(shards)
    config = tiny_config(shards, batch_size=BATCH, **{"data.worker_count": 2})
    workers = config.data.worker_count
    manifest = load_manifest(shards)
    # Two windows per worker end on a shard boundary of both streams: all shards hold 2 records.
    assert all(shard["num_records"] == 2 for shard in manifest["shards"] if shard["split"] == "train")
    batches = 2 * workers * config.data.shuffle_buffer // BATCH

    def records_fed(worker_count: int) -> collections.Counter:
        config.data.worker_count = worker_count
        trainer = build_trainer(config, tmp_path / f"workers_{worker_count}")
        try:
            videos = [next(trainer.loader)["video"] for _ in range(batches)]
        finally:
            trainer.loader.close()
        return collections.Counter(owner[hashlib.sha1(clip[0].tobytes()).hexdigest()]
                                   for batch in videos for clip in batch)

    with_workers, in_process = records_fed(workers), records_fed(0)
    assert with_workers == in_process
    assert len(in_process) == clips and max(in_process.values()) - min(in_process.values()) <= 1, in_process


def _peak_and_minimum() -> tuple[float, float]:
    """The tiny config's base and minimum rates, scaled by batch / 256 as the official train.py does."""
    rates = tiny_config("").learning_rate
    return rates.base * BATCH / 256, rates.min * BATCH / 256


def test_logged_lr_is_the_official_curve_per_step(demo_data, fp32_run, bf16_run):
    _, clips = demo_data
    iterations = official_iterations_per_epoch(clips)
    peak, minimum = _peak_and_minimum()
    expected = official_lr_curve(peak, minimum, WARMUP_EPOCHS * iterations, len(fp32_run.rows))
    for run in (fp32_run, bf16_run):
        np.testing.assert_allclose([row["lr"] for row in run.rows], expected, rtol=1e-5, atol=1e-10)


def test_the_per_epoch_schedule_is_the_official_stepping(demo_data):
    """`learning_rate.schedule_unit=epoch`: the schedule the trainer builds from the config and the manifest (the
    one its train step logs, as the test above shows for the per-step unit) holds each epoch's rate, with the
    official epoch length ceil(clips / batch)."""
    shards, clips = demo_data
    assert clips % BATCH, "a partial last batch is what tells floor from the official ceil"
    iterations, epochs = official_iterations_per_epoch(clips), 4
    config = tiny_config(shards, batch_size=BATCH, num_epochs=epochs, total_steps=epochs * iterations,
                         **{"learning_rate.warmup_epochs": WARMUP_EPOCHS, "learning_rate.schedule_unit": "epoch"})
    steps_per_epoch, total_steps = schedule_lengths(config)
    assert (steps_per_epoch, total_steps) == (iterations, epochs * iterations)
    schedule = learning_rate_schedule(config.learning_rate, BATCH, steps_per_epoch, total_steps)
    peak, minimum = _peak_and_minimum()
    expected = official_lr_per_batch(peak, minimum, WARMUP_EPOCHS, epochs, iterations)
    # The step logs the rate it applies: the schedule at the step's index (0 for the first logged row).
    np.testing.assert_allclose([float(schedule(step)) for step in range(total_steps)], expected, rtol=1e-5,
                               atol=1e-10)
