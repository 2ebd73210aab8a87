"""The fine-tuned model: the MARLIN encoder and a linear head on its clip feature (official Classifier).

The feature is `extract_features(video, keep_seq=False)`: all tokens encoded, mean-pooled, then the final
LayerNorm, as the official fine-tuning calls it (`seq_mean_pool=True`). The head is the linear probe's layer
(torch `nn.Linear` initialisation), kept in float32 whatever the encoder computes in.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.evaluation.probe_training import LinearProbe
from marlin_jax.model import MarlinEncoder


class VideoClassifier(nn.Module):
    """(B, T, H, W, 3) floats in [0, 1] -> (B, num_outputs) float32 logits. Params: {"encoder", "head"}."""

    arch: MarlinArchitecture
    num_outputs: int
    remat: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = MarlinEncoder(self.arch, self.remat, self.dtype)
        self.head = LinearProbe(self.num_outputs)

    def __call__(self, video: jax.Array) -> jax.Array:
        features = self.encoder.extract_features(video, keep_seq=False)
        return self.head(features.astype(jnp.float32))
