"""The pretraining pipeline (read + parse + sample + JPEG/PNG decode + occupancy + batch), in clips per second.

    python benchmarks/pipeline_throughput.py [--data-dir SHARDS] [--workers 0 2] [--batches 30]

Without --data-dir it writes realistic shards first: one synthetic 180-frame face video (the YouTube Faces
mean length) cropped by the real FaceCropper, stored as 32 records in 4 shards, so each clip reads a full
record of 224 px JPEGs as training would. Prints JSON: clips/s for each worker count, and for in-process
runs (workers 0) clips per CPU-second, the per-core figure.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage import data as skimage_data

from data_prep.atomic import write_json
from data_prep.demo import render_video
from data_prep.manifest import make_manifest
from data_prep.plan import ShardPlan
from data_prep.sources import Source
from marlin_jax.data import codecs
from marlin_jax.data.pipeline import make_pretrain_loader
from marlin_jax.data.schema import ClipRecord, serialize_clip
from marlin_jax.data.shards import MANIFEST_NAME, shard_file_name
from marlin_jax.data.tfrecord import RecordWriter
from marlin_jax.faces import FaceCropper

RECORD_FRAMES = 180
SHARDS, RECORDS_PER_SHARD = 4, 8


def write_face_shards(root: Path) -> None:
    frames = render_video(skimage_data.astronaut(), RECORD_FRAMES, 320, np.random.default_rng(0))
    crops = FaceCropper().process_video(frames)
    encoded = dict(frames_jpeg=[codecs.encode_jpeg(frame) for frame in crops.frames],
                   region_maps_png=[codecs.encode_label_map(labels) for labels in crops.region_maps],
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


def time_loader(data_dir: Path, workers: int, batch_size: int, batches: int) -> dict:
    iterator = make_pretrain_loader(data_dir, "train", batch_size, seed=0, process_index=0, process_count=1,
                                    worker_count=workers, shuffle_window=64)
    for _ in range(3):  # warm up: worker start-up, first windows
        next(iterator)
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
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = Path(scratch)
            write_face_shards(data_dir)
        runs = [time_loader(data_dir, workers, args.batch_size, args.batches) for workers in args.workers]
    print(json.dumps({"data_dir": str(args.data_dir or "synthetic 180-frame face records"),
                      "cpu_count": os.cpu_count(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
