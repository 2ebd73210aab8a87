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
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def make_mesh(shape, axes) -> Mesh:
    """A mesh over all devices; one -1 in `shape` takes the remaining devices."""
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"mesh.shape {shape} and mesh.axes {axes} differ in length")
    devices = jax.devices()
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
    device_grid = mesh_utils.create_device_mesh(shape, devices)
    # Auto axes: flax's logical constraints are hints for the partitioner, not asserts (see NOTES.md).
    return Mesh(device_grid, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """The mesh and logical rules that tracing the model needs for its activation constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(tuple(r) for r in rules)):
        yield


def state_shardings(abstract_boxed_state: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for every leaf of an (abstract) state whose params carry logical-axis boxes."""
    specs = nn.get_partition_spec(abstract_boxed_state)
    return nn.logical_to_mesh_sharding(specs, mesh, tuple(tuple(r) for r in rules))


def init_sharded(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh, rules) -> tuple[Any, Any]:
    """Runs `init_fn` (returning a boxed state) so that every array is created already sharded.

    Returns the unboxed state and its shardings.
    """
    abstract = jax.eval_shape(init_fn, key)
    shardings = state_shardings(abstract, mesh, rules)
    with activate(mesh, rules):
        state = jax.jit(lambda k: nn.meta.unbox(init_fn(k)), out_shardings=shardings)(key)
    return state, shardings


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


def check_batch_fits(batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
    """A global batch must split evenly over the data x fsdp devices and over the processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards or batch_size % jax.process_count():
        raise ValueError(f"config.{field}={batch_size} does not split over the mesh's data x fsdp axes "
                         f"({mesh.shape['data']} x {mesh.shape['fsdp']} = {shards} devices) and "
                         f"{jax.process_count()} process(es); pass a multiple of "
                         f"{int(np.lcm(shards, jax.process_count()))}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over the data and fsdp axes; everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's examples -> global arrays (each host loads global_batch / process_count examples)."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
