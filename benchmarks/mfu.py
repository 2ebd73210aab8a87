"""Model FLOPs utilisation (MFU), shared by the benchmark scripts: the peak they divide by, the FLOPs they count.

- `jax_matmul_rates`, `torch_matmul_rates`: the best-of-N rate of one n x n matmul in each framework on this
  machine, measured in the same run as the model, so that a change of CPU or of machine load moves both: per
  second of wall time, and per second of this process's CPU time (`timed`).
- The model FLOPs per clip they divide by come from `marlin_jax.model_flops` (2 per multiply-add of every
  matmul, counted from the architecture: nothing for recomputation, softmax or normalisation).
- `xla_flops`: XLA's own count, the cross-check. The function is lowered for NVIDIA GPUs, where attention is
  one `dot_product_attention` call (XLA's, as this machine has no cuDNN) and patchify a transpose: on the CPU
  attention loops over query chunks, and XLA counts a loop body once; on a TPU attention is a Pallas kernel,
  which XLA does not count, and patchify a one-hot convolution, which it does.
- `mfu`: achieved model FLOP/s over the peak. Computed from CPU time on both sides (FLOPs per CPU-second over
  the matmul's FLOPs per CPU-second) it is the share of the cores' work that was useful, which other processes'
  load hardly changes, while wall-clock MFU drops as soon as they take the cores; on an idle machine the wall
  MFU is at most the CPU-time one (threads that wait add wall time, not CPU time).
- `machine`: the CPU model, the instruction-set extensions that decide the peak, and the load average.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from typing import Callable

import jax
import jax.numpy as jnp


PEAK_MATMUL_SIZE = 2048
# lscpu flags that set what a CPU matmul can reach: AVX-512 (fp32), AVX-512 BF16 and AMX (bf16).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_seconds() -> float:
    """CPU time of this process, all threads (XLA's and torch's pools included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call; run() must block until its work is done."""
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - start_wall, cpu_seconds() - start_cpu


def best_times(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Fastest wall and fastest CPU time of `repeats` calls, after one warm-up call."""
    run()
    times = [timed(run) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def _rates(flops: float, times: tuple[float, float]) -> dict[str, float]:
    return {"wall": flops / times[0] / 1e9, "per_cpu_second": flops / times[1] / 1e9}


def jax_matmul_rates(n: int = PEAK_MATMUL_SIZE, dtype=jnp.float32, repeats: int = 8) -> dict[str, float]:
    """GFLOP/s of an n x n matmul: {"wall": per second, "per_cpu_second": per second of CPU time}."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(jnp.dot)
    return _rates(2 * n ** 3, best_times(lambda: matmul(a, a).block_until_ready(), repeats))


def jax_matmul_gflops(n: int = PEAK_MATMUL_SIZE, dtype=jnp.float32, repeats: int = 8) -> float:
    """The wall-clock rate alone (accelerators, and scripts that report only wall time)."""
    return jax_matmul_rates(n, dtype, repeats)["wall"]


def torch_matmul_rates(n: int = PEAK_MATMUL_SIZE, dtype=None, device: str = "cpu", repeats: int = 8) -> dict[str, float]:
    import torch
    a = torch.randn(n, n, dtype=dtype or torch.float32, device=device)

    def run():
        torch.mm(a, a)
        if device == "cuda":
            torch.cuda.synchronize()
    return _rates(2 * n ** 3, best_times(run, repeats))


def xla_flops(jitted, *args, platform: str = "cuda") -> float:
    """XLA's FLOP count (all ops, elementwise included) of `jitted(*args)`, lowered for `platform` without
    compiling; args may be arrays or ShapeDtypeStructs."""
    cost = jitted.trace(*args).lower(lowering_platforms=(platform,)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def mfu(clips_per_s: float, flops_per_clip: float, peak_gflops: float) -> float:
    return clips_per_s * flops_per_clip / 1e9 / peak_gflops


def _lscpu() -> dict[str, str]:
    fields = {}
    try:
        with os.popen("lscpu") as out:
            for line in out:
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def machine() -> dict:
    """What the numbers depend on: CPU model and ISA, core count, load average, JAX version and devices."""
    cpu = _lscpu()
    flags = set(cpu.get("Flags", "").split())
    return {"cpu_model": cpu.get("Model name") or platform.processor() or platform.machine(),
            "isa": {flag: flag in flags for flag in ISA_FLAGS},
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
            "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", "")}

