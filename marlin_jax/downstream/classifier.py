"""The fine-tuned model, its state and its pure step: the MARLIN encoder and a linear head on its clip feature
(the official Classifier).

The feature is `extract_features(video, keep_seq=False)`: all tokens encoded, mean-pooled, then the final
LayerNorm, as the official fine-tuning calls it (`seq_mean_pool=True`). The head is kept in float32 whatever
the encoder computes in. The optimiser is the linear probe's (Adam, then a plateau scale fed each step's loss
and judged once per epoch on their mean), applied to every parameter: the encoder's fixed sin-cos table gets
zero gradients (stop_gradient) and, without weight decay, zero Adam updates. Fine-tuning draws nothing at random
on device (the official model has no dropout or augmentation; clips are sampled by the loader), so the step
takes no key.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.downstream.head import LinearHead, head_loss
from marlin_jax.downstream.probe import plateau_scale
from marlin_jax.model import MarlinEncoder

Params = Any


class VideoClassifier(nn.Module):
    """(B, T, H, W, 3) uint8 clips (or floats in [0, 1]) -> (B, num_outputs) float32 logits.
    Params: {"encoder", "head"}."""

    arch: MarlinArchitecture
    num_outputs: int
    remat: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = MarlinEncoder(self.arch, self.remat, self.dtype)
        self.head = LinearHead(self.num_outputs)

    def __call__(self, video: jax.Array) -> jax.Array:
        features = self.encoder.extract_features(video, keep_seq=False)
        return self.head(features.astype(jnp.float32))


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array
    params: Params  # {"encoder": MarlinEncoder params, "head": LinearHead params}
    opt_state: optax.OptState


def init_state(key: jax.Array, model: VideoClassifier, tx: optax.GradientTransformation) -> FinetuneState:
    """Initial state whose parameters keep their logical-axis boxes (unbox after deriving shardings)."""
    arch = model.arch
    clip = jnp.zeros((1, arch.num_frames, arch.img_size, arch.img_size, 3), jnp.float32)
    params = model.init(key, clip)["params"]
    return FinetuneState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def learning_rate(opt_state: optax.OptState, base_learning_rate: float) -> jax.Array:
    """The base rate times the plateau scale, which scaled the last update."""
    return base_learning_rate * plateau_scale(opt_state)


def make_train_step(model: VideoClassifier, tx: optax.GradientTransformationExtraArgs, task: str,
                    base_learning_rate: float):
    """Returns the pure `train_step(state, batch)`; batch {"video": uint8 (B,T,H,W,3), "label": int}."""

    def loss_fn(params, batch):
        return head_loss(task, model.apply({"params": params}, batch["video"]), batch["label"])

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
    return lambda params, video: model.apply({"params": params}, video)
