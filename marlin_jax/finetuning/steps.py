"""The fine-tuning state, the pure `train_step(state, batch) -> (state, metrics)` and the jitted predictor.

The optimiser is the linear probe's (Adam, then a plateau scale fed each step's loss and judged once per
epoch on their mean), applied to every parameter: the encoder's fixed sin-cos table gets zero gradients
(stop_gradient) and, without weight decay, zero Adam updates. Fine-tuning draws nothing at random on device
(the official model has no dropout or augmentation; clips are sampled by the loader), so the step takes no key.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from marlin_jax.evaluation.probe_training import probe_loss
from marlin_jax.finetuning.classifier import VideoClassifier

Params = Any


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array
    params: Params  # {"encoder": MarlinEncoder params, "head": LinearProbe params}
    opt_state: optax.OptState


def init_state(key: jax.Array, model: VideoClassifier, tx: optax.GradientTransformation) -> FinetuneState:
    """Initial state whose parameters keep their logical-axis boxes (unbox after deriving shardings)."""
    arch = model.arch
    clip = jnp.zeros((1, arch.num_frames, arch.img_size, arch.img_size, 3), jnp.float32)
    params = model.init(key, clip)["params"]
    return FinetuneState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def learning_rate(opt_state: optax.OptState, base_learning_rate: float) -> jax.Array:
    """The base rate times the plateau scale (the chain's second state), which scaled the last update."""
    return base_learning_rate * opt_state[1].scale


def to_unit_range(video: jax.Array) -> jax.Array:
    return video.astype(jnp.float32) / 255.0


def make_train_step(model: VideoClassifier, tx: optax.GradientTransformationExtraArgs, task: str,
                    base_learning_rate: float):
    """Returns the pure `train_step(state, batch)`; batch {"video": uint8 (B,T,H,W,3), "label": int}."""

    def loss_fn(params, batch):
        return probe_loss(task, model.apply({"params": params}, to_unit_range(batch["video"])), batch["label"])

    def train_step(state: FinetuneState, batch: dict[str, jax.Array]):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "lr": learning_rate(opt_state, base_learning_rate),
                   "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
                   "param_norm": optax.tree.norm(params)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_predict(model: VideoClassifier):
    """`predict(params, video uint8) -> logits (B, outputs)`; jit it with shardings outside."""
    return lambda params, video: model.apply({"params": params}, to_unit_range(video))
