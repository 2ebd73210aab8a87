"""`build_dataset`: raw face videos -> TFRecord shards + manifest.json, resumably, in local worker processes
(see `data_prep.build_state` for how a build resumes).

A full local disk stops the build with a `DiskFullError` that names the file and estimates what the rest of the
build needs; everything finished is kept and half-written files are removed, so a rerun after freeing space
completes the build.
"""

import functools
import multiprocessing
import time
from collections.abc import Callable, Iterator

import cv2
from absl import logging
from tqdm import tqdm

from data_prep import process
from data_prep.build_state import BuildConfig, BuildState
from data_prep.plan import plan_shards
from data_prep.sources import plan_sources
from marlin_jax import storage


def default_cropper_factory(image_size: int, tracking: bool = True) -> Callable[[], process.Cropper]:
    from marlin_jax.faces import FaceCropper  # Loads MediaPipe; only builders need it.

    return functools.partial(FaceCropper, size=image_size, tracking=tracking)


def build_dataset(config: BuildConfig, cropper_factory: Callable[[], process.Cropper] | None = None) -> dict:
    """Builds (or finishes building) the shard directory; returns the final manifest."""
    if config.workers < 1:
        raise ValueError(f"workers must be at least 1, got {config.workers}")
    sources, skipped = plan_sources(config.input_dir, config.layout, config.split_csv_dir, config.val_fraction)
    build = BuildState(config, plan_shards(sources, config.shard_size), skipped)
    try:
        return _process_and_assemble(build, config, cropper_factory)
    except storage.DiskFullError as error:
        raise build.disk_full(error) from error


def _process_and_assemble(build: BuildState, config: BuildConfig,
                           cropper_factory: Callable[[], process.Cropper] | None) -> dict:
    build.resume()
    pending = build.pending_sources()
    logging.info("%d sources in %d shards; %d left to process", len(build.shard_of), len(build.shards),
                 len(pending))
    factory = cropper_factory or default_cropper_factory(config.image_size, config.tracking)
    settings = process.EncodeSettings(config.layout, config.segment_frames, config.jpeg_quality)
    tasks = [(source, build.part_path(source)) for source in pending]
    with tqdm(total=len(build.shard_of), initial=len(build.shard_of) - len(pending), unit="video",
              smoothing=0.1) as bar:
        frames, start = 0, time.perf_counter()
        failed = build.failed_count()  # counted on as sources finish, not recounted over all of them each time
        for status in run_in_workers(process.process_source, tasks, factory, settings, config.workers):
            build.record(status)
            frames += status["num_frames"]
            failed += status["status"] == "failed"
            bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}", failed=failed)
            bar.update()
    return build.finish()


def run_in_workers(work: Callable[..., dict], tasks: list[tuple], factory: Callable[[], process.Cropper], settings,
                   workers: int) -> Iterator[dict]:
    """`work(*task, cropper, settings)`'s status for each task as it finishes: in this process for one worker, else
    in a spawn pool whose processes build one cropper each. `work` is a module-level function (workers unpickle it).
    """
    if not tasks:
        return
    if workers == 1:
        cropper = factory()
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # as in a worker process (see _init_worker), restored afterwards
        try:
            for task in tasks:
                yield work(*task, cropper, settings)
        finally:
            cv2.setNumThreads(threads)
        return
    # spawn: MediaPipe/TFLite and FFmpeg threads do not survive fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(tasks)), _init_worker, (work, factory, settings)) as pool:
        yield from pool.imap_unordered(_work_in_worker, tasks, chunksize=1)


_worker_state: dict = {}


def _init_worker(work, factory, settings) -> None:
    # One thread per worker process, as the pool has one process per core: OpenCV's own thread pool (like
    # FFmpeg's, see process.DECODE_THREADS) would only compete with the other workers, and costs about 10%
    # more CPU per frame even alone.
    cv2.setNumThreads(1)
    _worker_state.update(work=work, cropper=factory(), settings=settings)


def _work_in_worker(task: tuple) -> dict:
    return _worker_state["work"](*task, _worker_state["cropper"], _worker_state["settings"])
