"""What every run shares around its steps: preemption agreed across hosts, the NaN/Inf guard, the startup
banner, the profiler window, and console messages."""

from __future__ import annotations

import math
import signal

import jax
from absl import logging
from etils import epath
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


class PreemptionWatch:
    """Tells the loop when to save and stop after a preemption notice (SIGTERM), at the same step on every host.

    Several processes: JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM in any
    process, tells the others, and agrees on a step past every host's current one; `reached(step)` is then True
    at that step on all hosts, so they save together and none is left waiting in a collective. One process: a
    SIGTERM handler raises a flag that the next `reached` call reports.
    """

    def __init__(self):
        from jax._src import distributed
        self._multihost = distributed.global_state.client is not None
        self._raised = False
        self._previous = None if self._multihost else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._raised = True

    def reached(self, step: int) -> bool:
        """Call once per step, with the same step on every host."""
        if self._multihost:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self._raised

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def print_banner(*, mesh: jax.sharding.Mesh, per_host_batch: int, steps_per_epoch: int, total_steps: int,
                 compute_dtype: str) -> str:
    """The one line every process prints at startup: where it runs and how the work is split."""
    devices = jax.local_devices()
    line = (f"process {jax.process_index()}/{jax.process_count()}: {jax.default_backend()} backend, "
            f"{len(devices)} local x {devices[0].device_kind} ({jax.device_count()} global), "
            f"mesh {dict(mesh.shape)}, per-host batch {per_host_batch}, {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps, compute {compute_dtype}")
    tqdm.write(line)
    return line


class ProfileWindow:
    """`profile_steps = (start, count)`: a jax.profiler trace of steps [start, start + count) in
    `<log_dir>/plugins/profile/`, which TensorBoard's profile plugin opens. Process 0 only."""

    def __init__(self, profile_steps: tuple[int, ...], log_dir: epath.Path):
        self._window = profile_steps if profile_steps and jax.process_index() == 0 else None
        self._log_dir = log_dir
        self._active = False

    def before_step(self, step: int) -> None:
        if self._window and step == self._window[0]:
            jax.profiler.start_trace(str(self._log_dir))
            self._active = True

    def after_step(self, step: int, outputs) -> None:
        if self._active and step + 1 >= self._window[0] + self._window[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
            announce(f"wrote a profile of steps {self._window[0]}..{sum(self._window) - 1} to {self._log_dir}")

