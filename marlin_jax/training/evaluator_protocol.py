"""The evaluator protocol shared by in-training evaluation and the standalone entry points.

An evaluator is built once at startup (where bad input must fail: a missing split or CSV, an unknown type)
and then called by the loop at its own cadence, `every` steps and at the natural end of the run (not at a
preemption, so that a resumed run evaluates where the uninterrupted one does). `evaluate(state, step)` returns
named scalars, written to `metrics.jsonl` and TensorBoard under those names, and optional images.

Config: `config.evals` maps a name to a block with `type`, `every` and the type's own fields, as big_vision's
evaluators are configured:

    config.evals.val = dict(type="reconstruction", every=1000, ...)
    config.evals.demo = dict(type="linear_probe", every=5000, csv="/data/probe.csv", ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Evaluation:
    scalars: dict[str, float]
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Evaluator(Protocol):
    name: str
    every: int  # steps between evaluations; 0: only at the end of the run

    def evaluate(self, state: Any, step: int) -> Evaluation:
        ...


def is_due(evaluator: Evaluator, step: int, run_ended: bool) -> bool:
    """At its cadence, and once when the run reaches its end (not when it is preempted)."""
    return (evaluator.every > 0 and step % evaluator.every == 0) or run_ended


def build_evaluators(evals_config: Mapping, constructors: Mapping[str, Callable[..., Evaluator]], **context
                     ) -> list[Evaluator]:
    """One evaluator per `config.evals` entry; `constructors` maps each known `type` to its builder, called with
    (name, block, **context). An unknown type fails here, before anything compiles, naming the choices."""
    evaluators = []
    for name, block in evals_config.items():
        kind = block.get("type")
        if kind not in constructors:
            raise ValueError(f"config.evals.{name}.type is {kind!r}; the evaluators here are "
                             f"{', '.join(sorted(constructors))}")
        if block.get("every", 0) < 0:
            raise ValueError(f"config.evals.{name}.every must be >= 0, got {block.get('every')}")
        evaluators.append(constructors[kind](name, block, **context))
    return evaluators
