"""Training one linear probe with the official optimisation recipe, in JAX/optax.

The official probe is a single `Linear(D, outputs)` on raw (unstandardised) features, trained with Adam
(betas 0.5, 0.9) on shuffled minibatches that drop the last partial batch, BCE-with-logits (binary and
multilabel, averaged over every label) or cross-entropy (multiclass). Its learning rate halves when the
epoch's mean training loss has not improved for 7 epochs (torch `ReduceLROnPlateau`), training stops once
the rate is at or below 1e-6, and the checkpoint with the best validation AUROC is the one tested.

Here an epoch is one jitted `lax.scan` over its minibatches, every random draw derives from the seed (the
initialisation, and a `fold_in(key, epoch)` shuffle), and validation runs after each epoch on the host.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from marlin_jax.evaluation.metrics import probe_metrics
from marlin_jax.evaluation.probe_data import ProbeSplit


def _torch_linear_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class LinearProbe(nn.Module):
    """A dense layer initialised as torch's `nn.Linear` (uniform in +-1/sqrt(D) for weights and bias)."""

    num_outputs: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        return nn.Dense(
            self.num_outputs,
            kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            bias_init=_torch_linear_bias_init(features.shape[-1]),
        )(features)


def probe_loss(task: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    if task == "multiclass":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = labels.reshape(logits.shape).astype(logits.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def make_optimizer(train_config: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
    """Adam followed by a plateau scale fed the minibatch losses, judged on their mean once per epoch.

    torch reduces after `patience` + 1 bad epochs where optax reduces after `patience`, hence the +1.
    """
    plateau = optax.contrib.reduce_on_plateau(
        factor=train_config.plateau_factor,
        patience=train_config.plateau_patience + 1,
        rtol=1e-4,  # torch's default relative threshold
        accumulation_size=steps_per_epoch,
        min_scale=train_config.min_learning_rate / train_config.learning_rate,
    )
    adam = optax.adam(train_config.learning_rate, b1=train_config.adam_b1, b2=train_config.adam_b2)
    return optax.chain(adam, plateau)


def make_train_epoch(model: LinearProbe, optimizer: optax.GradientTransformationExtraArgs, task: str,
                     steps: int, batch_size: int) -> Callable:
    """A jitted `(params, opt_state, features, labels, key) -> (params, opt_state, mean loss)`."""

    def loss_fn(params, features, labels):
        return probe_loss(task, model.apply({"params": params}, features), labels)

    def train_epoch(params, opt_state, features, labels, key):
        def train_step(carry, batch_indices):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, features[batch_indices], labels[batch_indices])
            updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
            return (optax.apply_updates(params, updates), opt_state), loss

        order = jax.random.permutation(key, features.shape[0])[: steps * batch_size]
        batches = order.reshape(steps, batch_size)
        (params, opt_state), losses = jax.lax.scan(train_step, (params, opt_state), batches)
        return params, opt_state, losses.mean()

    return jax.jit(train_epoch)


@dataclasses.dataclass
class ProbeFit:
    """The selected parameters and how training went (one history entry per epoch)."""

    params: dict
    best_epoch: int
    history: dict[str, list[float]]


def fit_probe(task: str, num_outputs: int, train: ProbeSplit, val: ProbeSplit,
              train_config: ml_collections.ConfigDict, seed: int) -> ProbeFit:
    """Trains on `train`, keeping the epoch whose `val` metric (`train_config.select_metric`) is highest."""
    # A train set smaller than one batch trains full-batch; the official drop_last would never step.
    batch_size = min(train_config.batch_size, len(train))
    steps = len(train) // batch_size
    model = LinearProbe(num_outputs)
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key, jnp.zeros((1, train.features.shape[1])))["params"]
    optimizer = make_optimizer(train_config, steps)
    opt_state = optimizer.init(params)
    train_epoch = make_train_epoch(model, optimizer, task, steps, batch_size)
    predict = jax.jit(lambda p, x: model.apply({"params": p}, x))
    features, labels = jnp.asarray(train.features), jnp.asarray(train.labels)
    val_features = jnp.asarray(val.features)
    history = {"train_loss": [], f"val_{train_config.select_metric}": [], "learning_rate": []}
    best_score, best_epoch, best_params = -math.inf, -1, params
    for epoch in range(train_config.max_epochs):
        learning_rate = train_config.learning_rate * float(opt_state[1].scale)
        if learning_rate <= train_config.stop_learning_rate:
            break
        epoch_key = jax.random.fold_in(shuffle_key, epoch)
        params, opt_state, loss = train_epoch(params, opt_state, features, labels, epoch_key)
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"Probe training loss is {float(loss)} at epoch {epoch}")
        val_metrics = probe_metrics(task, val.labels, np.asarray(predict(params, val_features)))
        score = val_metrics[train_config.select_metric]
        history["train_loss"].append(float(loss))
        history[f"val_{train_config.select_metric}"].append(score)
        history["learning_rate"].append(learning_rate)
        if score > best_score:  # strictly better, so ties keep the earlier epoch as the official checkpointing
            best_score, best_epoch, best_params = score, epoch, params
    if best_epoch < 0:
        logging.warning("Validation %s was never defined; keeping the last epoch's probe.",
                        train_config.select_metric)
        best_epoch, best_params = len(history["train_loss"]) - 1, params
    return ProbeFit(best_params, best_epoch, history)


def predict_logits(num_outputs: int, params: dict, features: np.ndarray) -> np.ndarray:
    return np.asarray(LinearProbe(num_outputs).apply({"params": params}, jnp.asarray(features)))
