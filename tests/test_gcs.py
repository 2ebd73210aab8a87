"""Everything in a bucket, against a local Cloud Storage emulator (tests/gcs_emulator.py), on gs:// paths only:
the demo videos uploaded, `data_prep.build` into the bucket (equal to a local build; an interrupted build shows
only whole files and resumes), tiny pretraining killed with SIGKILL and resumed (equal to an uninterrupted run),
export, extraction and a linear probe; a store that fails requests; the startup errors for a missing bucket or
missing credentials; the shard reader's streaming; the write-once, listing and moving helpers; event files in
parts.

To fit the suite's time budget the expensive steps run once and are shared: one bucket build and one
uninterrupted training run, both through a store that fails some requests (`FaultyProxy`), so they are at once
the fault test and the references the other tests compare with. The local references are the session's demo
videos and shards (conftest.py). Runs are tests/tiny_pretraining.py's (tiny widths, 32 px crops, `TOTAL_STEPS`,
so their programs come from the session's JAX compilation cache).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import http.server
import io
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from gcs_emulator import FaultyProxy, gcs_emulator  # noqa: F401 - the fixture
from tiny_pretraining import IMAGE_SIZE, LOSSES, REPO_ROOT, TOTAL_STEPS, read_metrics, run_env, write_tiny_config_file

from data_prep.build_state import BuildConfig
from data_prep.local_build import build_dataset, default_cropper_factory
from marlin_jax import storage
from marlin_jax.data import shards as shard_dir
from marlin_jax.data.schema import parse_clip
from marlin_jax.data.tfrecord import RecordReader, RecordWriter, read_records
from marlin_jax.interop import saved_models

pytestmark = pytest.mark.slow

NUM_VIDEOS = 6
# As tests/tiny_pretraining.make_small_demo builds the session's shards, which the bucket build must equal.
BUILD_SETTINGS = {"workers": 1, "shard_size": 2, "val_fraction": 0.2, "image_size": IMAGE_SIZE}
# A checkpoint every 2 steps; validation (with its reconstruction image) at the end.
TRAIN_OVERRIDES = {"total_steps": TOTAL_STEPS, "log_every": 1, "checkpoint_every": 2, "evals.val.every": TOTAL_STEPS}
VAL_STEPS = [TOTAL_STEPS]
VAL_LOSSES = ("val/rec_loss", "val/d_loss", "val/loss")
# Every n-th request through a faulty store: answered 503, its connection closed without an answer, or (a GET)
# its answer cut off halfway. Each fault costs a retry backoff of 1-2 s, so they are few: a couple of each in
# the build (about 150 requests) and in the run (about 800).
BUILD_FAULTS = {"unavailable_every": 53, "reset_every": 71, "cut_every": 37}
RUN_FAULTS = {"unavailable_every": 211, "reset_every": 241, "cut_every": 113}


def run_module(module: str, *args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def build_args(input_dir: str, output_dir: str) -> list[str]:
    return ["--input", input_dir, "--output", output_dir, "--workers", "1", "--shard_size", "2",
            "--val_fraction", "0.2", "--image_size", str(IMAGE_SIZE)]


@dataclasses.dataclass(frozen=True)
class Setup:
    root: str  # the bucket, gs://...
    videos: str  # the demo videos in the bucket
    local: Path  # local copies: videos/, shards/ (a local build)
    config: str  # the tiny config file at IMAGE_SIZE
    env: dict  # for subprocesses: the emulator, the session's compilation cache


@pytest.fixture(scope="module")
def setup(gcs_emulator, small_demo_shards, tmp_path_factory) -> Setup:
    """A bucket holding the session's demo videos; their local build is the reference."""
    local = small_demo_shards.parent
    assert len(list((local / "videos").glob("*.mp4"))) == NUM_VIDEOS
    root = gcs_emulator.create_bucket("marlin-test")
    for path in sorted((local / "videos").glob("*.mp4")):
        (epath.Path(root) / "videos" / path.name).write_bytes(path.read_bytes())
    config = write_tiny_config_file(tmp_path_factory.mktemp("config"))
    return Setup(root, f"{root}/videos", local, str(config), {**gcs_emulator.env(), **run_env()})


def faulty_env(setup: Setup, store: FaultyProxy) -> dict:
    return {**setup.env, **{name: store.url for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}}


def fault_counts(store: FaultyProxy) -> dict[str, int]:
    return {name: getattr(store.counts, name) for name in ("forwarded", "unavailable", "reset", "cut")}


@pytest.fixture(scope="module")
def shards(setup, gcs_emulator) -> dict:
    """`python -m data_prep.build` from the bucket's videos into the bucket, through a faulty store."""
    output = f"{setup.root}/shards"
    with FaultyProxy(gcs_emulator.url, **BUILD_FAULTS) as store:
        done = run_module("data_prep.build", *build_args(setup.videos, output), env=faulty_env(setup, store))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"path": output, "faults": fault_counts(store)}


def clips_of(data_dir) -> list[dict]:
    """Every record of a build, parsed, in manifest order (shard bytes differ between processes: protobuf
    orders a map's entries by string hash)."""
    manifest = shard_dir.load_manifest(data_dir)
    return [dataclasses.asdict(parse_clip(data)) for shard in manifest["shards"]
            for data in read_records(epath.Path(data_dir) / shard["file"])]


def assert_same_clips(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second) == NUM_VIDEOS
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]) if isinstance(a[key], np.ndarray) else a[key] == b[key], key


def test_build_into_a_bucket_holds_what_a_local_build_holds(shards, setup):
    manifest = shard_dir.load_manifest(shards["path"])
    assert manifest["complete"] and manifest["input_dir"] == setup.videos and not manifest["failures"]
    listed = {str(path) for path in storage.files_under(shards["path"])}
    assert listed == {f"{shards['path']}/manifest.json",
                      *(f"{shards['path']}/{shard['file']}" for shard in manifest["shards"])}
    local = shard_dir.load_manifest(setup.local / "shards")
    assert [shard["file"] for shard in local["shards"]] == [shard["file"] for shard in manifest["shards"]]
    assert_same_clips(clips_of(shards["path"]), clips_of(setup.local / "shards"))


class InterruptingCropper:
    """The real face cropper, stopped by a KeyboardInterrupt after `frames` frames (None: never); counts sources."""

    def __init__(self, frames: int | None):
        self._cropper = default_cropper_factory(IMAGE_SIZE)()
        self._frames_left = frames
        self.sources = 0

    def iter_video(self, frames):
        self.sources += 1
        for crop in self._cropper.iter_video(frames):
            if self._frames_left == 0:
                raise KeyboardInterrupt
            if self._frames_left is not None:
                self._frames_left -= 1
            yield crop


def test_interrupted_build_in_a_bucket_shows_only_whole_files_and_resumes(setup):
    config = BuildConfig(setup.videos, f"{setup.root}/interrupted", **BUILD_SETTINGS)
    # The demo videos have 40 to 64 frames: 130 frames stop the build inside its third source, after shard 0.
    stopped = InterruptingCropper(frames=130)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(config, cropper_factory=lambda: stopped)
    manifest = shard_dir.load_manifest(config.output_dir)
    assert stopped.sources == 3 and not manifest["complete"] and manifest["shards_done"] == 1
    # No half-written object: shard 0's parts went into it, and the third source's upload was abandoned.
    objects = {str(path).removeprefix(config.output_dir + "/") for path in storage.files_under(config.output_dir)}
    assert objects == {"manifest.json", manifest["shards"][0]["file"]}
    assert len(read_records(epath.Path(config.output_dir) / manifest["shards"][0]["file"])) == 2

    resumed = InterruptingCropper(frames=None)
    manifest = build_dataset(config, cropper_factory=lambda: resumed)
    assert manifest["complete"] and resumed.sources == NUM_VIDEOS - 2  # only what was not finished
    assert not (epath.Path(config.output_dir) / "_work").exists()
    assert_same_clips(clips_of(config.output_dir), clips_of(setup.local / "shards"))


def train_args(setup: Setup, workdir: str, data_path: str) -> list[str]:
    return [f"--config={setup.config}", f"--workdir={workdir}", f"--config.data.path={data_path}",
            *(f"--config.{key}={value}" for key, value in TRAIN_OVERRIDES.items())]


@pytest.fixture(scope="module")
def reference_run(setup, shards, gcs_emulator) -> dict:
    """Pretraining with a gs:// workdir, uninterrupted, through a faulty store (the first run: it compiles)."""
    workdir = f"{setup.root}/reference_run"
    with FaultyProxy(gcs_emulator.url, **RUN_FAULTS) as store:
        done = run_module("marlin_jax.train", *train_args(setup, workdir, shards["path"]),
                          env=faulty_env(setup, store))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"workdir": workdir, "faults": fault_counts(store)}


@pytest.fixture(scope="module")
def resumed_run(setup, shards, gcs_emulator) -> str:
    """Pretraining with a gs:// workdir, killed with SIGKILL once its checkpoint of step 2 is committed, then run
    again to the end. The first run reaches the store through a proxy that holds every request after the one
    committing that checkpoint (orbax's commit_success.txt in a bucket), so it is killed there whatever the
    machine's speed: before its last checkpoint, waiting on an upload."""
    workdir = f"{setup.root}/run"
    with FaultyProxy(gcs_emulator.url, hold_after=b"run/checkpoints/2/commit_success.txt") as store:
        process = subprocess.Popen([sys.executable, "-m", "marlin_jax.train",
                                    *train_args(setup, workdir, shards["path"])], cwd=REPO_ROOT,
                                   env=faulty_env(setup, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while not store.holding.wait(0.2):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run did not commit its checkpoint of step 2"
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = run_module("marlin_jax.train", *train_args(setup, workdir, shards["path"]), env=setup.env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from step 2 in {workdir}" in done.stdout, done.stdout + done.stderr
    return workdir


def assert_same_run(metrics: dict[int, dict], reference: dict[int, dict]) -> None:
    """The same losses at every step, bit for bit, and the same validation losses at VAL_STEPS."""
    assert sorted(metrics) == sorted(reference) == list(range(1, TOTAL_STEPS + 1))
    assert [step for step in metrics if "val/loss" in metrics[step]] == VAL_STEPS
    for step, row in reference.items():
        for key in LOSSES + (VAL_LOSSES if step in VAL_STEPS else ()):
            assert metrics[step][key] == row[key], (step, key)


def test_training_in_a_bucket_resumes_after_sigkill_as_if_uninterrupted(resumed_run, reference_run):
    assert_same_run(read_metrics(resumed_run), read_metrics(reference_run["workdir"]))
    assert saved_models.read_saved_model(resumed_run).step == TOTAL_STEPS
    workdir = epath.Path(resumed_run)
    assert (workdir / "config.json").exists()
    assert (workdir / "reconstructions" / f"step_{TOTAL_STEPS:08d}.png").exists()
    from tensorboardX.proto import event_pb2
    tags = {value.tag for path in (workdir / "tensorboard").glob("events.out.tfevents.*")
            for record in read_records(path) for value in event_pb2.Event.FromString(record).summary.value}
    assert {"train/rec_loss", "val/loss"} <= tags


def test_a_store_that_fails_requests_loses_nothing(shards, reference_run, setup):
    """The bucket build and the reference run went through the faulty store: both were hit by every kind of
    fault, and both hold everything (the build equals the local one, the run's losses equal the resumed run's
    in the test above, its last checkpoint restores)."""
    for faults in (shards["faults"], reference_run["faults"]):
        assert faults["unavailable"] and faults["reset"] and faults["cut"], faults
    assert_same_clips(clips_of(shards["path"]), clips_of(setup.local / "shards"))
    assert sorted(read_metrics(reference_run["workdir"])) == list(range(1, TOTAL_STEPS + 1))
    assert saved_models.read_saved_model(reference_run["workdir"]).step == TOTAL_STEPS


def test_export_from_a_bucket_to_a_bucket_loads_in_marlin_pytorch(resumed_run, setup, tmp_path, marlin_pytorch):
    output = f"{setup.root}/exported"
    done = run_module("marlin_jax.export", f"--workdir={resumed_run}", f"--output={output}", "--name=tiny",
                      env=setup.env)
    assert done.returncode == 0, done.stderr[-3000:]
    for suffix in (".pt", ".yaml"):
        (tmp_path / f"tiny{suffix}").write_bytes((epath.Path(output) / f"tiny{suffix}").read_bytes())
    marlin_pytorch.config.register_model_from_yaml("gcs_export", str(tmp_path / "tiny.yaml"))
    model = marlin_pytorch.Marlin.from_file("gcs_export", str(tmp_path / "tiny.pt"))
    saved = saved_models.read_saved_model(resumed_run)
    np.testing.assert_array_equal(model.encoder.norm.weight.detach().numpy(),
                                  saved.generator["encoder"]["norm"]["scale"])


def test_extraction_and_probe_from_a_bucket(resumed_run, setup, tmp_path):
    # With the videos in the bucket, one of them as a local file under another name: the same features.
    local_copy = tmp_path / "local_copy.mp4"
    local_copy.write_bytes((setup.local / "videos" / "astronaut_00.mp4").read_bytes())
    features = f"{setup.root}/features"
    done = run_module("marlin_jax.extract", "--model", setup.config, "--weights", resumed_run, "--output_dir",
                      features, setup.videos, str(local_copy), env=setup.env)
    assert done.returncode == 0, done.stderr[-3000:]
    written = {str(path) for path in storage.files_under(features)}
    assert written == {f"{features}/astronaut_{index:02d}.npy" for index in range(NUM_VIDEOS)} | {
        f"{features}/local_copy.npy"}
    read = {name: np.load(io.BytesIO((epath.Path(features) / f"{name}.npy").read_bytes()))
            for name in ("astronaut_00", "local_copy")}
    assert read["astronaut_00"].shape[1:] == (64,)  # (clips, the tiny encoder width)
    np.testing.assert_array_equal(read["astronaut_00"], read["local_copy"])

    # Rows relative to the CSV's folder, and one given as a full gs:// path.
    rows = [(f"astronaut_{index:02d}.npy", split, index % 2)
            for index, split in enumerate(["train", "train", "val", "val", "test", "test"])]
    rows[0] = (f"{features}/{rows[0][0]}", *rows[0][1:])
    table = io.StringIO()
    csv.writer(table).writerows([("path", "split", "label"), *rows])
    (epath.Path(features) / "labels.csv").write_text(table.getvalue())
    workdir = f"{setup.root}/probe"
    done = run_module("marlin_jax.linear_probe", f"--config={REPO_ROOT / 'configs/probe/csv.py'}",
                      f"--config.data.csv={features}/labels.csv", f"--workdir={workdir}", env=setup.env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((epath.Path(workdir) / "results.json").read_text())
    assert results["num_examples"] == {"train": 2, "val": 2, "test": 2} and "auc" in results


# --- startup errors ----------------------------------------------------------------------------------------

MISSING = "gs://no-such-bucket"
# Each entry point's arguments, given the setup: one path in a missing bucket.
ENTRY_POINTS = {
    "data_prep.build": lambda setup: build_args(setup.videos, f"{MISSING}/shards"),
    "marlin_jax.train": lambda setup: train_args(setup, f"{MISSING}/run", f"{setup.root}/shards"),
    "marlin_jax.finetune": lambda setup: [f"--config={REPO_ROOT / 'configs/finetune/csv.py'}:binary,tiny",
                                          f"--config.data.csv={MISSING}/labels.csv", f"--workdir={setup.root}/ft"],
    "marlin_jax.export": lambda setup: [f"--workdir={MISSING}/run", f"--output={setup.root}/unused"],
    "marlin_jax.extract": lambda setup: ["--model", setup.config, "--weights", f"{MISSING}/run", "--output_dir",
                                         f"{setup.root}/unused", setup.videos],
    "marlin_jax.linear_probe": lambda setup: [f"--config={REPO_ROOT / 'configs/probe/csv.py'}",
                                              f"--config.data.csv={MISSING}/labels.csv",
                                              f"--workdir={setup.root}/unused"],
}


def test_a_missing_bucket_stops_every_entry_point_at_startup_naming_it(setup):
    # All at once: each spends its time importing, and only the error matters here.
    processes = {module: subprocess.Popen([sys.executable, "-m", module, *arguments(setup)], cwd=REPO_ROOT,
                                          env=setup.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for module, arguments in ENTRY_POINTS.items()}
    for module, process in processes.items():
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 2, (module, stderr[-3000:])
        assert f"the bucket {MISSING} does not exist" in stderr and "Traceback" not in stderr, (module, stderr)
        assert "process 0/" not in stdout + stderr, module  # stopped before the mesh and the model were built


class _RefusingStore(http.server.BaseHTTPRequestHandler):
    """What Cloud Storage answers a request without credentials."""

    def do_GET(self):
        body = json.dumps({"error": {"code": 401, "message": "Anonymous caller does not have storage.objects.list "
                                                             "access to the Google Cloud Storage bucket."}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


def test_missing_credentials_are_named_at_startup(setup):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingStore)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start = time.monotonic()
        done = run_module("marlin_jax.export", "--workdir=gs://private/run", f"--output={setup.local}/unused",
                          env={**setup.env, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{server.server_address[1]}"})
        elapsed = time.monotonic() - start
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip()
    assert message.startswith("error: --workdir gs://private/run: cannot list gs://private") and "Anonymous" in message
    assert "no Google credentials were found" in message and len(message.splitlines()) == 1, message
    assert elapsed < 30, elapsed  # not a minute of retries (the process's imports take a few seconds)


# --- streaming, write-once, listing ------------------------------------------------------------------------

def test_the_shard_reader_streams_a_remote_shard(gcs_emulator, setup, monkeypatch):
    records = [np.random.default_rng(index).bytes(2**20) for index in range(16)]
    path = epath.Path(setup.root) / "big.tfrecord"
    with storage.write_once(path) as file, RecordWriter(file) as writer:
        for record in records:
            writer.write(record)
    size = sum(len(record) + 16 for record in records)
    with FaultyProxy(gcs_emulator.url) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        reader = RecordReader(path)
        assert next(reader) == records[0]
        first_read = proxy.counts.bytes_sent
        assert list(reader) == records[1:]
    assert first_read < size / 2, (first_read, size)  # a block ahead, not the shard
    assert proxy.counts.bytes_sent < 1.2 * size, (proxy.counts.bytes_sent, size)  # each byte fetched once


@pytest.mark.parametrize("size", [100, 6 * 2**20])  # one upload request, and a resumable upload in blocks
def test_write_once_leaves_nothing_when_the_writer_fails(setup, tmp_path, size):
    for path in (epath.Path(setup.root) / f"once_{size}.bin", tmp_path / "once.bin"):
        with pytest.raises(KeyError):
            with storage.write_once(path) as file:
                file.write(b"x" * size)
                raise KeyError("stopped")
        gc.collect()  # fsspec would finalise an abandoned upload when its file is collected
        assert not path.exists() and not list(epath.Path(path.parent).glob("*.tmp"))
        with storage.write_once(path) as file:
            file.write(b"y" * size)
        assert path.read_bytes() == b"y" * size


def test_files_under_lists_a_bucket_with_full_paths_and_move_moves_a_folder(setup):
    root = epath.Path(setup.root) / "tree"
    for name in ("a.mp4", "sub/b.mp4", "sub/deeper/c.txt"):
        (root / name).write_text(name)
    assert storage.files_under(root) == [root / "a.mp4", root / "sub/b.mp4", root / "sub/deeper/c.txt"]
    # Into a folder that holds nothing yet (how a damaged checkpoint is set aside).
    storage.move(root / "sub", root / "aside" / "sub_1")
    assert storage.files_under(root) == [root / "a.mp4", root / "aside/sub_1/b.mp4", root / "aside/sub_1/deeper/c.txt"]
    assert (root / "aside/sub_1/deeper/c.txt").read_text() == "sub/deeper/c.txt"


def test_event_files_in_a_bucket_are_written_in_parts_that_tensorboard_reads_in_order(setup, monkeypatch):
    from tensorboardX.proto import event_pb2

    from marlin_jax.training import reporting
    monkeypatch.setattr(reporting, "EVENT_PART_BYTES", 300)
    workdir = epath.Path(setup.root) / "event_parts"
    reporter = reporting.RunReporter(workdir)
    for step in range(1, 13):
        reporter.record(step, {"rec_loss": step / 10, "lr": 1e-3})
    reporter.close()
    parts = sorted((workdir / reporting.TENSORBOARD_SUBDIR).iterdir(), key=str)
    assert len(parts) > 2 and all("tfevents" in part.name for part in parts)
    steps = [event.step for part in parts for record in read_records(part)
             for event in [event_pb2.Event.FromString(record)] if any(v.tag == "train/rec_loss"
                                                                       for v in event.summary.value)]
    assert steps == list(range(1, 13))
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == steps
