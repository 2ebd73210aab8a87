"""Fine-tuning checkpoints in the pretraining layout (marlin_jax/checkpoints.py).

`<workdir>/checkpoints/<step>/` holds
  - "params":   {"generator": {"encoder": ...}, "head": ..., "best": {"generator": ..., "head": ...}}: the
                current model (so `Marlin.from_file(arch, workdir)` reads the fine-tuned encoder) and the one
                with the best validation score so far, saved together so that a resumed run selects exactly
                what the uninterrupted run selects;
  - "opt_state": {"opt_state", "step"};  "data_iterator": the loader's state;
  - "metadata":  architecture, model name, task, head width, step, and the best step with its val metrics.
At the end the selected model alone is written to `<workdir>/best/<step>/` ("params" without "best", and
"metadata"), which `Marlin.from_file(arch, <workdir>/best)` and the export tools read.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from marlin_jax.training import checkpoints
from marlin_jax.finetuning.steps import FinetuneState

BEST_SUBDIR = "best"


@dataclasses.dataclass(frozen=True)
class Best:
    """The validation metrics that select the tested model; step -1: none yet."""

    step: int = -1
    score: float = -math.inf
    val_metrics: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"best_step": self.step, "best_val": finite_or_none(self.val_metrics)}

    @classmethod
    def from_dict(cls, values: dict, select_metric: str) -> Best:
        metrics = {k: math.nan if v is None else v for k, v in values["best_val"].items()}
        return cls(values["best_step"], metrics.get(select_metric, -math.inf), metrics)


def finite_or_none(metrics: dict) -> dict:
    """JSON has no NaN: an undefined metric becomes None."""
    return {k: v if math.isfinite(v) else None for k, v in metrics.items()}


def _as_saved(params: dict) -> dict:
    return {"generator": {"encoder": params["encoder"]}, "head": params["head"]}


def _from_saved(saved: dict) -> dict:
    return {"encoder": saved["generator"]["encoder"], "head": saved["head"]}


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save_state(manager: ocp.CheckpointManager, state: FinetuneState, best_params: dict, best: Best, loader,
               metadata: dict) -> None:
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():  # an early stop, or rerunning a finished run, lands on a saved step
        return
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave({**_as_saved(state.params), "best": _as_saved(best_params)}),
        opt_state=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step}),
        data_iterator=grain.checkpoint.CheckpointSave(loader),
        metadata=ocp.args.JsonSave({**metadata, **best.to_dict(), "step": step})), force=True)


def read_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata


def restore_state(manager: ocp.CheckpointManager, step: int, like: FinetuneState, loader, select_metric: str
                  ) -> tuple[FinetuneState, dict, Best]:
    """(state, best params, best) saved at `step`, placed with `like`'s shardings; `loader` resumes in place."""
    abstract = _abstract(like)
    saved_params = _as_saved(abstract.params)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore({**saved_params, "best": saved_params}),
        opt_state=ocp.args.StandardRestore({"opt_state": abstract.opt_state, "step": abstract.step}),
        data_iterator=grain.checkpoint.CheckpointRestore(loader),
        metadata=ocp.args.JsonRestore()))
    state = FinetuneState(step=restored.opt_state["step"], params=_from_saved(restored.params),
                          opt_state=restored.opt_state["opt_state"])
    return state, _from_saved(restored.params["best"]), Best.from_dict(restored.metadata, select_metric)


def export_selected(workdir: pathlib.Path, params: dict, step: int, metadata: dict) -> pathlib.Path:
    """Writes the tested model, trained `step` steps, to `<workdir>/best/<step>/` and returns that folder."""
    directory = workdir / BEST_SUBDIR
    manager = checkpoints.make_manager(directory, max_to_keep=1, async_save=False)
    if step not in manager.all_steps():
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(_as_saved(params)),
            metadata=ocp.args.JsonSave({**metadata, "step": step})), force=True)
    manager.close()
    return directory
