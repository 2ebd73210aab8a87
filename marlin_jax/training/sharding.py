"""One device mesh from the config, logical-axis rules, and the shardings of state and batches.

The model names axes logically ("embed", "mlp", "heads", "batch", ...); `config.logical_axis_rules` maps
those names onto the mesh axes `config.mesh.axes` ("data", "fsdp", "tensor"). Parameters are born sharded:
`jax.eval_shape(init)` gives the logical specs, they become NamedShardings, and `jit(init, out_shardings=...)`
allocates every shard where it lives.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")
# config.compute_dtype: the dtype activations and matmuls run in (parameters stay float32).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_mesh(shape, axes, devices) -> Mesh:
    """A mesh over `devices` (the trainer passes `jax.devices()`; `python -m marlin_jax.aot` a TPU slice's
    compile-only devices, so both lay out the same mesh); one -1 in `shape` takes the remaining devices."""
    shape, axes, devices = tuple(int(s) for s in shape), tuple(axes), list(devices)
    if len(shape) != len(axes):
        raise ValueError(f"mesh.shape {shape} and mesh.axes {axes} differ in length")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape {shape} may hold at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"mesh.shape {shape} does not divide the {len(devices)} devices")
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"config.mesh.shape {shape} needs {int(np.prod(shape))} devices, but there are "
                         f"{len(devices)}; use -1 on one axis to take the remaining devices")
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    if slices > 1:
        # Slices joined over the data-centre network (multislice): only the data axis spans them, so that only
        # gradient all-reduces leave a slice's chip-to-chip links.
        if "data" not in axes or shape[axes.index("data")] % slices:
            raise ValueError(f"the devices span {slices} TPU slices: the mesh's data axis (mesh.shape {shape}) must "
                             f"be a multiple of {slices}")
        across = tuple(slices if axis == "data" else 1 for axis in axes)
        device_grid = mesh_utils.create_hybrid_device_mesh(tuple(s // a for s, a in zip(shape, across)), across,
                                                           devices)
    else:
        device_grid = mesh_utils.create_device_mesh(shape, devices)
    # Auto axes: flax's logical constraints are hints for the partitioner, not asserts (see NOTES.md).
    return Mesh(device_grid, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """The mesh and logical rules that tracing the model needs for its activation constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(tuple(r) for r in rules)):
        yield


def state_shardings(init_fn: Callable[[jax.Array], Any], mesh: Mesh, rules) -> Any:
    """NamedShardings for every leaf of the state `init_fn(key)` returns (its params in logical-axis boxes),
    from its shapes alone: nothing runs."""
    abstract = jax.eval_shape(init_fn, jax.eval_shape(jax.random.key, 0))
    specs = nn.get_partition_spec(abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, tuple(tuple(r) for r in rules))


def _unboxed_init(init_fn: Callable[[jax.Array], Any], shardings: Any):
    return jax.jit(lambda k: nn.meta.unbox(init_fn(k)), out_shardings=shardings)


def init_sharded(init_fn: Callable[[jax.Array], Any], key: jax.Array, shardings: Any, mesh: Mesh, rules) -> Any:
    """Runs `init_fn` (returning a boxed state) so that every array is created already sharded; returns the
    unboxed state."""
    with activate(mesh, rules):
        return _unboxed_init(init_fn, shardings)(key)


def abstract_state(init_fn: Callable[[jax.Array], Any], shardings: Any, mesh: Mesh, rules) -> Any:
    """What `init_sharded` would create, as ShapeDtypeStructs carrying their NamedShardings, without running
    anything: the arguments for lowering a step on devices this process cannot run on (a TPU slice described
    on a CPU host)."""
    key = jax.eval_shape(jax.random.key, 0)
    with activate(mesh, rules):
        return jax.eval_shape(_unboxed_init(init_fn, shardings), key)


def check_model_fits(arch, mesh: Mesh) -> None:
    """Every width the mesh splits must divide by its axis (checked before anything compiles)."""
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    split_by_tensor = {"encoder heads": arch.encoder_num_heads, "decoder heads": arch.decoder_num_heads,
                       "encoder MLP width": arch.mlp_dim, "decoder MLP width": arch.decoder_mlp_dim}
    for what, width in split_by_tensor.items():
        if width % tensor:
            raise ValueError(f"the mesh's tensor axis ({tensor}) does not divide the {what} ({width}); choose a "
                             f"config.mesh.shape whose tensor size divides {sorted(set(split_by_tensor.values()))}")
    if arch.encoder_embed_dim % fsdp:
        raise ValueError(f"the mesh's fsdp axis ({fsdp}) does not divide the encoder width "
                         f"({arch.encoder_embed_dim}); choose a config.mesh.shape whose fsdp size divides it")


def process_count(mesh: Mesh) -> int:
    """The processes (hosts) whose devices the mesh spans."""
    return len({device.process_index for device in mesh.devices.flat})


def check_batch_fits(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
    """A global batch must split evenly over the data x fsdp devices and over the processes."""
    shards, processes = mesh.shape["data"] * mesh.shape["fsdp"], process_count(mesh)
    if batch_size % shards or batch_size % processes:
        raise ValueError(f"config.{field}={batch_size} does not split over the mesh's data x fsdp axes "
                         f"({mesh.shape['data']} x {mesh.shape['fsdp']} = {shards} devices) and "
                         f"{processes} process(es); pass a multiple of {int(np.lcm(shards, processes))}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over the data and fsdp axes; everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's examples -> global arrays (each host loads global_batch / process_count examples)."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def compute_dtype(name: str):
    """config.compute_dtype's value as a dtype; an unknown name is named with the choices."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


def place_host_tree(host_tree, shardings):
    """Host numpy arrays -> global arrays in `shardings`: every host passes the same values and keeps only its own
    shards, so no host ever holds (or gathers) a sharded array whole."""
    return jax.tree_util.tree_map(
        lambda value, target: jax.make_array_from_callback(np.shape(value), target, lambda index: value[index]),
        host_tree, shardings)
