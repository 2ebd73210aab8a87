"""What every training loop here shares: preemption handling, the NaN/Inf guard, and console messages."""

from __future__ import annotations

import math
import signal

import jax
from absl import logging
from tqdm import tqdm


class NonFiniteLossError(FloatingPointError):
    """A loss, norm or learning rate became NaN or Inf; nothing was saved after it."""


def announce(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)


def check_finite(metrics: dict[str, float], step: int) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(f"non-finite values at step {step}: {bad}; stopping without saving. The last "
                                 "good checkpoint is kept; lower the learning rate or check the data.")


class PreemptionFlag:
    """SIGTERM (a TPU preemption notice) asks the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.raised = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)
