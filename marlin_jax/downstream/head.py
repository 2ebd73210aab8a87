"""The linear head every downstream task puts on MARLIN features, and its loss (the official Classifier's)."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def _torch_linear_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class LinearHead(nn.Module):
    """A dense layer initialised as torch's `nn.Linear` (uniform in +-1/sqrt(D) for weights and bias)."""

    num_outputs: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        return nn.Dense(
            self.num_outputs,
            kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            bias_init=_torch_linear_bias_init(features.shape[-1]),
        )(features)


def head_loss(task: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """BCE-with-logits averaged over every label (binary, multilabel) or cross-entropy (multiclass)."""
    if task == "multiclass":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = labels.reshape(logits.shape).astype(logits.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()
