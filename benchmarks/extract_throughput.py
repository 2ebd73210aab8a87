"""Feature-extraction throughput on this CPU: marlin_jax against marlin_pytorch, in one run; prints JSON.

    python benchmarks/extract_throughput.py                       # ViT-S and ViT-B, batches 1 and 4
    python benchmarks/extract_throughput.py --models vit_small --batch-sizes 1,2,4 --rounds 5
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/extract_throughput.py   # an XLA CPU variant

Both run the encoder on clips (B, 3, 16, 224, 224) with random weights and mean-pooled output (the default of
extract_video); marlin_jax through the jitted function `marlin_jax.video_features` uses (uint8 clips in),
PyTorch through `marlin_pytorch.Marlin.extract_features` with 2 threads. Machines here are shared, so rounds
interleave the two frameworks and a 2048x2048 float32 matmul probe, and the best round counts (interference only
slows a round down); medians and per-round paired speedups are printed too. FLOPs per clip come from XLA's cost
analysis and from the matmul count; "of_matmul_peak" divides the achieved matmul FLOP/s by each framework's own
matmul probe rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from marlin_jax import Marlin
from marlin_jax.architectures import VIT_BASE, VIT_SMALL, MarlinArchitecture
from marlin_jax.model import encode_clips

ARCHITECTURES = {"vit_small": VIT_SMALL, "vit_base": VIT_BASE}
TORCH_THREADS = 2
FRAMEWORKS = ("jax", "torch")
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


def matmul_flops_per_clip(arch: MarlinArchitecture) -> float:
    """Multiply-adds x 2 of the encoder: patch embedding, then per block qkv, proj, MLP, q @ k^T and attn @ v."""
    n, d = arch.num_tokens, arch.encoder_embed_dim
    per_block = 2 * n * d * (3 * d + d + 2 * arch.mlp_dim) + 2 * 2 * n * n * d
    return 2 * n * arch.patch_dim * d + arch.encoder_depth * per_block


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_runners(size: int = 2048) -> dict[str, Runner]:
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


def model_runners(params, torch_model, arch: MarlinArchitecture, batch: int) -> tuple[dict[str, Runner], float]:
    """Both frameworks on the same clips, and XLA's FLOP count per clip."""
    clips = np.random.default_rng(batch).integers(0, 256, (batch, arch.num_frames, arch.img_size, arch.img_size, 3),
                                                   dtype=np.uint8)
    compiled = encode_clips.lower(params, clips, arch, False).compile()
    torch_clips = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255
    runners = {"jax": lambda: compiled(params, clips).block_until_ready(),
               "torch": lambda: torch_model.extract_features(torch_clips, keep_seq=False)}
    return runners, compiled.cost_analysis()["flops"] / batch


def benchmark_model(marlin_pytorch, arch: MarlinArchitecture, batch_sizes: list[int], rounds: int) -> dict:
    """Rounds interleave every (framework, batch) and the matmul probe, so each sees the same machine load."""
    params = jax.device_put(Marlin.random_init(arch, full=False).params["encoder"])
    torch_model = torch_encoder(marlin_pytorch, arch)
    runners = {("matmul", framework): run for framework, run in matmul_runners().items()}
    for batch in batch_sizes:
        model, xla_flops = model_runners(params, torch_model, arch, batch)
        runners.update({(batch, framework): run for framework, run in model.items()})
    for run in runners.values():
        run()  # warm-up: caches, allocator, oneDNN primitives
    seconds = {key: [] for key in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            seconds[key].append(timed(run))
    flops = matmul_flops_per_clip(arch)
    result = {"xla_flops_per_clip": xla_flops, "matmul_flops_per_clip": flops,
              "matmul_2048_gflops": {fw: 2 * 2048 ** 3 / min(seconds["matmul", fw]) / 1e9 for fw in FRAMEWORKS}}
    for framework in FRAMEWORKS:
        result[framework] = {
            f"batch_{b}": {"clips_per_s": b / min(seconds[b, framework]),
                           "clips_per_s_median": b / statistics.median(seconds[b, framework])}
            for b in batch_sizes}
    best = {fw: max(r["clips_per_s"] for r in result[fw].values()) for fw in FRAMEWORKS}
    result["best_clips_per_s"] = best
    result["speedup_jax_over_torch"] = best["jax"] / best["torch"]
    # Per round, same batch: less sensitive to load that drifts between rounds than best-of-rounds.
    result["speedup_paired_median"] = {
        f"batch_{b}": statistics.median(t / j for t, j in zip(seconds[b, "torch"], seconds[b, "jax"]))
        for b in batch_sizes}
    result["of_matmul_peak"] = {fw: best[fw] * flops / 1e9 / result["matmul_2048_gflops"][fw] for fw in best}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit_small,vit_base", help=f"from {', '.join(ARCHITECTURES)}")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(TORCH_THREADS)
    marlin_pytorch = import_marlin_pytorch()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    report = {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "jax": jax.__version__, "torch": torch.__version__, "torch_threads": TORCH_THREADS,
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "models": {},
    }
    for name in args.models.split(","):
        report["models"][name] = benchmark_model(marlin_pytorch, ARCHITECTURES[name], batch_sizes, args.rounds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
