"""Preemption soak (too long for CI): a tiny pretraining run hit by SIGTERMs and SIGKILLs at random steps, resumed
each time by rerunning the same command, must end with the losses of the uninterrupted run, step for step.

    python benchmarks/preemption_soak.py --workdir /tmp/soak            # 2,000 steps, 10 SIGTERMs, 10 SIGKILLs
    python benchmarks/preemption_soak.py --workdir /tmp/soak --steps 300 --sigterms 3 --sigkills 3

The run is `python -m marlin_jax.train` with the tiny config at 32 px on the demo videos built at 32 px (a step
takes tens of milliseconds on a CPU), logging every step and checkpointing every `--checkpoint_every` steps. Half
the signals (`--storm_share`) land 1 to 8 steps after a restart, as in a preemption storm, so that a run resumed
is soon checkpointed and resumed again; the others at sorted random steps spread over the run. A SIGKILL loses the
steps since the last checkpoint (or catches a save half-written); a SIGTERM saves at the next step and exits. All
processes share a JAX compilation cache, so a restart costs seconds. Prints one JSON object: the interruptions
sent and survived, the steps compared and max |Δloss| against the uninterrupted run (0.0 when every logged loss is
bit-identical), and the wall times with the machine's JAX matmul rate and load.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from data_prep.build_state import BuildConfig
from data_prep.local_build import build_dataset
from data_prep.demo_videos import synthesize_videos

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import mfu  # noqa: E402  (benchmarks/ is not a package)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs/pretrain/marlin_vit_small.py") + ":tiny"
IMAGE_SIZE = 32
LOSSES = ("rec_loss", "adv_loss", "d_loss", "g_loss")


def small_demo(folder: pathlib.Path) -> pathlib.Path:
    shards = folder / "shards"
    if not (shards / "manifest.json").is_file():
        synthesize_videos(folder / "videos", num_videos=6)
        build_dataset(BuildConfig(input_dir=str(folder / "videos"), output_dir=str(shards), workers=1,
                                  val_fraction=0.2, shard_size=2, image_size=IMAGE_SIZE))
    return shards


class Run:
    """The training command for one workdir, started again and again."""

    def __init__(self, workdir: pathlib.Path, shards: pathlib.Path, args, compile_cache: pathlib.Path):
        self.workdir = workdir
        self.command = [sys.executable, "-m", "marlin_jax.train", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
                        f"--config.data.path={shards}", f"--config.model.img_size={IMAGE_SIZE}",
                        f"--config.total_steps={args.steps}", "--config.log_every=1",
                        f"--config.checkpoint_every={args.checkpoint_every}", "--config.keep_checkpoints=3",
                        "--config.evals.val.every=0"]
        self.env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compile_cache),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
        self.metrics = workdir / "metrics.jsonl"

    def start(self) -> tuple[subprocess.Popen, int]:
        """The process, and the offset in metrics.jsonl where its rows begin."""
        offset = self.metrics.stat().st_size if self.metrics.exists() else 0
        log = (self.workdir.parent / f"{self.workdir.name}.log").open("a")
        return subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=log), offset

    def logged_steps(self, offset: int) -> list[int]:
        """The steps logged since `offset`, in order (whole rows only)."""
        if not self.metrics.exists():
            return []
        with self.metrics.open("rb") as file:
            file.seek(offset)
            rows = file.read().split(b"\n")[:-1]
        return [json.loads(row)["step"] for row in rows]

    def run_to_end(self, deadline: float) -> int:
        process, _ = self.start()
        return process.wait(timeout=max(1.0, deadline - time.time()))


def interrupt(run: Run, kind: signal.Signals, deadline: float, *, at_step: int | None = None,
              after_restart: int | None = None) -> dict:
    """Starts the run and sends `kind` once it has logged `at_step`, or `after_restart` steps past the step it
    resumed from; waits for the exit."""
    process, offset = run.start()

    def target() -> int | None:
        steps = run.logged_steps(offset)
        if at_step is not None:
            return at_step
        return steps[0] - 1 + after_restart if steps else None

    while time.time() < deadline and process.poll() is None:
        steps, goal = run.logged_steps(offset), target()
        if goal is not None and steps and steps[-1] >= goal:
            break
        time.sleep(0.01)
    if process.poll() is not None:
        raise RuntimeError(f"the run exited with {process.returncode} before its interruption; see "
                           f"{run.workdir}.log")
    if time.time() >= deadline:
        process.kill()
        raise TimeoutError("the soak ran past its wall-time bound")
    steps = run.logged_steps(offset)
    process.send_signal(kind)
    returncode = process.wait(timeout=max(1.0, deadline - time.time()))
    return {"signal": kind.name, "resumed_at_step": steps[0] - 1, "hit_at_step": steps[-1],
            "storm": after_restart is not None, "returncode": returncode}


def read_losses(metrics: pathlib.Path) -> dict[int, dict[str, float]]:
    """step -> its last logged losses (a resumed run logs the steps after its checkpoint again)."""
    rows = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {key: row[key] for key in LOSSES}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path, help="scratch folder (runs, data, cache)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sigterms", type=int, default=10)
    parser.add_argument("--sigkills", type=int, default=10)
    parser.add_argument("--checkpoint_every", type=int, default=25)
    parser.add_argument("--storm_share", type=float, default=0.5,
                        help="share of interruptions sent 1 to 8 steps after a restart (a preemption storm); the "
                             "others land at sorted random steps spread over the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_minutes", type=float, default=90, help="wall-time bound for the whole soak")
    args = parser.parse_args()
    if args.sigterms + args.sigkills >= args.steps - 21:
        raise SystemExit("--steps must exceed the number of interruptions")
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + 60 * args.max_minutes
    peak_gflops = mfu.jax_matmul_gflops()  # the machine's state for the wall times below
    shards = small_demo(args.workdir / "demo")
    cache = args.workdir / "compile_cache"
    reference, soaked = (Run(args.workdir / name, shards, args, cache) for name in ("reference", "soaked"))
    for run in (reference, soaked):
        if run.workdir.exists():
            raise SystemExit(f"{run.workdir} exists; pass a fresh --workdir")

    reference_start = time.time()
    if reference.run_to_end(deadline) != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {reference.workdir}.log")
    reference_s = time.time() - reference_start

    rng = np.random.default_rng(args.seed)
    kinds = [signal.SIGTERM] * args.sigterms + [signal.SIGKILL] * args.sigkills
    rng.shuffle(kinds)
    storms = rng.random(len(kinds)) < args.storm_share
    # Not in the last 20 steps: the run could end before the signal lands.
    targets = iter(np.sort(rng.choice(np.arange(1, args.steps - 20), size=int((~storms).sum()), replace=False)))
    soak_start = time.time()
    interruptions = []
    for kind, storm in zip(kinds, storms):
        when = {"after_restart": int(rng.integers(1, 9))} if storm else {"at_step": int(next(targets))}
        interruptions.append(interrupt(soaked, kind, deadline, **when))
    final_returncode = soaked.run_to_end(deadline)
    soak_s = time.time() - soak_start

    expected, got = read_losses(reference.metrics), read_losses(soaked.metrics)
    steps = sorted(set(expected) & set(got))
    deltas = [abs(got[s][k] - expected[s][k]) for s in steps for k in LOSSES]
    finished = final_returncode == 0 and sorted(got) == sorted(expected) == list(range(1, args.steps + 1))
    log_text = (args.workdir / "soaked.log").read_text()
    print(json.dumps({
        "steps": args.steps,
        "checkpoint_every": args.checkpoint_every,
        "sigterms": args.sigterms,
        "sigkills": args.sigkills,
        "storm_interruptions": int(storms.sum()),
        # Survived: the run resumed after each interruption and ended with every step logged.
        "interruptions_survived": len(interruptions) if finished else 0,
        "sigterm_exit_0": sum(1 for i in interruptions if i["signal"] == "SIGTERM" and i["returncode"] == 0),
        "resumes": log_text.count("resumed from step"),
        "half_written_checkpoints_removed": log_text.count("was left half-written"),
        "final_returncode": final_returncode,
        "steps_compared": len(steps),
        "steps_missing": sorted(set(expected) ^ set(got)),
        "max_abs_delta_loss": max(deltas) if deltas else None,
        "steps_bit_identical": sum(all(got[s][k] == expected[s][k] for k in LOSSES) for s in steps),
        "interruptions": interruptions,
        "reference_wall_s": round(reference_s, 1),
        "soak_wall_s": round(soak_s, 1),
        "total_wall_s": round(time.time() - start, 1),
        "jax_matmul_gflops": round(peak_gflops, 1),
        "machine": mfu.machine(),
    }, indent=1))

if __name__ == "__main__":
    main()
