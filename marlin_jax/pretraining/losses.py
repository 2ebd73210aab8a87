"""MARLIN's objective: masked-patch MSE plus a WGAN-style adversarial term on patch vectors.

Pixels are in [0, 1] with no per-patch normalisation, as the official code trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reconstruction_loss(predicted: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every masked patch value (torch MSELoss, reduction mean)."""
    return jnp.mean(jnp.square(predicted.astype(jnp.float32) - target.astype(jnp.float32)))


def discriminator_loss(fake_scores: jax.Array, real_scores: jax.Array) -> jax.Array:
    """mean D(fake) - mean D(real): the critic learns to score real patches higher."""
    return jnp.mean(fake_scores.astype(jnp.float32)) - jnp.mean(real_scores.astype(jnp.float32))


def generator_adversarial_loss(fake_scores: jax.Array) -> jax.Array:
    """-mean D(pred); the trainer multiplies it by adv_weight."""
    return -jnp.mean(fake_scores.astype(jnp.float32))


def gradient_penalty(critic, key: jax.Array, real: jax.Array, fake: jax.Array) -> jax.Array:
    """WGAN-GP on a random interpolation; one alpha for the whole batch, as the official code draws it."""
    alpha = jax.random.uniform(key, ())
    interpolated = alpha * real + (1 - alpha) * fake
    grads = jax.grad(lambda x: jnp.sum(critic(x)))(interpolated)
    norms = jnp.sqrt(jnp.sum(jnp.square(grads.reshape(-1, grads.shape[-1])), axis=-1))
    return jnp.mean(jnp.square(norms - 1))
