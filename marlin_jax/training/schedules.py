"""The official MARLIN learning-rate schedule: linear warmup from 0, then cosine down to the minimum.

The official code builds the whole per-iteration curve with numpy (`np.linspace(0, lr, warmup_iters)` then
`min + (lr - min)/2 * (1 + cos(pi * i / n))`) and ignores its `warmup` learning rate. It then applies it per
EPOCH through Lightning's LambdaLR, stepped at the first batch of each epoch — so epoch e >= 1 runs its first
batch at the previous epoch's value. Both forms are here: "step" (the curve itself, our default) and "epoch"
(the official stepping, reproduced exactly).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def warmup_cosine(peak: float, minimum: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """The official per-iteration curve, evaluated at any step (clamped after total_steps)."""
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    cosine_steps = total_steps - warmup_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * step / max(warmup_steps - 1, 1)  # np.linspace includes its endpoint
        progress = jnp.clip(step - warmup_steps, 0, cosine_steps) / cosine_steps
        cosine = minimum + 0.5 * (peak - minimum) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


def per_epoch(curve: optax.Schedule, steps_per_epoch: int) -> optax.Schedule:
    """The official LambdaLR stepping of `curve`: epoch e uses curve(e * steps_per_epoch), except that its first
    batch still uses epoch e - 1's value (the scheduler is stepped after that batch's update)."""

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        epoch, batch = step // steps_per_epoch, step % steps_per_epoch
        index = jnp.where(batch == 0, jnp.maximum(epoch - 1, 0), epoch)
        return curve(index * steps_per_epoch)

    return schedule


def learning_rate_schedule(lr_config, global_batch_size: int, steps_per_epoch: int, total_steps: int
                           ) -> optax.Schedule:
    """From the config's `learning_rate` block: rates scaled by global batch / 256 (official train.py)."""
    scale = global_batch_size / 256
    warmup_steps = lr_config.warmup_epochs * steps_per_epoch
    curve = warmup_cosine(lr_config.base * scale, lr_config.min * scale, warmup_steps, total_steps)
    if lr_config.schedule_unit == "step":
        return curve
    if lr_config.schedule_unit == "epoch":
        return per_epoch(curve, steps_per_epoch)
    raise ValueError(f"learning_rate.schedule_unit must be 'step' or 'epoch', got {lr_config.schedule_unit!r}")
