"""Pretraining clips/s and MFU: marlin_jax's train step beside the official PyTorch MARLIN iteration, in one run.

    python benchmarks/pretrain_throughput.py                                  # CPU, ViT-S and ViT-B, batch 2
    python benchmarks/pretrain_throughput.py --sizes small --steps 5 --rounds 3
    python benchmarks/pretrain_throughput.py --device gpu --dtype bfloat16 --batch-size 32 --steps 20

Both sides train the same architecture on the same random clips with 156 of 1568 tokens visible (random
masks), two AdamW optimisers (betas 0.9/0.95, eps 1e-8, no weight decay), adversarial weight 0.01:
- JAX: `marlin_jax.pretraining.step.make_train_step`, jitted once.
- PyTorch: the real `marlin_pytorch.Marlin(as_feature_extractor=False)` and the official discriminator
  `MLP([patch_dim, decoder_embed_dim * mlp_ratio, 1], LeakyReLU)`, stepped as the official Lightning module
  does: forward, D loss on the non-detached prediction, D step; zero G grads; forward again, G step.
Timed rounds alternate between the two, so a change in the machine's load hits both. MFU (benchmarks/mfu.py)
divides each side's achieved model FLOP/s by its own framework's 2048x2048 matmul rate, measured before and
after the runs; "mfu_by_cpu_time" does the same per second of the process's CPU time, the figure that other
load on a shared machine hardly moves (torch's OpenMP threads spin while they wait, which counts against
it there). Model FLOPs are counted from the architecture for both sides; XLA's count (the step lowered
for an NVIDIA GPU, see mfu.xla_flops) and torch's FLOP counter (one official iteration) are printed beside them as cross-checks. Prints
one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from marlin_jax import model_flops
from marlin_jax.architectures import VIT_BASE, VIT_SMALL, MarlinArchitecture
from marlin_jax.pretraining.state import init_train_state, make_optimizer
from marlin_jax.pretraining.step import StepSettings, make_train_step

sys.path.insert(0, str(Path(__file__).parent))
import mfu  # noqa: E402  (benchmarks/ is not a package)

SIZES = {"small": VIT_SMALL, "base": VIT_BASE}
VISIBLE_RATIO = 0.1
ADV_WEIGHT = 0.01
LEARNING_RATE = 1.5e-4 * 2 / 256  # the official base rate scaled to a batch of 2; it does not affect speed
ADAMW = types.SimpleNamespace(type="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
# marlin_pytorch imports these at module level for video reading and face cropping only, never for the model.
IO_ONLY_MODULES = ("torchvision", "cv2", "ffmpeg")
MASK_DRAWS = 16  # PyTorch cycles through this many random masks, drawn up front as its data loader would


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def import_marlin_pytorch():
    """The installed official package, with stubs for the video-IO modules that may not load here."""
    for name in IO_ONLY_MODULES:
        try:
            __import__(name)
        except Exception:
            stub = types.ModuleType(name)
            stub.io = types.ModuleType(f"{name}.io")
            sys.modules[name], sys.modules[f"{name}.io"] = stub, stub.io
    import marlin_pytorch
    return marlin_pytorch


def measure_peaks(args) -> dict[str, dict[str, float]]:
    """GFLOP/s of one square matmul in each framework (best of 8), per wall second and per CPU-second."""
    return {"jax": mfu.jax_matmul_rates(args.peak_size, args.jax_dtype),
            "torch": mfu.torch_matmul_rates(args.peak_size, args.torch_dtype, args.torch_device)}


def _best_peaks(*measured: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {fw: {kind: max(m[fw][kind] for m in measured) for kind in measured[0][fw]} for fw in measured[0]}


def _rounded(peaks: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {fw: {kind: round(v, 1) for kind, v in rates.items()} for fw, rates in peaks.items()}


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class JaxTrainer:
    """marlin_jax's pure step, compiled once for the benchmark's shapes."""

    def __init__(self, arch: MarlinArchitecture, batch: dict[str, np.ndarray], dtype, remat: bool):
        self.settings = StepSettings(arch, mask_strategy="random", visible_ratio=VISIBLE_RATIO, adv_weight=ADV_WEIGHT,
                                     compute_dtype=dtype, remat=remat)
        schedule = optax.constant_schedule(LEARNING_RATE)
        g_tx, d_tx = make_optimizer(ADAMW), make_optimizer(ADAMW)
        self.state = nn.meta.unbox(init_train_state(jax.random.key(0), arch, g_tx, d_tx))
        self.batch = jax.device_put(batch)
        self.keys = list(jax.random.split(jax.random.key(1), 64))
        self.calls = 0
        start = time.perf_counter()
        jitted = jax.jit(make_train_step(self.settings, g_tx, d_tx, schedule), donate_argnums=0)
        self.step_fn = jitted.lower(self.state, self.batch, self.keys[0]).compile()
        self.compile_s = time.perf_counter() - start
        self.xla_flops = mfu.xla_flops(jitted, self.state, self.batch, self.keys[0])

    def run(self, steps: int) -> tuple[float, float]:
        """(wall, CPU) seconds of `steps` steps."""
        def steps_done():
            for _ in range(steps):
                self.state, metrics = self.step_fn(self.state, self.batch, self.keys[self.calls % len(self.keys)])
                self.calls += 1
            jax.block_until_ready((self.state, metrics))
        return mfu.timed(steps_done)


class OfficialIteration:
    """The official generator/discriminator iteration around the real marlin_pytorch modules."""

    def __init__(self, marlin_pytorch, arch: MarlinArchitecture, video: np.ndarray, num_visible: int,
                 device: str, dtype):
        from marlin_pytorch.model.modules import MLP
        self.arch, self.device = arch, device
        self.model = marlin_pytorch.Marlin(
            img_size=arch.img_size, patch_size=arch.patch_size, n_frames=arch.num_frames,
            encoder_embed_dim=arch.encoder_embed_dim, encoder_depth=arch.encoder_depth,
            encoder_num_heads=arch.encoder_num_heads, decoder_embed_dim=arch.decoder_embed_dim,
            decoder_depth=arch.decoder_depth, decoder_num_heads=arch.decoder_num_heads, mlp_ratio=arch.mlp_ratio,
            qkv_bias=arch.qkv_bias, qk_scale=arch.qk_scale, drop_rate=0.0, attn_drop_rate=0.0,
            norm_layer="LayerNorm", init_values=0.0, tubelet_size=arch.tubelet_size,
            as_feature_extractor=False).to(device).train()
        self.critic = MLP([arch.patch_dim, arch.discriminator_hidden_dim, 1],
                          build_activation=torch.nn.LeakyReLU).to(device).train()
        adamw = functools.partial(torch.optim.AdamW, lr=LEARNING_RATE, betas=(ADAMW.b1, ADAMW.b2), eps=ADAMW.eps,
                                  weight_decay=ADAMW.weight_decay)
        self.g_optimizer, self.d_optimizer = adamw(self.model.parameters()), adamw(self.critic.parameters())
        # The official loader hands over float clips (B, C, T, H, W) and bool masks (True = visible).
        self.video = torch.from_numpy(video).permute(0, 4, 1, 2, 3).to(device).float().div(255)
        generator = torch.Generator().manual_seed(0)
        order = torch.rand(MASK_DRAWS, len(video), arch.num_tokens, generator=generator).argsort(dim=-1)
        masks = torch.zeros(MASK_DRAWS, len(video), arch.num_tokens, dtype=torch.bool)
        masks.scatter_(-1, order[..., :num_visible], True)
        self.masks = list(masks.to(device))
        self.autocast = (functools.partial(torch.autocast, device, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext)
        self.calls = 0

    def _target(self, mask: torch.Tensor) -> torch.Tensor:
        a = self.arch
        b, c, t, h, w = self.video.shape
        patches = self.video.reshape(b, c, t // a.tubelet_size, a.tubelet_size, h // a.patch_size, a.patch_size,
                                     w // a.patch_size, a.patch_size)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, a.num_tokens, a.patch_dim)
        return patches[~mask].view(b, -1, a.patch_dim)

    def step(self) -> None:
        mask = self.masks[self.calls % len(self.masks)]
        self.calls += 1
        target = self._target(mask)
        self.d_optimizer.zero_grad()
        with self.autocast():
            pred = self.model(self.video, mask)
            scores = self.critic(torch.cat([pred, target]))  # pred is NOT detached, as in the official step
            fake, real = scores.chunk(2)
            d_loss = fake.mean() - real.mean()
        d_loss.backward()
        self.d_optimizer.step()
        self.g_optimizer.zero_grad()  # drops the generator gradients that the D backward left behind
        with self.autocast():
            pred = self.model(self.video, mask)
            g_loss = torch.nn.functional.mse_loss(pred, target) - ADV_WEIGHT * self.critic(pred).mean()
        g_loss.backward()
        self.g_optimizer.step()

    def run(self, steps: int) -> tuple[float, float]:
        """(wall, CPU) seconds of `steps` iterations."""
        def steps_done():
            for _ in range(steps):
                self.step()
            _synchronize(self.device)
        _synchronize(self.device)
        return mfu.timed(steps_done)

    def counted_step(self) -> float:
        """One step under torch's FLOP counter (matmuls, convolutions, attention); returns its FLOPs."""
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            self.step()
        return float(counter.get_total_flops())


def random_batch(arch: MarlinArchitecture, batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t, h, w = arch.grid
    return {"video": rng.integers(0, 256, (batch_size, arch.num_frames, arch.img_size, arch.img_size, 3), np.uint8),
            "occupancy": np.ones((batch_size, t, h, w, 11), bool)}  # random masks use only its shape


def framework_result(times: list[tuple[float, float]], steps: int, batch_size: int, flops_per_clip: float,
                     peak: dict[str, float]) -> dict:
    """Mean and best-round clips/s with their GFLOP/s and MFU (interference only slows a round), and the MFU by
    CPU time: FLOPs per CPU-second of the best round over the matmul's (benchmarks/mfu.py)."""
    clips = steps * batch_size
    clips_per_s = len(times) * clips / sum(wall for wall, _ in times)
    per_round = [clips / wall for wall, _ in times]
    clips_per_cpu_s = max(clips / cpu for _, cpu in times)
    return {"clips_per_s": round(clips_per_s, 4), "clips_per_s_per_round": [round(r, 4) for r in per_round],
            "clips_per_s_best_round": round(max(per_round), 4),
            "model_flops_per_clip": flops_per_clip,
            "achieved_gflops": round(clips_per_s * flops_per_clip / 1e9, 2),
            "mfu": round(mfu.mfu(clips_per_s, flops_per_clip, peak["wall"]), 3),
            "mfu_best_round": round(mfu.mfu(max(per_round), flops_per_clip, peak["wall"]), 3),
            "mfu_by_cpu_time": round(mfu.mfu(clips_per_cpu_s, flops_per_clip, peak["per_cpu_second"]), 3)}


def timed_rounds(name: str, args, jax_trainer: JaxTrainer, torch_trainer: OfficialIteration):
    """(wall, CPU) seconds per round for each framework, after the warm-up; rounds alternate between the two."""
    jax_trainer.run(args.warmup)
    torch_trainer.run(args.warmup - 1)  # its first warm-up step ran under the FLOP counter
    jax_times, torch_times = [], []
    for round_index in range(args.rounds):
        jax_times.append(jax_trainer.run(args.steps))
        torch_times.append(torch_trainer.run(args.steps))
        log(f"[{name}] round {round_index + 1}/{args.rounds}: JAX {jax_times[-1][0] / args.steps:.3f} s/step, "
            f"PyTorch {torch_times[-1][0] / args.steps:.3f} s/step")
    return jax_times, torch_times


def benchmark_size(name: str, args, marlin_pytorch, peaks_before: dict) -> dict:
    arch = SIZES[name]
    batch = random_batch(arch, args.batch_size)
    log(f"[{name}] compiling the JAX step")
    jax_trainer = JaxTrainer(arch, batch, args.jax_dtype, args.remat)
    num_visible = jax_trainer.settings.num_visible
    torch_trainer = OfficialIteration(marlin_pytorch, arch, batch["video"], num_visible, args.torch_device,
                                      args.torch_dtype)
    log(f"[{name}] warm-up: {args.warmup} step(s) each (the first PyTorch step under the FLOP counter)")
    torch_counted_flops = torch_trainer.counted_step() / args.batch_size
    jax_times, torch_times = timed_rounds(name, args, jax_trainer, torch_trainer)
    # The peak right after this size's rounds, with the one before all sizes: the better of the two counts.
    peaks = _best_peaks(measure_peaks(args), peaks_before)
    flops = model_flops.pretraining_flops(arch, num_visible)
    result = {
        "visible_tokens_per_clip": f"{num_visible} of {arch.num_tokens}",
        "matmul_peak_gflops": _rounded(peaks),
        "jax": {**framework_result(jax_times, args.steps, args.batch_size, flops["jax_step"], peaks["jax"]),
                "xla_flops_per_clip": jax_trainer.xla_flops / args.batch_size,
                "compile_s": round(jax_trainer.compile_s, 1)},
        "torch": {**framework_result(torch_times, args.steps, args.batch_size, flops["official_iteration"],
                                     peaks["torch"]),
                  "flop_counter_flops_per_clip": torch_counted_flops},
        "generator_forward_flops_per_clip": flops["generator_forward"],
        "forward_equivalents": {"jax": round(flops["jax_step"] / flops["generator_forward"], 2),
                                "torch": round(flops["official_iteration"] / flops["generator_forward"], 2)},
    }
    result["jax_over_torch"] = round(result["jax"]["clips_per_s"] / result["torch"]["clips_per_s"], 3)
    # On a shared CPU the OpenMP threads of PyTorch lose far more to other load than XLA's pool does; the
    # ratio of the best rounds is the closer estimate of an idle machine.
    result["jax_over_torch_best_rounds"] = round(
        result["jax"]["clips_per_s_best_round"] / result["torch"]["clips_per_s_best_round"], 3)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small,base", help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--batch-size", type=int, default=2, help="global batch (clips per step)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per framework per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating JAX/PyTorch timing rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per framework (>= 1)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype; parameters stay float32 (JAX compute_dtype, torch autocast)")
    parser.add_argument("--remat", action="store_true", help="rematerialise the JAX transformer blocks")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul side for the peak (2048 CPU, 8192 GPU)")
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = sorted(set(args.sizes) - set(SIZES))
    if unknown or not args.sizes:
        parser.error(f"--sizes must name some of {', '.join(SIZES)}, got {unknown or 'nothing'}")
    for field in ("batch_size", "steps", "rounds", "warmup"):
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be >= 1")
    args.peak_size = args.peak_size or (2048 if args.device == "cpu" else 8192)
    args.jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    args.torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    args.torch_device = "cuda" if args.device == "gpu" else "cpu"
    return args


def configure_devices(args) -> None:
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    else:
        # Both frameworks share the GPU: JAX must not take 75% of its memory up front (read at backend start).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if jax.default_backend() == "cpu":
            raise ValueError("--device gpu, but JAX found no accelerator (jax.default_backend() is 'cpu')")
        if not torch.cuda.is_available():
            raise ValueError("--device gpu, but torch.cuda.is_available() is False")
        # JAX runs float32 matmuls on tensor cores (TF32) by default on GPU; let PyTorch do the same.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(os.cpu_count())


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_devices(args)
    marlin_pytorch = import_marlin_pytorch()
    machine_before = mfu.machine()
    log(f"matmul peak: {args.peak_size}^2 {args.dtype}")
    peaks_before = measure_peaks(args)
    sizes = {name: benchmark_size(name, args, marlin_pytorch, peaks_before) for name in args.sizes}
    print(json.dumps({
        "device": args.device, "machine": machine_before, "torch_device": args.torch_device,
        "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(), "dtype": args.dtype,
        "remat": args.remat, "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
        "warmup": args.warmup, "mask_strategy": "random",
        "load_average_1_5_15min": {"before": machine_before["load_average_1_5_15min"],
                                   "after": [round(x, 2) for x in os.getloadavg()]},
        "matmul_peak_gflops_before": {"n": args.peak_size, "dtype": args.dtype, **_rounded(peaks_before)},
        "sizes": sizes,
    }, indent=1))


if __name__ == "__main__":
    main()
