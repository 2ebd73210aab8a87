"""Tiny pretraining runs through `python -m marlin_jax.train`, cheap enough to run, break and resume in tests:
the tiny config at 32 px on demo shards built at 32 px, and the JAX compilation cache that conftest.py shares with
every run of the session (the same programs compile once; a cached program is the one XLA built, so losses are
unchanged)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

from etils import epath

from data_prep.build_state import BuildConfig
from data_prep.local_build import build_dataset
from data_prep.demo_videos import synthesize_videos

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs/pretrain/marlin_vit_small.py") + ":tiny"
IMAGE_SIZE = 32
LOSSES = ("rec_loss", "adv_loss", "d_loss")
TIMING = ("clips_per_s", "step_time_s", "data_wait_s")  # the only logged values a resumed run may change


def make_small_demo(output: pathlib.Path) -> pathlib.Path:
    """The demo videos (6 portraits, 5 train clips and 1 val) built into shards of 32 px face crops."""
    synthesize_videos(output / "videos", num_videos=6)
    build_dataset(BuildConfig(input_dir=str(output / "videos"), output_dir=str(output / "shards"), workers=1,
                              val_fraction=0.2, shard_size=2, image_size=IMAGE_SIZE))
    return output / "shards"


def run_env(compile_cache: pathlib.Path | None = None, devices: int | None = None) -> dict[str, str]:
    """The environment of a test's runs: CPU, and a JAX compilation cache: the session's, which conftest.py sets,
    else `compile_cache`."""
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    if compile_cache is not None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def train_command(workdir, shards, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "marlin_jax.train", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
            f"--config.data.path={shards}", f"--config.model.img_size={IMAGE_SIZE}", "--config.log_every=1",
            *overrides]


def run_train(workdir, shards, *overrides: str, env: dict[str, str], expect_rc: int = 0,
              timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(workdir, shards, *overrides), cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == expect_rc, result.stderr[-4000:]
    return result


def read_metrics(workdir) -> dict[int, dict]:
    """step -> the LAST row logged for it (a resumed run logs the steps after its checkpoint again); the workdir
    may be local or in a bucket."""
    rows = [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def without_timing(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in TIMING}


def copy_run_until(source: pathlib.Path, target: pathlib.Path, last_step: int) -> None:
    """`target` as `source` looked after its checkpoint of `last_step` (a run stopped there): its checkpoints up to
    that step, and its metrics rows up to it."""
    (target / "checkpoints").mkdir(parents=True)
    for step_dir in (source / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) <= last_step:
            shutil.copytree(step_dir, target / "checkpoints" / step_dir.name)
    rows = [line for line in (source / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= last_step]
    (target / "metrics.jsonl").write_text("".join(f"{row}\n" for row in rows))
