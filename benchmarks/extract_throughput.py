"""Feature-extraction clips/s and MFU: marlin_jax against marlin_pytorch in one run, and end to end on videos.

    python benchmarks/extract_throughput.py                       # ViT-S and ViT-B, batches 1 and 4, + videos
    python benchmarks/extract_throughput.py --models vit_small --batch-sizes 1,2,4 --rounds 5 --videos ''
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/extract_throughput.py   # an XLA CPU variant

Encoder only: both run the encoder on clips (B, 3, 16, 224, 224) with random weights and mean-pooled output
(the default of extract_video); marlin_jax through `marlin_jax.model.encode_clips`, the jitted function that
extraction uses (uint8 clips in), PyTorch through `marlin_pytorch.Marlin.extract_features` with 2 threads.
On a shared machine, rounds interleave the two frameworks and each framework's 2048x2048 float32
matmul probe, and the best round counts (interference only slows a round down); medians and per-round
paired speedups are printed too. MFU (benchmarks/mfu.py) divides each framework's model FLOP/s (counted from
the architecture; XLA's count beside it) by that framework's own matmul probe; "mfu_by_cpu_time" does the same
per second of the process's CPU time, which other load on a shared machine hardly moves.

End to end (`--videos`, default $MARLIN_SAMPLES_DIR, the sample face videos):
`marlin_jax.video_features.extract_videos` on every video there, as `python -m marlin_jax.extract` runs it:
decode, (with --crop-face) MediaPipe face crop, encode. Reported in clips/s beside the encoder-only rate at
the same batch size, with the share of the time the encoder accounts for. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from marlin_jax import Marlin, model_flops
from marlin_jax.architectures import VIT_BASE, VIT_SMALL, MarlinArchitecture
from marlin_jax.video_features import ExtractionOptions, extract_videos
from marlin_jax.model import encode_clips
from marlin_jax.video import VIDEO_SUFFIXES

sys.path.insert(0, str(Path(__file__).parent))
import mfu  # noqa: E402  (benchmarks/ is not a package)

ARCHITECTURES = {"vit_small": VIT_SMALL, "vit_base": VIT_BASE}
TORCH_THREADS = 2
FRAMEWORKS = ("jax", "torch")
SAMPLE_VIDEOS = os.environ.get("MARLIN_SAMPLES_DIR")
Runner = Callable[[], object]


def import_marlin_pytorch():
    """marlin_pytorch imports torchvision only for read_video, and PyPI's torchvision does not load beside the CPU
    torch used here: a stub module stands in (the encoder never touches it)."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # absent, or built against another torch
        stub = types.ModuleType("torchvision")
        stub.io = types.ModuleType("torchvision.io")
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.io"] = stub.io
    import marlin_pytorch
    return marlin_pytorch


def matmul_runners(size: int = mfu.PEAK_MATMUL_SIZE) -> dict[str, Runner]:
    a = np.random.default_rng(0).random((size, size), np.float32)
    jax_a, torch_a = jnp.asarray(a), torch.from_numpy(a)
    jax_matmul = jax.jit(lambda x: x @ x)
    return {"jax": lambda: jax_matmul(jax_a).block_until_ready(), "torch": lambda: torch.mm(torch_a, torch_a)}


def torch_encoder(marlin_pytorch, arch: MarlinArchitecture):
    return marlin_pytorch.Marlin(
        img_size=arch.img_size, patch_size=arch.patch_size, n_frames=arch.num_frames,
        encoder_embed_dim=arch.encoder_embed_dim, encoder_depth=arch.encoder_depth,
        encoder_num_heads=arch.encoder_num_heads, decoder_embed_dim=arch.decoder_embed_dim,
        decoder_depth=arch.decoder_depth, decoder_num_heads=arch.decoder_num_heads, mlp_ratio=arch.mlp_ratio,
        qkv_bias=arch.qkv_bias, qk_scale=arch.qk_scale, drop_rate=0.0, attn_drop_rate=0.0,
        norm_layer="LayerNorm", init_values=0.0, tubelet_size=arch.tubelet_size).eval()


def model_runners(params, torch_model, arch: MarlinArchitecture, batch: int) -> dict[str, Runner]:
    """Both frameworks on the same clips."""
    clips = np.random.default_rng(batch).integers(0, 256, (batch, arch.num_frames, arch.img_size, arch.img_size, 3),
                                                   dtype=np.uint8)
    compiled = encode_clips.lower(params, clips, arch, False).compile()
    torch_clips = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255
    return {"jax": lambda: compiled(params, clips).block_until_ready(),
            "torch": lambda: torch_model.extract_features(torch_clips, keep_seq=False)}


def xla_flops_per_clip(params, arch: MarlinArchitecture) -> float:
    clips = jax.ShapeDtypeStruct((1, arch.num_frames, arch.img_size, arch.img_size, 3), jnp.uint8)
    return mfu.xla_flops(encode_clips, params, clips, arch, False)


def benchmark_model(marlin_pytorch, arch: MarlinArchitecture, batch_sizes: list[int], rounds: int) -> dict:
    """Rounds interleave every (framework, batch) and the matmul probes, so each sees the same machine load."""
    params = jax.device_put(Marlin.random_init(arch, full=False).params["encoder"])
    torch_model = torch_encoder(marlin_pytorch, arch)
    runners = {("matmul", framework): run for framework, run in matmul_runners().items()}
    for batch in batch_sizes:
        runners.update({(batch, framework): run
                        for framework, run in model_runners(params, torch_model, arch, batch).items()})
    for run in runners.values():
        run()  # warm-up: caches, allocator, oneDNN primitives
    seconds = {key: [] for key in runners}
    cpu_seconds = {key: [] for key in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            wall, cpu = mfu.timed(run)
            seconds[key].append(wall)
            cpu_seconds[key].append(cpu)
    flops = model_flops.extraction_flops(arch)
    matmul_flops = 2 * mfu.PEAK_MATMUL_SIZE ** 3
    peaks = {fw: matmul_flops / min(seconds["matmul", fw]) / 1e9 for fw in FRAMEWORKS}
    cpu_peaks = {fw: matmul_flops / min(cpu_seconds["matmul", fw]) / 1e9 for fw in FRAMEWORKS}
    result = {"model_flops_per_clip": flops, "xla_flops_per_clip": xla_flops_per_clip(params, arch),
              "matmul_peak_gflops": {fw: round(peaks[fw], 1) for fw in FRAMEWORKS},
              "matmul_gflops_per_cpu_second": {fw: round(cpu_peaks[fw], 1) for fw in FRAMEWORKS}}
    for framework in FRAMEWORKS:
        per_batch = {}
        for b in batch_sizes:
            clips_per_s = b / min(seconds[b, framework])
            per_batch[f"batch_{b}"] = {
                "clips_per_s": round(clips_per_s, 4),
                "clips_per_s_median": round(b / statistics.median(seconds[b, framework]), 4),
                "achieved_gflops": round(clips_per_s * flops / 1e9, 1),
                "mfu": round(mfu.mfu(clips_per_s, flops, peaks[framework]), 3),
                "mfu_by_cpu_time": round(mfu.mfu(b / min(cpu_seconds[b, framework]), flops, cpu_peaks[framework]),
                                         3)}
        result[framework] = per_batch
    best = {fw: max(r["clips_per_s"] for r in result[fw].values()) for fw in FRAMEWORKS}
    result["best_clips_per_s"] = best
    result["best_mfu"] = {fw: round(mfu.mfu(best[fw], flops, peaks[fw]), 3) for fw in FRAMEWORKS}
    result["speedup_jax_over_torch"] = round(best["jax"] / best["torch"], 3)
    # Per round, same batch: less sensitive to load that drifts between rounds than best-of-rounds.
    result["speedup_paired_median"] = {
        f"batch_{b}": round(statistics.median(t / j for t, j in zip(seconds[b, "torch"], seconds[b, "jax"])), 3)
        for b in batch_sizes}
    return result


def end_to_end(arch: MarlinArchitecture, videos: list[Path], crop_face: bool, batch_size: int,
               encoder_clips_per_s: float) -> dict:
    """`extract_videos` over the videos, after one untimed video compiles the encoder for this batch size."""
    model = Marlin.random_init(arch, full=False)
    options = ExtractionOptions(crop_face=crop_face, batch_size=batch_size)
    list(extract_videos(model, videos[:1], options))
    start = time.perf_counter()
    results = list(extract_videos(model, videos, options))
    seconds = time.perf_counter() - start
    clips = sum(len(r.features) for r in results if r.features is not None)
    clips_per_s = clips / seconds
    return {"videos": len(videos), "failed": {str(r.path.name): r.error for r in results if r.error},
            "crop_face": crop_face, "batch_size": batch_size, "clips": clips, "seconds": round(seconds, 2),
            "clips_per_s": round(clips_per_s, 4), "encoder_only_clips_per_s": round(encoder_clips_per_s, 4),
            "encoder_share_of_time": round(clips_per_s / encoder_clips_per_s, 3)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit_small,vit_base", help=f"from {', '.join(ARCHITECTURES)}")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--videos", default=SAMPLE_VIDEOS or "",
                        help="folder of videos for the end-to-end rate ('' skips it)")
    parser.add_argument("--crop-face", default="auto", choices=("auto", "yes", "no"),
                        help="face-crop the videos (auto: only videos whose name does not start with 'cropped')")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(ARCHITECTURES))
    if unknown or not args.models:
        parser.error(f"--models must name some of {', '.join(ARCHITECTURES)}, got {unknown or 'nothing'}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(args.batch_sizes) < 1 or args.rounds < 1:
        parser.error("--batch-sizes and --rounds must be >= 1")
    return args


def video_groups(folder: str, crop_face: str) -> dict[str, list[Path]]:
    """The videos under `folder` split into those to face-crop and those already face crops."""
    if not folder:
        return {}
    videos = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise SystemExit(f"--videos {folder}: no {'/'.join(VIDEO_SUFFIXES)} files there")
    if crop_face != "auto":
        return {f"crop_face_{crop_face}": videos}
    groups = {"raw_with_face_crop": [p for p in videos if not p.name.startswith("cropped")],
              "already_cropped": [p for p in videos if p.name.startswith("cropped")]}
    return {name: paths for name, paths in groups.items() if paths}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(TORCH_THREADS)
    marlin_pytorch = import_marlin_pytorch()
    groups = video_groups(args.videos, args.crop_face)
    report = {"machine": {**mfu.machine(), "torch": torch.__version__, "torch_threads": TORCH_THREADS},
              "models": {}}
    for name in args.models:
        arch = ARCHITECTURES[name]
        result = benchmark_model(marlin_pytorch, arch, args.batch_sizes, args.rounds)
        encoder_rate = result["jax"][f"batch_{args.batch_sizes[0]}"]["clips_per_s"]
        result["end_to_end"] = {
            group: end_to_end(arch, paths, crop_face=group in ("raw_with_face_crop", "crop_face_yes"),
                              batch_size=args.batch_sizes[0], encoder_clips_per_s=encoder_rate)
            for group, paths in groups.items()}
        report["models"][name] = result
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
