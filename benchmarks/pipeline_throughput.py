"""The pretraining pipeline (read + parse + sample + JPEG/PNG decode + occupancy + batch), in clips per second.

    python benchmarks/pipeline_throughput.py [--data-dir SHARDS] [--workers 0 2] [--batches 30]

Without --data-dir it writes realistic shards first: one synthetic 180-frame face video (the YouTube Faces
mean length) cropped by the real FaceCropper, stored as 32 records in 4 shards, so each clip reads a full
record of 224 px JPEGs as training would; once with the PNG settings data_prep used before (libpng's
adaptive row filters), once with today's. It then times, in the same run, the previous decode step (every
region map decoded, the previous occupancy computation) on the previous shards and today's on today's.
Prints JSON: clips/s for each path and worker count, and for in-process runs (workers 0) clips per
CPU-second, the per-core figure; and per-frame decode times of the JPEG decoders at hand (same pixels).

Today's shards are also read from a bucket of a local Cloud Storage emulator (`gcp-storage-emulator`, started
by tests/gcs_emulator.py) through gcsfs, in the same run: "store" says which. For those runs the emulator's
own CPU time over the timed batches is given too (`server_cpu_seconds`): the emulator is a single-threaded
Python server on the same cores, so clips per CPU-second counting it is the fair per-core figure.
"""

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import cv2
import grain
import numpy as np
import PIL.Image
from etils import epath
from skimage import data as skimage_data

from marlin_jax.storage import write_json
from data_prep.demo_videos import render_video
from data_prep.manifest import make_manifest
from data_prep.plan import ShardPlan
from data_prep.sources import Source
from marlin_jax import masking
from marlin_jax.data import codecs, pipeline
from marlin_jax.data.pipeline import make_pretrain_loader
from marlin_jax.data.schema import ClipRecord, serialize_clip
from marlin_jax.data.shards import MANIFEST_NAME, shard_file_name
from marlin_jax.data.tfrecord import RecordWriter
from marlin_jax.faces import FaceCropper

import mfu  # noqa: E402  (benchmarks/ is not a package)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gcs_emulator import running_emulator  # noqa: E402 - the local Cloud Storage the tests use

RECORD_FRAMES = 180
SHARDS, RECORDS_PER_SHARD = 4, 8


def previous_png(labels: np.ndarray) -> bytes:
    """A label map as data_prep encoded it before (libpng's adaptive row filters)."""
    return cv2.imencode(".png", labels, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()


@dataclasses.dataclass(frozen=True)
class PreviousDecodeClip(grain.transforms.Map):
    """The decode step as it was: every region map decoded, occupancy with one reduction over both patch axes."""

    patch_size: int
    tubelet_size: int

    def map(self, element: dict) -> dict:
        video = np.stack([codecs.decode_jpeg(data) for data in element["frames_jpeg"]])
        maps = np.stack([codecs.decode_label_map(data) for data in element["region_maps_png"]])
        first = np.where(element["face_found"][::self.tubelet_size, None, None], maps[::self.tubelet_size], 0)
        bits = np.left_shift(np.uint16(1), first.astype(np.uint16))
        t, height, width = first.shape
        patches = bits.reshape(t, height // self.patch_size, self.patch_size, width // self.patch_size,
                               self.patch_size)
        present = np.bitwise_or.reduce(patches, axis=(2, 4))
        occupancy = ((present[..., None] >> np.arange(masking.NUM_LABELS, dtype=np.uint16)) & 1).astype(bool)
        return {"video": video, "occupancy": occupancy}


def write_face_shards(root: Path, encode_label_map) -> list[bytes]:
    """Writes the shards; returns the record's JPEG frames."""
    frames = render_video(skimage_data.astronaut(), RECORD_FRAMES, 320, np.random.default_rng(0))
    crops = FaceCropper().process_video(frames)
    encoded = dict(frames_jpeg=[codecs.encode_jpeg(frame) for frame in crops.frames],
                   region_maps_png=[encode_label_map(labels) for labels in crops.region_maps],
                   face_found=crops.face_found, boxes=crops.boxes, height=224, width=224, fps=25.0,
                   segment_index=0, first_frame=0, split="train")
    shards, statuses = [], {}
    for index in range(SHARDS):
        sources = tuple(Source(f"face_{index}_{k}", "", "train") for k in range(RECORDS_PER_SHARD))
        shard = ShardPlan(shard_file_name("train", index, SHARDS), "train", sources)
        with RecordWriter(root / shard.file) as writer:
            for source in sources:
                writer.write(serialize_clip(ClipRecord(source_id=source.source_id, **encoded)))
                statuses[source.source_id] = {"status": "ok", "num_records": 1, "num_frames": RECORD_FRAMES,
                                              "stored_frames": RECORD_FRAMES}
        shards.append(shard)
    write_json(root / MANIFEST_NAME, make_manifest(
        shards=shards, done_shards={s.file for s in shards}, statuses=statuses, skipped=[], settings={},
        input_dir="synthetic", fingerprint="", versions={}))
    return encoded["frames_jpeg"]


def jpeg_decoders(frames_jpeg: list[bytes]) -> dict:
    """Milliseconds per 224 px frame on this thread, for decoders that give the same pixels as cv2's."""
    def pillow(data: bytes) -> np.ndarray:
        return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))

    expected = [codecs.decode_jpeg(data) for data in frames_jpeg]
    timings = {}
    for name, decode in (("cv2", codecs.decode_jpeg), ("pillow", pillow)):
        if any(not np.array_equal(decode(data), pixels) for data, pixels in zip(frames_jpeg, expected)):
            raise AssertionError(f"{name} decodes other pixels than cv2")
        start = time.thread_time()
        for _ in range(3):
            for data in frames_jpeg:
                decode(data)
        timings[name] = round(1e3 * (time.thread_time() - start) / (3 * len(frames_jpeg)), 3)
    return timings


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_loader(data_dir, workers: int, batch_size: int, batches: int, server_pid: int | None = None) -> dict:
    iterator = make_pretrain_loader(data_dir, "train", batch_size, seed=0, process_index=0, process_count=1,
                                    worker_count=workers, shuffle_window=64)
    for _ in range(3):  # warm up: worker start-up, first windows
        next(iterator)
    server_cpu = cpu_seconds(server_pid) if server_pid else 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    iterator.close()
    clips = batches * batch_size
    result = {"workers": workers, "batch": {k: list(v.shape) for k, v in batch.items()},
              "clips": clips, "clips_per_second": round(clips / wall, 1)}
    if workers == 0:
        result["clips_per_cpu_second"] = round(clips / cpu, 1)
    if server_pid:
        server_cpu = cpu_seconds(server_pid) - server_cpu
        result["server_cpu_seconds"] = round(server_cpu, 2)
        if workers == 0:
            result["clips_per_cpu_second_with_server"] = round(clips / (cpu + server_cpu), 1)
    return result


def time_bucket_loaders(shard_dir: Path, workers: list[int], batch_size: int, batches: int) -> list[dict]:
    """The shards of `shard_dir`, copied into a bucket of a local Cloud Storage emulator, read through gcsfs."""
    with running_emulator() as emulator:
        bucket = epath.Path(emulator.create_bucket("pipeline-benchmark")) / "shards"
        for path in sorted(shard_dir.iterdir()):
            (bucket / path.name).write_bytes(path.read_bytes())
        return [{"path": "today", "store": "emulator", **time_loader(str(bucket), count, batch_size, batches,
                                                                     server_pid=emulator.process.pid)}
                for count in workers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if args.data_dir is not None:
            runs = [time_loader(args.data_dir, workers, args.batch_size, args.batches) for workers in args.workers]
            print(json.dumps({"data_dir": str(args.data_dir), "cpu_count": os.cpu_count(), "runs": runs}, indent=1))
            return
        previous_dir, today_dir = Path(scratch) / "previous", Path(scratch) / "today"
        previous_dir.mkdir()
        today_dir.mkdir()
        write_face_shards(previous_dir, previous_png)
        frames_jpeg = write_face_shards(today_dir, codecs.encode_label_map)
        runs = []
        for workers in args.workers:
            with mock.patch.object(pipeline, "DecodeClip", PreviousDecodeClip):
                runs.append({"path": "previous", "store": "local", **time_loader(previous_dir, workers,
                                                                                 args.batch_size, args.batches)})
            runs.append({"path": "today", "store": "local", **time_loader(today_dir, workers, args.batch_size,
                                                                          args.batches)})
        runs += time_bucket_loaders(today_dir, args.workers, args.batch_size, args.batches)
    print(json.dumps({"data_dir": "synthetic 180-frame face records", "machine": mfu.machine(),
                      "jax_matmul_gflops": round(mfu.jax_matmul_gflops(), 1),
                      "jpeg_decode_ms": jpeg_decoders(frames_jpeg), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
