"""Where a step's time goes on XLA:CPU: each executed HLO op from a JAX profiler trace, grouped; prints JSON.

    python benchmarks/op_breakdown.py --what pretrain --size small     # the train step, batch 2 (as benchmarked)
    python benchmarks/op_breakdown.py --what extract --size base --batch 1

The function is compiled with the XLA dump on (`--xla_dump_to`, a temporary folder), run a few times, then run
`--runs` times under `jax.profiler`. Every op the CPU runtime executes is a trace event named after its HLO
instruction; the optimised HLO in the dump says what the instruction does. Groups:
- matmul: ops that contain a dot (XLA:CPU fuses bias adds, GELU, softmax's max and exp into some of them);
- softmax exp, gelu, layer norm, transpose/copy, gather, optimizer & metrics (ops outside the model's
  modules), other elementwise.
Also reported: the time between ops (runtime overhead and waiting), the op count, the process CPU time per run
(less sensitive to other load than wall time), and `matmul_only_mfu`: the MFU the function would reach if only
its matmul ops ran, as fast as they run here, i.e. the ceiling that the non-matmul work leaves. Wall times on a
loaded machine inflate memory-bound ops more than matmuls, so read shares next to the printed load average.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

DUMP_DIR = tempfile.mkdtemp(prefix="xla_dump_")
# The dump must be configured before JAX starts its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP_DIR} --xla_dump_hlo_as_text"
                           " --xla_dump_hlo_module_re=.*(train_step|encode_clips).*").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from marlin_jax import model_flops  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import mfu  # noqa: E402

CONTAINERS = ("while", "call", "conditional", "cond")
MODEL_SCOPES = ("MarlinMAE", "MarlinEncoder", "PatchDiscriminator")


def hlo_instructions(module_text: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (what its computation does, its op_name metadata)."""
    bodies = {m.group(1): m.group(0) for m in re.finditer(r"^(%[\w.\-]+) \(.*?^}", module_text, re.S | re.M)}
    instructions = {}
    for line in module_text.splitlines():
        match = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if not match:
            continue
        name, opcode = match.groups()
        called = re.search(r"calls=(%[\w.\-]+)", line)
        body = bodies.get(called.group(1), "") if called and opcode == "fusion" else line
        op_name = re.search(r'op_name="([^"]*)"', line)
        instructions[name] = (body, op_name.group(1) if op_name else "")
    return instructions


def group_of(body: str, op_name: str) -> str:
    def has(opcode):
        return re.search(rf"\b{opcode}\(", body) is not None
    if has("dot") or has("convolution"):
        return "matmul"
    if has("exponential") and "attn" in op_name:
        return "softmax exp"
    if has("erf") or ("/mlp/" in op_name and has("exponential")):
        return "gelu"
    if re.search(r"/norm\d?/", op_name):
        return "layer norm"
    if has("gather") or has("scatter"):
        return "gather"
    if not any(scope in op_name for scope in MODEL_SCOPES):
        return "optimizer & metrics"
    if has("transpose") or has("copy"):
        return "transpose/copy"
    return "other elementwise"


def breakdown(trace_dir: str, module_text: str, runs: int, wall_s_per_run: float) -> dict:
    trace_file = sorted(Path(trace_dir).rglob("*.trace.json.gz"))[-1]
    events = json.load(gzip.open(trace_file))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops = [e for e in events if e.get("ph") == "X" and "hlo_module" in e.get("args", {})
           and not e["name"].startswith(CONTAINERS)]
    instructions = hlo_instructions(module_text)
    groups = collections.Counter()
    for event in ops:
        body, op_name = instructions.get(event["name"], ("", ""))
        groups[group_of(body, op_name)] += event["dur"]
    busy = sum(groups.values())
    ops.sort(key=lambda e: e["ts"])
    covered, end = 0.0, None
    for event in ops:  # the union of the op intervals: time in which some op ran
        start, stop = event["ts"], event["ts"] + event["dur"]
        if end is None or start > end:
            covered, end = covered + event["dur"], stop
        elif stop > end:
            covered, end = covered + stop - end, stop
    return {"ops_per_run": len(ops) // runs, "busy_ms_per_run": round(busy / 1e3 / runs, 1),
            "share_of_wall_with_no_op_running": round(1 - covered / 1e6 / runs / wall_s_per_run, 3),
            "share": {g: round(t / busy, 3) for g, t in groups.most_common()},
            "ms_per_run": {g: round(t / 1e3 / runs, 1) for g, t in groups.most_common()}}


def pretrain_function(size: str, batch: int):
    import flax.linen as nn
    import optax
    from pretrain_throughput import ADAMW, SIZES, random_batch
    from marlin_jax.pretraining.state import init_train_state, make_optimizer
    from marlin_jax.pretraining.step import StepSettings, make_train_step
    arch = SIZES[size]
    settings = StepSettings(arch, mask_strategy="random", visible_ratio=0.1, adv_weight=0.01)
    schedule = optax.constant_schedule(1e-4)
    g_tx, d_tx = make_optimizer(ADAMW), make_optimizer(ADAMW)
    state = nn.meta.unbox(init_train_state(jax.random.key(0), arch, g_tx, d_tx))
    step = jax.jit(make_train_step(settings, g_tx, d_tx, schedule))
    batch_arrays = jax.device_put(random_batch(arch, batch))
    key = jax.random.key(1)
    flops = batch * model_flops.pretraining_flops(arch, settings.num_visible)["jax_step"]
    return lambda: jax.block_until_ready(step(state, batch_arrays, key)), flops


def extract_function(size: str, batch: int):
    from marlin_jax.architectures import VIT_BASE, VIT_SMALL
    from marlin_jax.model import encode_clips, init_params
    import flax.linen as nn
    arch = {"small": VIT_SMALL, "base": VIT_BASE}[size]
    params = jax.device_put(nn.meta.unbox(init_params(jax.random.key(0), arch)[0])["encoder"])
    clips = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, 16, 224, 224, 3), np.uint8))
    return (lambda: encode_clips(params, clips, arch, False).block_until_ready(),
            batch * model_flops.extraction_flops(arch))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=("pretrain", "extract"), default="pretrain")
    parser.add_argument("--size", choices=("small", "base"), default="small")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 for pretrain, 1 for extract")
    parser.add_argument("--runs", type=int, default=3, help="profiled runs (after 3 untimed ones)")
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    batch = args.batch or (2 if args.what == "pretrain" else 1)
    run, flops = (pretrain_function if args.what == "pretrain" else extract_function)(args.size, batch)
    for _ in range(3):
        run()
    peak = mfu.jax_matmul_rates()
    start_cpu, start_wall = mfu.cpu_seconds(), time.perf_counter()
    trace_dir = tempfile.mkdtemp(prefix="jax_trace_")
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.runs):
        run()
    jax.profiler.stop_trace()
    wall, cpu = (time.perf_counter() - start_wall) / args.runs, (mfu.cpu_seconds() - start_cpu) / args.runs
    module = next(p for p in sorted(Path(DUMP_DIR).glob("*after_optimizations.txt"))
                  if ("train_step" if args.what == "pretrain" else "encode_clips") in p.name)
    result = breakdown(trace_dir, module.read_text(), args.runs, wall)
    matmul_s = result["ms_per_run"].get("matmul", 0) / 1e3
    report = {"what": args.what, "size": args.size, "batch": batch, "machine": mfu.machine(),
              "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()}, "model_flops": flops,
              "profiled_wall_s_per_run": round(wall, 3), "cpu_s_per_run": round(cpu, 3),
              "mfu_profiled": round(flops / wall / 1e9 / peak["wall"], 3),
              "mfu_by_cpu_time": round(flops / cpu / 1e9 / peak["per_cpu_second"], 3),
              "matmul_only_mfu": round(flops / matmul_s / 1e9 / peak["wall"], 3) if matmul_s else None,
              **result, "hlo_dump": DUMP_DIR, "trace": trace_dir}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
