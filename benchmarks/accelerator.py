"""One command, one accelerator, under 8 minutes: how efficiently MARLIN trains and extracts there. Prints JSON.

    python benchmarks/accelerator.py                        # one GPU (or TPU chip): the full run
    python benchmarks/accelerator.py --smoke                # tiny sizes, about 2 minutes on a 2-core CPU
    bash benchmarks/accelerator.sh                          # the same, output also saved to a file

Sections (each runs within its own time budget; one that fails or runs out records why and the rest go on):
- device: the chip, and its vendor peak for dense bf16 matmuls where known (H100/H200 SXM 989 TFLOP/s, ...);
- matmul_peak: a bf16 8192^2 matmul measured here, the peak MFU is reported against;
- pretraining: ViT-B train steps in bf16 (fp32 parameters) at global batch 32, 64 and 128: clips/s, model
  TFLOP/s (FLOPs counted from the architecture, benchmarks/mfu.py) and MFU against the measured and the
  vendor peak, compile time, and peak device memory (`device.memory_stats()`, cumulative: batch sizes run
  in increasing order);
- attention: `jax.nn.dot_product_attention` with implementation "xla" and "cudnn" side by side, forward
  and forward+backward, at the decoder's and the encoder's shapes, and the implementation the model uses;
- extraction: encoder clips/s at batch 32 (float32 model, as `python -m marlin_jax.extract` runs it);
- input_pipeline: the real grain pipeline (`make_pretrain_loader`, decoding JPEG frames in worker processes)
  on demo shards built by `python -m data_prep.demo`, feeding the batch-32 train step: the share of wall
  time the step loop waits for data, and the loader's own clips/s.

Budgets are checked between measurements; a compile that has started runs to its end. The whole run ends
after the last section or at --deadline seconds (default 450), whichever comes first; a section still running
20 s after the deadline is abandoned: the JSON gathered so far is printed, with that section named in
"abandoned_in", and the process exits.

TPU: on a single-host TPU VM (v4-8, v5e-8, v5p-8, v6e-8, ...) install the TPU build of JAX
(`pip install -e . "jax[tpu]"`) and run the same command on the VM, e.g.
    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 \
        --command "cd marlin_jax && python benchmarks/accelerator.py --output tpu.json"
It measures one chip (the first device): batches are not split across chips. The cudnn attention entry then
records that cuDNN is absent, and the model runs XLA's attention on TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from marlin_jax import model_flops
from marlin_jax.architectures import VIT_BASE, VIT_TINY, MarlinArchitecture
from marlin_jax.model import encode_clips, gpu_attention_implementation, init_params
from marlin_jax.pretraining.state import init_train_state, make_optimizer
from marlin_jax.pretraining.step import StepSettings, make_train_step

sys.path.insert(0, str(Path(__file__).parent))
import mfu  # noqa: E402  (benchmarks/ is not a package)

# Dense bf16 matmul peaks from the vendors' data sheets, TFLOP/s per chip; the first match of the device kind.
VENDOR_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)
LOADER_BUFFER = 2  # batches each loader worker prefetches
ADAMW = types.SimpleNamespace(type="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: the full sizes, or tiny ones for --smoke."""

    arch: MarlinArchitecture
    batch_sizes: tuple[int, ...]
    matmul_side: int
    timed_steps: int
    extraction_batch: int
    pipeline_steps: int


FULL = Sizes(VIT_BASE, (32, 64, 128), 8192, 10, 32, 20)
# The tiny pretraining model at the real 224 px, 16-frame geometry, so the demo shards feed it unchanged.
SMOKE = Sizes(dataclasses.replace(VIT_TINY, img_size=224), (2, 4), 512, 2, 2, 4)
ABANDON_GRACE_S = 20
# Seconds per section; each also stops at the run's deadline.
BUDGETS = {"matmul_peak": 30, "pretraining": 240, "attention": 45, "extraction": 60, "input_pipeline": 100}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class OutOfBudget(Exception):
    pass


class Budget:
    """A section's time allowance, cut short by the run's deadline."""

    def __init__(self, seconds: float, deadline: float):
        self.end = min(time.monotonic() + seconds, deadline)

    def left(self) -> float:
        return self.end - time.monotonic()

    def require(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise OutOfBudget(f"{what}: skipped, {max(self.left(), 0):.0f} s of the section's budget left, "
                              f"about {seconds:.0f} s needed")


def vendor_peak_tflops(device_kind: str) -> float | None:
    return next((peak for name, peak in VENDOR_BF16_TFLOPS if name.lower() in device_kind.lower()), None)


def peak_memory_bytes(device) -> int | None:
    stats = device.memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def timed_seconds(run, repeats: int) -> float:
    """Mean seconds of `repeats` calls after one warm-up call; run() must block until done."""
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def device_section() -> dict:
    device = jax.devices()[0]
    kind = device.device_kind
    return {"backend": jax.default_backend(), "device_kind": kind, "device_count": jax.device_count(),
            "vendor_bf16_dense_tflops": vendor_peak_tflops(kind), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


def matmul_peak_section(sizes: Sizes, budget: Budget) -> dict:
    n = sizes.matmul_side
    result = {"n": n}
    for name, dtype in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        budget.require(2, f"{name} matmul")
        result[f"{name}_tflops"] = round(mfu.jax_matmul_gflops(n, dtype, repeats=10) / 1e3, 2)
    return result


def random_batch(arch: MarlinArchitecture, batch_size: int) -> dict[str, jax.Array]:
    t, h, w = arch.grid
    rng = np.random.default_rng(batch_size)
    video = rng.integers(0, 256, (batch_size, arch.num_frames, arch.img_size, arch.img_size, 3), np.uint8)
    # Random occupancy: Fasking then makes label groups visible as it would with real region maps.
    occupancy = rng.random((batch_size, t, h, w, 11)) < 0.3
    return jax.device_put({"video": video, "occupancy": occupancy})


class BenchmarkStep:
    """The real pretraining step (Fasking masks, D then G, two AdamW) in bf16, jitted for one batch size."""

    def __init__(self, arch: MarlinArchitecture, batch_size: int):
        self.settings = StepSettings(arch, compute_dtype=jnp.bfloat16)
        schedule = optax.constant_schedule(1.5e-4)
        g_tx, d_tx = make_optimizer(ADAMW), make_optimizer(ADAMW)
        self.state = nn.meta.unbox(init_train_state(jax.random.key(0), arch, g_tx, d_tx))
        self.batch = random_batch(arch, batch_size)
        self.key = jax.random.key(1)
        start = time.perf_counter()
        self.step = jax.jit(make_train_step(self.settings, g_tx, d_tx, schedule), donate_argnums=0).lower(
            self.state, self.batch, self.key).compile()
        self.compile_s = time.perf_counter() - start
        self.calls = 0

    def __call__(self, batch=None):
        self.state, metrics = self.step(self.state, self.batch if batch is None else batch,
                                        jax.random.fold_in(self.key, self.calls))
        self.calls += 1
        return metrics

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            metrics = self()
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


def pretraining_section(sizes: Sizes, budget: Budget, peaks: dict, vendor_tflops: float | None,
                        steps_out: dict) -> dict:
    """One entry per batch size; the compiled batch-`batch_sizes[0]` step is kept for the pipeline section."""
    arch, device = sizes.arch, jax.devices()[0]
    flops_per_clip = model_flops.pretraining_flops(arch, StepSettings(arch).num_visible)["jax_step"]
    result = {"arch": dataclasses.asdict(arch), "compute_dtype": "bfloat16", "model_flops_per_clip": flops_per_clip}
    expected_s = 30.0
    for batch_size in sizes.batch_sizes:
        entry = result[f"batch_{batch_size}"] = {}
        try:
            budget.require(expected_s, f"batch {batch_size}")
            started = time.perf_counter()
            log(f"pretraining: compiling batch {batch_size}")
            step = BenchmarkStep(arch, batch_size)
            step.run(2)  # warm-up: autotuning, allocator
            seconds = step.run(sizes.timed_steps)
            clips_per_s = sizes.timed_steps * batch_size / seconds
            entry.update({
                "compile_s": round(step.compile_s, 1), "step_s": round(seconds / sizes.timed_steps, 4),
                "clips_per_s": round(clips_per_s, 2),
                "model_tflops": round(clips_per_s * flops_per_clip / 1e12, 3),
                "mfu_vs_measured_bf16_peak": _fraction(clips_per_s * flops_per_clip / 1e9, peaks.get("bfloat16")),
                "mfu_vs_vendor_bf16_peak": _fraction(clips_per_s * flops_per_clip / 1e9, vendor_tflops and
                                                     vendor_tflops * 1e3),
                "peak_memory_bytes_so_far": peak_memory_bytes(device)})
            log(f"pretraining: batch {batch_size}: {entry['clips_per_s']} clips/s, "
                f"{entry['model_tflops']} TFLOP/s")
            # The next (larger) batch compiles about as long and steps proportionally longer.
            expected_s = 1.3 * (time.perf_counter() - started) + 2 * seconds
            if batch_size == sizes.batch_sizes[0]:
                steps_out.update(step=step, clips_per_s=entry["clips_per_s"])
        except Exception as error:  # an OOM at the largest batch must not hide the others
            entry["error"] = _describe(error)
    return result


def _fraction(achieved_gflops: float, peak_gflops: float | None) -> float | None:
    return None if not peak_gflops else round(achieved_gflops / peak_gflops, 3)


def attention_flops(batch: int, heads: int, tokens: int, head_dim: int) -> int:
    """q @ k^T and attn @ v: 4 B H N^2 E FLOPs forward; the backward's four matmuls double it again."""
    return 4 * batch * heads * tokens * tokens * head_dim


def attention_section(sizes: Sizes, budget: Budget) -> dict:
    arch = sizes.arch
    batch = sizes.batch_sizes[0]
    num_visible = StepSettings(arch).num_visible
    decoder_head_dim = arch.decoder_embed_dim // arch.decoder_num_heads
    encoder_head_dim = arch.encoder_embed_dim // arch.encoder_num_heads
    shapes = {"decoder": (batch, arch.decoder_num_heads, arch.num_tokens, decoder_head_dim),
              "encoder_visible": (batch, arch.encoder_num_heads, num_visible, encoder_head_dim),
              "encoder_extraction": (sizes.extraction_batch, arch.encoder_num_heads, arch.num_tokens,
                                     encoder_head_dim)}
    backend = jax.default_backend()
    model_choice = {"cpu": "chunked einsum attention with a custom backward (marlin_jax.model._cpu_attention)",
                    "gpu": gpu_attention_implementation(jnp.bfloat16, 64)}.get(backend, "xla")
    result = {"dtype": "bfloat16", "model_uses_in_bf16": model_choice}
    for name, (b, h, n, e) in shapes.items():
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (b, n, h, e), jnp.bfloat16) for key in keys)
        entry = result[name] = {"shape_bnhe": [b, n, h, e]}
        for implementation in ("xla", "cudnn"):
            attend = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
            loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))  # noqa: E731
            runs = {"forward": jax.jit(attend), "forward_backward": jax.jit(jax.grad(loss, argnums=(0, 1, 2)))}
            for mode, fn in runs.items():
                try:
                    budget.require(3, f"{name} {implementation} {mode}")
                    seconds = timed_seconds(lambda: jax.block_until_ready(fn(q, k, v)), 10)
                    flops = attention_flops(b, h, n, e) * (1 if mode == "forward" else 3)
                    entry[f"{implementation}_{mode}"] = {"ms": round(seconds * 1e3, 3),
                                                         "tflops": round(flops / seconds / 1e12, 3)}
                except Exception as error:
                    entry[f"{implementation}_{mode}"] = {"error": _describe(error)}
    return result


def extraction_section(sizes: Sizes, budget: Budget, peaks: dict) -> dict:
    arch, batch = sizes.arch, sizes.extraction_batch
    generator, _ = init_params(jax.random.key(0), arch)
    params = jax.device_put(nn.meta.unbox(generator)["encoder"])
    clips = jax.device_put(np.random.default_rng(0).integers(
        0, 256, (batch, arch.num_frames, arch.img_size, arch.img_size, 3), np.uint8))
    budget.require(20, "extraction")
    start = time.perf_counter()
    compiled = encode_clips.lower(params, clips, arch, False).compile()
    compile_s = time.perf_counter() - start
    seconds = timed_seconds(lambda: compiled(params, clips).block_until_ready(), 10)
    flops = model_flops.extraction_flops(arch)
    clips_per_s = batch / seconds
    return {"batch_size": batch, "dtype": "float32 (the extraction path)", "compile_s": round(compile_s, 1),
            "clips_per_s": round(clips_per_s, 2), "model_flops_per_clip": flops,
            "model_tflops": round(clips_per_s * flops / 1e12, 3),
            "fraction_of_measured_float32_peak": _fraction(clips_per_s * flops / 1e9, peaks.get("float32")),
            "peak_memory_bytes_so_far": peak_memory_bytes(jax.devices()[0])}


def demo_shards(data: str | None, budget: Budget) -> Path:
    """--data, or demo shards built now into a temporary folder with `python -m data_prep.demo`."""
    if data:
        return Path(data)
    budget.require(30, "building the demo shards")
    output = Path(tempfile.mkdtemp(prefix="marlin_demo_"))
    log(f"input pipeline: building demo shards in {output}")
    # 224 px crops: the real pretraining geometry (the demo's default is 112).
    subprocess.run([sys.executable, "-m", "data_prep.demo", "--output", str(output), "--image_size", "224"],
                   check=True, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                   timeout=max(budget.left() - 20, 10))
    return output / "shards"


def input_pipeline_section(sizes: Sizes, budget: Budget, steps_out: dict, data: str | None,
                           workers: int) -> dict:
    """The step loop fed by the real loader: wall time, time blocked in next(loader) and in the transfer."""
    from marlin_jax.data.pipeline import make_pretrain_loader
    step = steps_out.get("step")
    if step is None:
        raise RuntimeError("no compiled train step: the pretraining section did not finish its first batch size")
    batch_size = sizes.batch_sizes[0]
    shards = demo_shards(data, budget)
    loader = make_pretrain_loader(shards, "train", batch_size, seed=0, worker_count=workers,
                                  worker_buffer_size=LOADER_BUFFER)
    try:
        budget.require(10, "input pipeline")
        for _ in range(2):  # start the workers and fill their buffers
            step(jax.device_put(next(loader)))
        waited = transferred = 0.0
        steps = 0
        start = time.perf_counter()
        while steps < sizes.pipeline_steps and budget.left() > 5:
            fetch = time.perf_counter()
            host_batch = next(loader)
            put = time.perf_counter()
            batch = jax.device_put(host_batch)
            waited, transferred = waited + put - fetch, transferred + time.perf_counter() - put
            metrics = step(batch)
            steps += 1
        jax.block_until_ready((step.state, metrics))
        total = time.perf_counter() - start
        for _ in range(workers * LOADER_BUFFER):  # what the workers prefetched while the steps ran
            next(loader)
        loader_start = time.perf_counter()
        for _ in range(steps):
            next(loader)
        loader_s = time.perf_counter() - loader_start
    finally:
        if hasattr(loader, "close"):
            loader.close()
    return {"batch_size": batch_size, "loader_workers": workers, "steps": steps,
            "clips_per_s_fed_by_loader": round(steps * batch_size / total, 2),
            "clips_per_s_on_device_batch": steps_out["clips_per_s"],
            "data_wait_share_of_step_loop": round(waited / total, 3),
            "transfer_share_of_step_loop": round(transferred / total, 3),
            "loader_alone_clips_per_s": round(steps * batch_size / loader_s, 2),
            # Under 5% of the loop spent waiting: the accelerator is not starved.
            "keeps_up": waited / total < 0.05}


def _describe(error: BaseException) -> str:
    if isinstance(error, OutOfBudget):
        return str(error)
    return f"{type(error).__name__}: {error}"[:2000]


def abandon_after(seconds: float, report: dict, output: Path | None) -> None:
    """Prints what `report` holds and ends the process, unless the run finishes within `seconds`."""
    def abandon():
        report["abandoned_in"] = report.get("running_section")
        text = json.dumps(dict(report), indent=1, default=str)
        if output is not None:
            output.write_text(text)
        print(text, flush=True)
        os._exit(0)
    timer = threading.Timer(seconds, abandon)
    timer.daemon = True
    timer.start()


def run_section(report: dict, name: str, fn, output: Path | None) -> None:
    started = time.perf_counter()
    report["running_section"] = name
    log(f"section {name}")
    try:
        report[name] = fn()
    except Exception as error:
        report[name] = {"error": _describe(error)}
        if not isinstance(error, OutOfBudget):
            traceback.print_exc(file=sys.stderr)
    report[name]["section_s"] = round(time.perf_counter() - started, 1)
    if output is not None:
        output.write_text(json.dumps(report, indent=1))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script on any machine")
    parser.add_argument("--deadline", type=float, default=450, help="seconds for the whole run")
    parser.add_argument("--data", default=None, help="pretraining shards for the input-pipeline section "
                                                      "(default: demo shards built on the spot)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader worker processes (default: CPU count - 1, at most 16)")
    parser.add_argument("--output", default=None, help="also write the JSON here, after every section")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    deadline = time.monotonic() + args.deadline
    sizes = SMOKE if args.smoke else FULL
    workers = args.workers if args.workers is not None else max(1, min(16, (os.cpu_count() or 2) - 1))
    output = Path(args.output) if args.output else None
    report: dict = {"smoke": args.smoke}
    steps_out: dict = {}
    budget = lambda name: Budget(BUDGETS[name], deadline)  # noqa: E731
    abandon_after(args.deadline + ABANDON_GRACE_S, report, output)
    run_section(report, "device", device_section, output)
    run_section(report, "matmul_peak", lambda: matmul_peak_section(sizes, budget("matmul_peak")), output)
    peaks = {k.removesuffix("_tflops"): v * 1e3 for k, v in report["matmul_peak"].items() if k.endswith("_tflops")}
    vendor = report["device"].get("vendor_bf16_dense_tflops")
    run_section(report, "pretraining",
                lambda: pretraining_section(sizes, budget("pretraining"), peaks, vendor, steps_out), output)
    run_section(report, "attention", lambda: attention_section(sizes, budget("attention")), output)
    run_section(report, "extraction", lambda: extraction_section(sizes, budget("extraction"), peaks), output)
    run_section(report, "input_pipeline", lambda: input_pipeline_section(
        sizes, budget("input_pipeline"), steps_out, args.data, workers), output)
    report.pop("running_section")
    report["total_s"] = round(args.deadline - (deadline - time.monotonic()), 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
