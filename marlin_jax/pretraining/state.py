"""The training state and the two AdamW optimisers (generator and discriminator), as the official trainer has."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.model import init_params

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    generator: Params
    discriminator: Params
    generator_opt_state: optax.OptState
    discriminator_opt_state: optax.OptState


def _is_frozen(path) -> bool:
    # The sin-cos tables are fixed (requires_grad=False in the official model); Adam must not move them.
    return any(getattr(entry, "key", None) == "pos_embedding" for entry in path)


def frozen_labels(params: Params) -> Params:
    return jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if _is_frozen(path) else "trained", params)


def make_optimizer(optimizer_config) -> optax.GradientTransformation:
    """AdamW at a unit learning rate: the step multiplies the updates by `schedule(step)` itself, so the rate
    follows the training iteration, as the official per-iteration schedulers do, also when d_steps or g_steps
    update an optimiser several times per iteration (optax's own schedule would advance per update). Adam's
    bias correction still counts updates, as torch's AdamW does."""
    if optimizer_config.type != "adamw":
        raise ValueError(f"optimizer.type must be 'adamw', got {optimizer_config.type!r}")
    adamw = optax.adamw(1.0, b1=optimizer_config.b1, b2=optimizer_config.b2, eps=optimizer_config.eps,
                        weight_decay=optimizer_config.weight_decay)
    return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, frozen_labels)


def init_train_state(key: jax.Array, arch: MarlinArchitecture, generator_tx: optax.GradientTransformation,
                     discriminator_tx: optax.GradientTransformation) -> TrainState:
    """Initial state whose parameters keep their logical-axis boxes (unbox after deriving shardings)."""
    generator, discriminator = init_params(key, arch)
    return TrainState(
        step=jnp.zeros((), jnp.int32), generator=generator, discriminator=discriminator,
        generator_opt_state=generator_tx.init(generator), discriminator_opt_state=discriminator_tx.init(discriminator))
