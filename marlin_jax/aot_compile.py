"""A config's device programs compiled for a TPU slice on a machine without a TPU, and what the TPU compiler says
about them: HBM per chip, FLOPs, collectives, the attention kernel, and whether the run fits.

`libtpu` (pip install 'jax[tpu]') describes a slice (`jax.experimental.topologies.get_topology_desc`): its chips,
hosts and chip kind, as compile-only devices. The run's own builders then make the programs on a mesh over those
devices (`sharding.make_mesh`, as the trainer does over `jax.devices()`), and `jit(...).lower(ShapeDtypeStructs
carrying NamedShardings).compile()` runs the real TPU compiler. Nothing executes on any device: keys, states and
batches exist only as shapes.

Programs per config kind:
- pretraining: the train step (`pretraining_program`), and the feature-extraction forward that
  `python -m marlin_jax.extract --model <the same config>` runs on each host (`encode_clips`);
- fine-tuning: the train step and the evaluation forward (`finetuning_program`);
- a linear probe has none to size: it fits a linear head on precomputed features on one device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from marlin_jax import model_flops
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.training import sharding

GIB = 2 ** 30
# The official YouTube Faces train split that MARLIN pretrains on, in clips: the schedule's length when the
# config's data path has no manifest to count (--train_clips overrides it).
YOUTUBE_FACES_TRAIN_CLIPS = 2593
# The share of peak FLOP/s at which `hours_at_50pct_mfu` prices a schedule.
REFERENCE_MFU = 0.5


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation as the topology names it (`v5e:4x4`), and Google's published per-chip figures."""

    device_kind: str
    peak_bf16_flops: float
    hbm_bytes: int
    # v4 and v5p chips hold two TensorCores that JAX drives as one device ("megacore").
    megacore: bool
    # The most chips one host (TPU VM) of the slice drives: 8 for v5e/v6e slices of up to 8 chips, else 4.
    max_chips_per_host: int


# Peak bf16 FLOP/s and HBM per chip from Google's Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e, read 2026-12): v4 275 TFLOP/s and 32 GiB; v5e 197 TFLOP/s and
# 16 GB; v5p 459 TFLOP/s and 95 GiB; v6e (Trillium) 918 TFLOP/s and 32 GB. The memory figures are taken as GiB,
# the HBM sizes the chips carry; the compiler reserves a little of it, so `fits` with a margin under 1% is
# a question for real hardware.
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB, megacore=True, max_chips_per_host=4),
    "v5e": Chip("TPU v5 lite", 197e12, 16 * GIB, megacore=False, max_chips_per_host=8),
    "v5p": Chip("TPU v5", 459e12, 95 * GIB, megacore=True, max_chips_per_host=4),
    "v6e": Chip("TPU v6 lite", 918e12, 32 * GIB, megacore=False, max_chips_per_host=8),
}
TOPOLOGY_PATTERN = re.compile(r"(?P<kind>[a-z0-9]+):(?P<shape>\d+(x\d+){1,2})")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def check_libtpu() -> None:
    """The TPU compiler ships in libtpu; without it JAX cannot describe a slice."""
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise ImportError(f"compiling for a TPU slice needs libtpu, the TPU compiler: pip install "
                          f"'jax[tpu]=={jax.__version__}' (or pip install -e '.[tpu]' in this checkout)")


def _compile_only_libtpu() -> None:
    """Settings libtpu reads when it loads, for compiling only. Its lockfile (/tmp/libtpu_lockfile) admits one
    libtpu process per machine, which a compile does not need: without ALLOW_MULTIPLE_LIBTPU_LOAD a second
    compile, or a training run on a TPU VM, would stop this one. libtpu also looks for the TPU VM it runs on and
    logs errors when there is none; the other two values quiet that and decide nothing, as `describe_slice`
    names the slice in full."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice (or several, over the data-centre network) as compile-only devices."""

    name: str
    chip: Chip
    num_slices: int
    devices: list

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def hosts(self) -> int:
        return len({device.process_index for device in self.devices})

    def describe(self) -> str:
        return self.name if self.num_slices == 1 else f"{self.num_slices} x {self.name}"

    def host_devices(self, host: int = 0) -> list:
        return [device for device in self.devices if device.process_index == host]


def describe_slice(topology: str, num_slices: int = 1) -> Slice:
    """`v5e:4x4` (kind:chips per dimension, as Google's topology names) -> its devices, hosts and chip kind."""
    match = TOPOLOGY_PATTERN.fullmatch(topology)
    known = ", ".join(CHIPS)
    if match is None or match["kind"] not in CHIPS:
        raise ValueError(f"unknown TPU topology {topology!r}: name one as <chip>:<shape>, e.g. v5e:2x2, v5e:4x8, "
                         f"v4:2x2x2, v5p:2x2x1 or v6e:2x4, with <chip> one of the known chip kinds: {known}")
    if num_slices < 1:
        raise ValueError(f"--num_slices must be >= 1, got {num_slices}")
    check_libtpu()
    _compile_only_libtpu()
    chip = CHIPS[match["kind"]]
    shape = [int(s) for s in match["shape"].split("x")]
    chips_per_slice = math.prod(shape)
    options: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
    if chip.megacore:
        options["chip_config_name"] = "megacore"
    # A slice of up to max_chips_per_host chips is one host driving all of them; larger ones have 2x2 chips per host.
    single_host = chips_per_slice <= chip.max_chips_per_host
    options["chips_per_host_bounds"] = tuple(shape) + (1,) * (3 - len(shape)) if single_host else (2, 2, 1)
    from jax.experimental import topologies
    try:
        description = topologies.get_topology_desc(topology_name=topology, platform="tpu", **options)
    except jax.errors.JaxRuntimeError as error:
        if "INVALID_ARGUMENT" not in str(error):
            raise
        raise ValueError(f"libtpu does not know the TPU topology {topology!r}: {str(error).splitlines()[0]}") \
            from None
    return Slice(topology, chip, num_slices, list(description.devices))


@dataclasses.dataclass(frozen=True)
class Program:
    """One program of a run: the jitted function and its arguments (shapes carrying shardings) on its mesh, its
    global batch and its model FLOPs per execution."""

    name: str
    jitted: Any
    args: tuple
    mesh: jax.sharding.Mesh
    rules: Any
    global_batch: int
    model_flops: float

    @property
    def chips(self) -> int:
        return self.mesh.size

    @property
    def per_chip_batch(self) -> float:
        batch_axes = [axis for axis in ("batch", "data", "fsdp") if axis in self.mesh.shape]
        return self.global_batch / math.prod(self.mesh.shape[axis] for axis in batch_axes)


# --- what the compiler says ------------------------------------------------------------------------------------

def memory_per_chip(compiled, chip: Chip) -> dict[str, int]:
    """HBM per chip: arguments, temporaries, outputs (less those aliased to donated arguments), the program."""
    memory = compiled.memory_analysis()
    sizes = {"arguments": memory.argument_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
             "outputs": memory.output_size_in_bytes, "aliased": memory.alias_size_in_bytes,
             "generated_code": memory.generated_code_size_in_bytes}
    sizes["total"] = (sizes["arguments"] + sizes["temporaries"] + sizes["outputs"] - sizes["aliased"]
                      + sizes["generated_code"])
    sizes["capacity"] = chip.hbm_bytes
    return sizes


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each cross-chip collective the compiled program runs (async pairs counted once)."""
    counts = {}
    for kind in COLLECTIVES:
        found = len(re.findall(rf"\s{kind}(?:-start)?\(", hlo_text))
        if found:
            counts[kind] = found
    return counts


def attention_kernel(hlo_text: str) -> str:
    """What the compiled program runs for attention: the Pallas splash kernel (a Mosaic custom call) or XLA's
    softmax(QK^T)V."""
    return "splash (Pallas TPU flash attention)" if "splash" in hlo_text else "xla (softmax(QK^T)V)"


def _compiler_bytes(text: str) -> int:
    """'256.94G' (the TPU compiler's sizes, in powers of 1024) -> bytes."""
    return int(float(text[:-1]) * 1024 ** ("KMGT".index(text[-1]) + 1))


def out_of_memory(message: str, chip: Chip) -> dict[str, Any]:
    """What the TPU compiler's RESOURCE_EXHAUSTED error says: it stops before it has a memory analysis, so the
    sizes are those the message names, when it names the HBM (the on-chip scoped memory of one operation can
    run out too)."""
    required = re.search(r"required for HLO temporaries \((\d+(?:\.\d+)?[KMGT])\)", message)
    available = re.search(r"available HBM \((\d+(?:\.\d+)?[KMGT])\)", message)
    used = re.search(r"Used (\d+(?:\.\d+)?[KMGT]) of (\d+(?:\.\d+)?[KMGT]) hbm", message)
    memory: dict[str, Any] = {"arguments": None, "temporaries": None, "outputs": None, "aliased": None,
                              "generated_code": None, "total": None, "capacity": chip.hbm_bytes}
    if required:
        memory["temporaries"] = memory["total"] = _compiler_bytes(required[1])
    if used:
        memory["total"] = _compiler_bytes(used[1])
    if available or used:
        memory["capacity"] = _compiler_bytes((available or used)[1 if available else 2])
    return {"fits": False, "hbm_per_chip_bytes": memory, "xla_flops_per_chip": None, "collectives": None,
            "attention": None, "compiler_error": " ".join(message.strip().splitlines()[:2])[:400]}


def compile_program(program: Program, chip: Chip, hlo_dir: str | None = None) -> dict[str, Any]:
    """Lowers and compiles the program for its mesh's devices; the compiler's figures per chip. With `hlo_dir`,
    the optimised HLO goes to `<hlo_dir>/<name>.hlo.txt` (benchmarks/tpu_memory.py reads where the memory goes)."""
    start = time.perf_counter()
    with sharding.activate(program.mesh, program.rules):
        lowered = program.jitted.lower(*program.args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {**out_of_memory(str(error), chip), "compile_seconds": round(time.perf_counter() - start, 1)}
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    if hlo_dir:
        from etils import epath
        (epath.Path(hlo_dir) / f"{program.name}.hlo.txt").write_text(hlo)
    memory = memory_per_chip(compiled, chip)
    return {"fits": memory["total"] <= memory["capacity"], "hbm_per_chip_bytes": memory,
            "xla_flops_per_chip": float(cost.get("flops", 0.0)), "collectives": collective_counts(hlo),
            "attention": attention_kernel(hlo), "compile_seconds": round(seconds, 1)}


# --- the programs of each kind of config -----------------------------------------------------------------------

def config_kind(config: ml_collections.ConfigDict) -> str:
    if "solver" in config:
        raise ValueError("a linear-probe config has no device program to size: the probe fits a linear head on "
                         "precomputed features on one device. Size the feature extraction instead, with the "
                         "backbone's pretraining config (configs/pretrain/marlin_vit_base.py)")
    if "mask_strategy" in config:
        return "pretraining"
    if "select_metric" in config and "eval_batch_size" in config:
        return "finetuning"
    raise ValueError("the config is neither a pretraining (configs/pretrain/*.py) nor a fine-tuning "
                     "(configs/finetune/*.py) config")


def _config_mesh(config, tpu_slice: Slice) -> jax.sharding.Mesh:
    try:
        return sharding.make_mesh(config.mesh.shape, config.mesh.axes, tpu_slice.devices)
    except ValueError as error:
        raise ValueError(f"{tpu_slice.describe()} has {tpu_slice.chips} chips; {error}") from None


def _sharded(shapes: dict[str, jax.ShapeDtypeStruct], target) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=target) for name, s in shapes.items()}


def _key(mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(jax.random.key, 0)
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How many times the train step runs, and where the count comes from."""

    train_clips: int | None
    source: str
    steps_per_epoch: int | None
    total_steps: int | None


def extraction_program(arch: MarlinArchitecture, tpu_slice: Slice, batch_size: int | None) -> Program:
    """The float32 encoder forward that `python -m marlin_jax.extract` runs on each host over that host's chips
    (hosts extract independently), at its default batch of 8 clips per chip unless `batch_size` is given."""
    import flax.linen as nn

    from marlin_jax.video_features import EXTRACTION_AXIS_RULES, default_batch_size, extraction_mesh, extraction_shardings
    from marlin_jax.model import encode_clips, init_params
    devices = tpu_slice.host_devices()
    mesh = extraction_mesh(devices)
    batch = -(-(batch_size or default_batch_size(devices)) // len(devices)) * len(devices)
    params_sharding, clip_sharding = extraction_shardings(mesh)
    encoder = nn.meta.unbox(jax.eval_shape(lambda key: init_params(key, arch)[0]["encoder"],
                                           jax.eval_shape(jax.random.key, 0)))
    encoder = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=params_sharding),
                                     encoder)
    clips = jax.ShapeDtypeStruct((batch, arch.num_frames, arch.img_size, arch.img_size, 3), np.uint8,
                                 sharding=clip_sharding)

    return Program("extract_features", encode_clips, (encoder, clips, arch, False), mesh, EXTRACTION_AXIS_RULES,
                   batch, batch * model_flops.extraction_flops(arch))


def pretraining_programs(config, tpu_slice: Slice, train_clips: int | None,
                         extract_batch_size: int | None) -> tuple[list[Program], Schedule]:
    """The train step on the config's mesh over the whole slice, then the extraction forward."""
    from marlin_jax.data.pipeline import batch_shapes
    from marlin_jax.pretraining.trainer import pretraining_program, schedule_lengths
    arch = MarlinArchitecture.from_dict(config.model.to_dict())
    mesh = _config_mesh(config, tpu_slice)
    sharding.check_model_fits(arch, mesh)
    sharding.check_batch_fits(config.batch_size, mesh)
    if train_clips is None and config.data.path:
        steps_per_epoch, total_steps = schedule_lengths(config)
        schedule = Schedule(None, f"the manifest of {config.data.path}", steps_per_epoch, total_steps)
    else:
        source = "--train_clips" if train_clips else "the YouTube Faces train split (--train_clips to change)"
        train_clips = train_clips or YOUTUBE_FACES_TRAIN_CLIPS
        steps_per_epoch = config.steps_per_epoch or -(-train_clips // config.batch_size)
        schedule = Schedule(train_clips, source, steps_per_epoch,
                            config.total_steps or config.num_epochs * steps_per_epoch)
    program = pretraining_program(config, arch, mesh, schedule.steps_per_epoch, schedule.total_steps)
    state = sharding.abstract_state(program.init_state, program.state_shardings, mesh, config.logical_axis_rules)
    batch = _sharded(batch_shapes(config.batch_size, num_frames=arch.num_frames, img_size=arch.img_size,
                                  patch_size=arch.patch_size, tubelet_size=arch.tubelet_size),
                     program.batch_sharding)
    args = (state, batch, _key(mesh))
    flops = config.batch_size * model_flops.pretraining_flops(arch, program.settings.num_visible)["jax_step"]

    train = Program("train_step", program.train_step, args, mesh, config.logical_axis_rules, config.batch_size, flops)
    return [train, extraction_program(arch, tpu_slice, extract_batch_size)], schedule


def finetuning_programs(config, tpu_slice: Slice, train_clips: int | None,
                        num_outputs: int | None) -> tuple[list[Program], Schedule]:
    """The fine-tuning train step and the evaluation forward, both on the config's mesh over the whole slice."""
    from marlin_jax.downstream.clip_loader import clip_shapes, train_batch_shapes
    from marlin_jax.downstream.classifier_trainer import finetuning_program
    from marlin_jax.downstream.tasks import TASKS, head_width
    from marlin_jax.video import ClipSettings
    if config.task not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS}, got {config.task!r}")
    sharding.compute_dtype(config.compute_dtype)  # an unknown dtype is named before anything is built
    num_outputs = num_outputs or head_width(config.data, config.task)
    if num_outputs is None:
        raise ValueError("the head's width comes from the labels here (config.data.num_classes is 0 or the task is "
                         "a CSV multilabel one): pass --num_outputs")
    arch = MarlinArchitecture.from_dict(config.model.to_dict())
    mesh = _config_mesh(config, tpu_slice)
    sharding.check_model_fits(arch, mesh)
    for field in ("batch_size", "eval_batch_size"):
        sharding.check_batch_fits(config[field], mesh, field)
    # The plateau rule is judged once per epoch: the epoch's length is a constant in the step, not a shape.
    steps_per_epoch = train_clips // config.batch_size if train_clips else None
    if train_clips is not None and not steps_per_epoch:
        raise ValueError(f"--train_clips={train_clips} is fewer than one batch ({config.batch_size})")
    total_steps = config.total_steps or (config.num_epochs * steps_per_epoch if steps_per_epoch else None)
    schedule = Schedule(train_clips, "--train_clips" if train_clips else "unknown (pass --train_clips)",
                        steps_per_epoch, total_steps)
    program = finetuning_program(config, arch, config.task, num_outputs, mesh, steps_per_epoch or 1)
    state = sharding.abstract_state(program.init_state, program.state_shardings, mesh, config.logical_axis_rules)
    clip_settings = ClipSettings(arch.num_frames, config.data.temporal_sample_rate, arch.img_size)
    batch = _sharded(train_batch_shapes(config.batch_size, clip_settings, config.task, num_outputs),
                     program.batch_sharding)
    eval_clips = _sharded({"video": clip_shapes(config.eval_batch_size, clip_settings)},
                          program.batch_sharding)["video"]
    rules = config.logical_axis_rules
    train_flops = config.batch_size * model_flops.finetuning_flops(arch, num_outputs)
    eval_flops = config.eval_batch_size * model_flops.extraction_flops(arch)
    return [Program("train_step", program.train_step, (state, batch), mesh, rules, config.batch_size, train_flops),
            Program("predict", program.predict, (state.params, eval_clips), mesh, rules, config.eval_batch_size,
                    eval_flops)], schedule


# --- the report ------------------------------------------------------------------------------------------------

def _program_report(program: Program, chip: Chip, hlo_dir: str | None) -> dict[str, Any]:
    report = {"global_batch": program.global_batch, "per_chip_batch": program.per_chip_batch,
              "chips": program.chips, "mesh": dict(program.mesh.shape), "model_flops": program.model_flops,
              **compile_program(program, chip, hlo_dir)}
    per_chip = report.pop("xla_flops_per_chip")
    report["xla_flops"] = None if per_chip is None else per_chip * program.chips
    return report


def compile_config(config: ml_collections.ConfigDict, topology: str, *, num_slices: int = 1,
                   programs: tuple[str, ...] | None = None, train_clips: int | None = None,
                   num_outputs: int | None = None, extract_batch_size: int | None = None,
                   hlo_dir: str | None = None) -> dict[str, Any]:
    """Compiles the config's programs (all of them, or those named) for the slice; returns the report that
    `python -m marlin_jax.aot` prints and writes. Its top-level figures are the train step's; `programs` has
    every compiled program's."""
    kind = config_kind(config)
    tpu_slice = describe_slice(topology, num_slices)
    if kind == "pretraining":
        candidates, schedule = pretraining_programs(config, tpu_slice, train_clips, extract_batch_size)
    else:
        candidates, schedule = finetuning_programs(config, tpu_slice, train_clips, num_outputs)
    known = [program.name for program in candidates]
    unknown = sorted(set(programs or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown program(s) {', '.join(unknown)}; a {kind} config has {', '.join(known)}")
    chosen = [program for program in candidates if not programs or program.name in programs]
    compiled = {program.name: _program_report(program, tpu_slice.chip, hlo_dir) for program in chosen}
    main = compiled.get("train_step") or next(iter(compiled.values()))
    train = next((p for p in chosen if p.name == "train_step"), None)
    hours = None
    if train is not None and schedule.total_steps:
        hours = schedule.total_steps * train.model_flops / (train.chips * tpu_slice.chip.peak_bf16_flops
                                                           * REFERENCE_MFU) / 3600
    return {
        "fits": all(entry["fits"] for entry in compiled.values()),
        "config_kind": kind, "model": config.model_name, "topology": topology, "num_slices": num_slices,
        "chip": tpu_slice.chip.device_kind, "chips": tpu_slice.chips, "hosts": tpu_slice.hosts,
        "mesh": main["mesh"], "global_batch": main["global_batch"], "per_chip_batch": main["per_chip_batch"],
        "compute_dtype": config.compute_dtype, "remat": bool(config.remat),
        "hbm_per_chip_bytes": main["hbm_per_chip_bytes"],
        "xla_flops_per_step": main["xla_flops"], "model_flops_per_step": main["model_flops"],
        "collectives": main["collectives"], "attention": main["attention"],
        "compile_seconds": round(sum(entry["compile_seconds"] for entry in compiled.values()), 1),
        "hours_at_50pct_mfu": hours,
        "schedule": dataclasses.asdict(schedule) | {"epochs": config.num_epochs},
        "peak_bf16_flops_per_chip": tpu_slice.chip.peak_bf16_flops,
        "programs": compiled,
    }


def _gib(size: float | None) -> str:
    return "?" if size is None else f"{size / GIB:.2f} GiB"


def _program_line(name: str, program: dict[str, Any]) -> str:
    memory = program["hbm_per_chip_bytes"]
    head = (f"  {name}: mesh {program['mesh']}, batch {program['global_batch']} ({program['per_chip_batch']:g} per "
            f"chip); per chip {_gib(memory['total'])} of {_gib(memory['capacity'])}")
    if "compiler_error" in program:
        return f"{head} -> DOES NOT FIT, the compiler stopped: {program['compiler_error']}"
    collectives = ", ".join(f"{count} {kind}" for kind, count in program["collectives"].items()) or "none"
    return (f"{head} (arguments {_gib(memory['arguments'])}, temporaries {_gib(memory['temporaries'])}, outputs "
            f"{_gib(memory['outputs'])}, aliased {_gib(memory['aliased'])}) -> "
            f"{'fits' if program['fits'] else 'DOES NOT FIT'}; {program['xla_flops'] / 1e12:.3g} TFLOP by XLA, "
            f"{program['model_flops'] / 1e12:.3g} model TFLOP; collectives: {collectives}; attention: "
            f"{program['attention']}; compiled in {program['compile_seconds']:g} s")


def summary(report: dict[str, Any]) -> str:
    """A few lines for the console: the slice, then each program's mesh, HBM per chip, FLOPs and compile time."""
    slices = f" x {report['num_slices']} slices" if report["num_slices"] > 1 else ""
    lines = [f"{report['model']} ({report['config_kind']}) on {report['topology']}{slices}: {report['chips']} x "
             f"{report['chip']}, {report['hosts']} host(s)"]
    lines += [_program_line(name, program) for name, program in report["programs"].items()]
    schedule = report["schedule"]
    if report["hours_at_50pct_mfu"] is not None:
        if schedule["steps_per_epoch"] and schedule["total_steps"] == schedule["epochs"] * schedule["steps_per_epoch"]:
            length = f"{schedule['epochs']} epochs of {schedule['steps_per_epoch']} steps"
        else:  # the config sets total_steps itself
            length = f"the config's total_steps; an epoch is {schedule['steps_per_epoch']} steps"
        lines.append(f"  schedule: {schedule['total_steps']} steps ({length}, clips from {schedule['source']}): "
                     f"{report['hours_at_50pct_mfu']:.1f} h at 50% MFU")
    return "\n".join(lines)


def shortfall(report: dict[str, Any]) -> str | None:
    """One message naming each program that does not fit, by how many GiB, and the levers that would make it fit;
    None when everything fits."""
    short = {name: program for name, program in report["programs"].items() if not program["fits"]}
    if not short:
        return None
    parts = []
    for name, program in short.items():
        memory = program["hbm_per_chip_bytes"]
        if memory["total"] is None:
            parts.append(f"{name} does not compile: {program['compiler_error']}")
            continue
        parts.append(f"{name} needs {_gib(memory['total'])} of HBM per chip, a {report['chip']} has "
                     f"{_gib(memory['capacity'])}: {_gib(memory['total'] - memory['capacity'])} short")
    levers = []
    if any(name != "extract_features" for name in short):
        mesh = report["mesh"]
        levers.append(f"a smaller per-chip batch (now {report['per_chip_batch']:g}: lower --config.batch_size or "
                      f"take a slice with more chips)")
        if report["config_kind"] == "pretraining":
            levers.append("gradient accumulation at the same global batch (--config.grad_accum_steps=2, 4, ...)")
        if mesh.get("fsdp", 1) == 1 and mesh.get("data", 1) > 1:
            levers.append(f"an fsdp axis that shards parameters and optimiser state "
                          f"(--config.mesh.shape='({mesh['data'] // 2},2,{mesh.get('tensor', 1)})')")
        if not report["remat"]:
            levers.append("rematerialisation (--config.remat=True)")
    if "extract_features" in short:
        levers.append("fewer clips per extraction batch (--extract_batch_size here; --batch_size of "
                      "python -m marlin_jax.extract)")
    return f"does not fit {report['topology']}: {'; '.join(parts)}. Levers: {'; '.join(levers)}"
