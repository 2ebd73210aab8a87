"""The tiny pretraining config and its runs, shared by every test that trains: the `:tiny` config at 32 px, on
demo shards built at 32 px, run in process (`tiny_config`) or through `python -m marlin_jax.train`
(`run_train`).

Runs that train the same program share its compiled executable through the session's JAX compilation cache
(conftest.py): a tiny run at batch 4 on one device compiles once per session when every such run uses
`TOTAL_STEPS` (the learning-rate schedule, and with it the compiled step, depends on the run's length; the
logging, checkpoint and evaluation cadences do not). A cached program is the executable XLA built, so losses are
unchanged. `conftest.py` builds the shards (`small_demo_shards`) and one uninterrupted reference run
(`tiny_reference_run`) once per session.
"""

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
from marlin_jax.config_files import load_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs/pretrain/marlin_vit_small.py") + ":tiny"
IMAGE_SIZE = 32
TOTAL_STEPS = 6
LOSSES = ("rec_loss", "adv_loss", "d_loss")
TIMING = ("clips_per_s", "step_time_s", "data_wait_s")  # the only logged values a resumed run may change
# The session's reference run (conftest.tiny_reference_run): a checkpoint after every step, all kept, and
# validation (with its reconstruction image) at step 4 and at the end, off that cadence.
REFERENCE_RUN = ("--config.checkpoint_every=1", "--config.keep_checkpoints=10", "--config.evals.val.every=4")
# The tiny config at IMAGE_SIZE as a config file, for the entry points that take a config file and no overrides
# (`extract --model`), and for runs whose architecture must match one (a probe or extraction of their weights).
TINY_CONFIG_FILE = f'''
from marlin_jax.architectures import VIT_SMALL
from marlin_jax.config_builders import pretrain_config


def get_config(variant=None):
    config = pretrain_config(VIT_SMALL, "marlin_vit_small", "tiny").unlock()
    config.model.img_size = {IMAGE_SIZE}
    return config.lock()
'''


def make_small_demo(output: pathlib.Path, num_videos: int = 6, val_fraction: float = 0.2) -> pathlib.Path:
    """The demo videos (6 portraits by default: 5 train clips and 1 val) under `output/videos`, built into
    shards of 32 px face crops under `output/shards`; returns the shards' folder."""
    synthesize_videos(output / "videos", num_videos=num_videos)
    build_dataset(BuildConfig(input_dir=str(output / "videos"), output_dir=str(output / "shards"), workers=1,
                              val_fraction=val_fraction, shard_size=2, image_size=IMAGE_SIZE))
    return output / "shards"


def write_tiny_config_file(folder: pathlib.Path) -> pathlib.Path:
    path = folder / "tiny_32.py"
    path.write_text(TINY_CONFIG_FILE)
    return path


def apply_overrides(config, overrides: dict):
    """`config` with each dotted field of `overrides` set, as `--config.a.b=value` sets it; returns it."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        block = config
        for parent in parents:
            block = block[parent]
        block[leaf] = value
    return config


def tiny_config(data_path, **overrides):
    """The tiny config at IMAGE_SIZE for `train_and_evaluate`, `TOTAL_STEPS` long, with dotted `overrides`
    (`tiny_config(shards, **{"evals.val.every": 2})`)."""
    config = load_config(TINY_CONFIG)
    config.data.path = str(data_path)
    config.model.img_size = IMAGE_SIZE
    config.total_steps = TOTAL_STEPS
    return apply_overrides(config, overrides)


def run_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a test's runs: CPU, the session's JAX compilation cache and XLA flags (conftest.py), and
    `devices` fake CPU devices."""
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    if devices is not None:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def train_command(workdir, shards, *overrides: str) -> list[str]:
    """`python -m marlin_jax.train` on the tiny config at IMAGE_SIZE, TOTAL_STEPS long, every step logged;
    `overrides` come last and win."""
    return [sys.executable, "-m", "marlin_jax.train", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
            f"--config.data.path={shards}", f"--config.model.img_size={IMAGE_SIZE}",
            f"--config.total_steps={TOTAL_STEPS}", "--config.log_every=1", *overrides]


def run_train(workdir, shards, *overrides: str, env: dict[str, str] | None = None, expect_rc: int = 0,
              timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(workdir, shards, *overrides), cwd=REPO_ROOT,
                            env=run_env() if env is None else env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == expect_rc, result.stderr[-4000:]
    return result


def read_metrics(workdir) -> dict[int, dict]:
    """step -> the LAST row logged for it (a resumed run logs the steps after its checkpoint again); the workdir
    may be local or in a bucket."""
    rows = [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def without_timing(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in TIMING}


def committed_steps(workdir: pathlib.Path) -> list[int]:
    """The checkpoint steps whose save has finished (orbax renames a step's folder to its number when done)."""
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


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
