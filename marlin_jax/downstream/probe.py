"""Linear probes on features: the official optimisation recipe, a convex solver, and `run_linear_probe`.

Two solvers fit the same linear head on the same features:

- "official": the official CelebV-HQ linear probe. A `Linear(D, outputs)` on raw features, Adam (betas 0.5,
  0.9) on shuffled minibatches that drop the last partial batch, BCE-with-logits or cross-entropy, the rate
  halved when the epoch's mean training loss has not improved for 7 epochs (torch `ReduceLROnPlateau`), a stop
  once the rate is at or below 1e-6, and the epoch with the best validation metric kept. It measures the
  optimiser as much as the features: on an exactly linearly separable 32-d toy it stops after ~430 epochs at
  test AUROC 0.93, where logistic regression reaches 0.99. Use it to compare with the paper's tables.
- "convex" (the default): ridge regression onto +-1 targets (one-hot for multiclass), solved in closed form on
  standardised features for a grid of L2 strengths at once, the strength chosen on val, as big_vision's
  few-shot evaluator does. It is deterministic, takes seconds, and its optimum depends only on the features.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from marlin_jax.downstream import feature_files
from marlin_jax.downstream.feature_files import FeatureSplit
from marlin_jax.downstream.head import LinearHead, head_loss
from marlin_jax.downstream.metrics import SELECTABLE, selection_metrics
from marlin_jax.downstream.tasks import TASKS, load_task

SOLVERS = ("convex", "official")
RESULTS_NAME = "results.json"
# L2 strengths of the convex solver, relative to the number of training examples (features standardised).
CONVEX_L2_GRID = tuple(float(x) for x in np.logspace(-5, 3, 17))


@dataclasses.dataclass
class ProbeFit:
    """A fitted head: `predict(features) -> logits`, what selected it, and how the fit went."""

    predict: Callable[[np.ndarray], np.ndarray]
    selection: dict
    history: dict[str, list[float]]


# --- the official recipe -----------------------------------------------------------------------------------

def make_plateau_adam(optimizer_config, steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
    """Adam followed by a plateau scale fed the minibatch losses, judged on their mean once per epoch (the
    config's `optimizer` block, configs.plateau_adam).

    torch reduces after `patience` + 1 bad epochs where optax reduces after `patience`, hence the +1.
    """
    plateau = optax.contrib.reduce_on_plateau(
        factor=optimizer_config.plateau_factor, patience=optimizer_config.plateau_patience + 1,
        rtol=1e-4,  # torch's default relative threshold
        accumulation_size=steps_per_epoch,
        min_scale=optimizer_config.min_learning_rate / optimizer_config.learning_rate)
    adam = optax.adam(optimizer_config.learning_rate, b1=optimizer_config.b1, b2=optimizer_config.b2)
    return optax.chain(adam, plateau)


def plateau_scale(opt_state) -> jax.Array:
    """The plateau factor (the chain's second state) that scaled the last update."""
    return opt_state[1].scale


def _make_train_epoch(head: LinearHead, optimizer, task: str, steps: int, batch_size: int) -> Callable:
    """A jitted `(params, opt_state, features, labels, key) -> (params, opt_state, mean loss)`."""

    def loss_fn(params, features, labels):
        return head_loss(task, head.apply({"params": params}, features), labels)

    def train_epoch(params, opt_state, features, labels, key):
        def train_step(carry, batch_indices):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, features[batch_indices], labels[batch_indices])
            updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
            return (optax.apply_updates(params, updates), opt_state), loss

        order = jax.random.permutation(key, features.shape[0])[: steps * batch_size]
        (params, opt_state), losses = jax.lax.scan(train_step, (params, opt_state), order.reshape(steps, batch_size))
        return params, opt_state, losses.mean()

    return jax.jit(train_epoch)


def fit_official(task: str, num_outputs: int, train: FeatureSplit, val: FeatureSplit, config, seed: int) -> ProbeFit:
    """Trains on `train`, keeping the epoch whose `val` metric is highest (ties keep the earlier epoch).

    config: the probe config's `optimizer`, `batch_size`, `max_epochs` and `select_metric`."""
    optimizer_config, select_metric = config.optimizer, config.select_metric
    # A train set smaller than one batch trains full-batch; the official drop_last would never step.
    batch_size = min(config.batch_size, len(train))
    steps = len(train) // batch_size
    head = LinearHead(num_outputs)
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    params = head.init(init_key, jnp.zeros((1, train.features.shape[1])))["params"]
    optimizer = make_plateau_adam(optimizer_config, steps)
    opt_state = optimizer.init(params)
    train_epoch = _make_train_epoch(head, optimizer, task, steps, batch_size)
    predict = jax.jit(lambda p, x: head.apply({"params": p}, x))
    features, labels = jnp.asarray(train.features), jnp.asarray(train.labels)
    val_features = jnp.asarray(val.features)
    history = {"train_loss": [], f"val_{select_metric}": [], "learning_rate": []}
    best_score, best_epoch, best_params = -math.inf, -1, params
    for epoch in range(config.max_epochs):
        learning_rate = optimizer_config.learning_rate * float(plateau_scale(opt_state))
        if learning_rate <= optimizer_config.stop_learning_rate:
            break
        params, opt_state, loss = train_epoch(params, opt_state, features, labels, jax.random.fold_in(shuffle_key,
                                                                                                     epoch))
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"Probe training loss is {float(loss)} at epoch {epoch}")
        score = selection_metrics(task, val.labels, np.asarray(predict(params, val_features)))[select_metric]
        history["train_loss"].append(float(loss))
        history[f"val_{select_metric}"].append(score)
        history["learning_rate"].append(learning_rate)
        if score > best_score:  # strictly better, so ties keep the earlier epoch as the official checkpointing
            best_score, best_epoch, best_params = score, epoch, params
    if best_epoch < 0:
        logging.warning("Validation %s was never defined; keeping the last epoch's probe.", select_metric)
        best_epoch, best_params = len(history["train_loss"]) - 1, params
    selection = {"best_epoch": best_epoch, "epochs_run": len(history["train_loss"])}
    return ProbeFit(lambda x: np.asarray(predict(best_params, jnp.asarray(x))), selection, history)


# --- the convex solver -------------------------------------------------------------------------------------

def _signed_targets(task: str, labels: np.ndarray, num_outputs: int) -> np.ndarray:
    if task == "multiclass":
        return 2.0 * np.eye(num_outputs)[labels] - 1.0
    return 2.0 * labels.reshape(len(labels), num_outputs) - 1.0


def fit_convex(task: str, num_outputs: int, train: FeatureSplit, val: FeatureSplit, select_metric: str,
               l2_grid: tuple[float, ...] = CONVEX_L2_GRID) -> ProbeFit:
    """Closed-form ridge for every L2 strength (one SVD), the strength with the best `val` metric kept.

    Ties keep the stronger regularisation; an undefined val metric everywhere keeps the middle strength.
    """
    mean, scale = train.features.mean(0), train.features.std(0) + 1e-6
    x = (train.features.astype(np.float64) - mean) / scale
    targets = _signed_targets(task, train.labels, num_outputs)
    bias = targets.mean(0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    projected = u.T @ (targets - bias)

    def weights(l2: float) -> np.ndarray:
        return vt.T @ ((s / (s ** 2 + l2 * len(x)))[:, None] * projected)

    def predict_with(w: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lambda features: ((np.asarray(features, np.float64) - mean) / scale) @ w + bias

    scores = [selection_metrics(task, val.labels, predict_with(weights(l2))(val.features))[select_metric]
              for l2 in l2_grid]
    finite = [i for i, score in enumerate(scores) if math.isfinite(score)]
    best = max(reversed(finite), key=lambda i: scores[i]) if finite else len(l2_grid) // 2
    selection = {"l2": l2_grid[best], f"val_{select_metric}": scores[best]}
    return ProbeFit(predict_with(weights(l2_grid[best])), selection,
                    {"l2": list(l2_grid), f"val_{select_metric}": scores})


def fit_probe(solver: str, task: str, num_outputs: int, train: FeatureSplit, val: FeatureSplit,
              config: ml_collections.ConfigDict, seed: int) -> ProbeFit:
    if solver == "convex":
        return fit_convex(task, num_outputs, train, val, config.select_metric)
    return fit_official(task, num_outputs, train, val, config, seed)


# --- the entry point's job ---------------------------------------------------------------------------------

def validate_probe_config(config: ml_collections.ConfigDict) -> None:
    """Rejects field values the probe cannot run with, naming the field."""
    checks = [
        (config.task in TASKS, f"config.task must be one of {TASKS}, got {config.task!r}"),
        (config.solver in SOLVERS, f"config.solver must be one of {SOLVERS}, got {config.solver!r}"),
        (config.data.format in ("csv", "celebvhq"), f"config.data.format must be 'csv' or 'celebvhq', got "
                                                   f"{config.data.format!r}"),
        (config.data.format != "celebvhq" or config.task == "multilabel", "CelebV-HQ tasks are multilabel"),
        (config.data.format != "csv" or bool(config.data.csv), "config.data.csv is empty"),
        (config.data.format != "celebvhq" or bool(config.data.root), "config.data.root is empty"),
        (config.data.temporal_reduction in feature_files.TEMPORAL_REDUCTIONS,
         f"config.data.temporal_reduction must be one of {feature_files.TEMPORAL_REDUCTIONS}"),
        (0.0 < config.data_ratio <= 1.0, "config.data_ratio must be in (0, 1]"),
        (len(config.seeds) > 0, "config.seeds is empty"),
        (config.batch_size >= 1, f"config.batch_size must be >= 1, got {config.batch_size}"),
        (config.max_epochs >= 1, f"config.max_epochs must be >= 1, got {config.max_epochs}"),
        (config.select_metric in SELECTABLE.get(config.task, ()),
         f"config.select_metric must be one of {SELECTABLE.get(config.task)}, got {config.select_metric!r}"),
    ]
    for passed, message in checks:
        if not passed:
            raise ValueError(message)


def probe_one_seed(task: str, num_outputs: int, splits: dict[str, FeatureSplit], config, seed: int) -> dict:
    """Fits on this seed's train subset, selects on its val subset, and scores every split."""
    # As in the official low-data runs, the ratio shrinks train and val; the test set stays whole.
    rng = np.random.default_rng(seed)
    chosen = {"train": feature_files.subsample(splits["train"], config.data_ratio, rng),
              "val": feature_files.subsample(splits["val"], config.data_ratio, rng), "test": splits["test"]}
    fit = fit_probe(config.solver, task, num_outputs, chosen["train"], chosen["val"], config, seed)
    metrics = {name: selection_metrics(task, split.labels, fit.predict(split.features))
               for name, split in chosen.items()}
    logging.info("seed %d: selected %s; test %s", seed, fit.selection, metrics["test"])
    return {"seed": seed, "num_examples": {name: len(split) for name, split in chosen.items()},
            **fit.selection, "metrics": metrics, "history": fit.history}


def summarise_test(per_seed: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population) standard deviation of each test metric over the seeds."""
    names = per_seed[0]["metrics"]["test"].keys()
    values = {name: np.array([run["metrics"]["test"][name] for run in per_seed], np.float64) for name in names}
    return ({name: float(v.mean()) for name, v in values.items()},
            {name: float(v.std()) for name, v in values.items()})


def json_ready(value):
    """JSON has no NaN: an undefined metric becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def run_linear_probe(config: ml_collections.ConfigDict, workdir) -> dict:
    """Probes every seed in `config.seeds`, writes `<workdir>/results.json` and returns its content.

    The top level holds the test metrics averaged over seeds (`acc`, `auc`, ...) and their `std`; `per_seed`
    holds each seed's subset sizes, what was selected (epoch or L2 strength), the metrics of every split and
    the fit's history.
    """
    validate_probe_config(config)
    task = load_task(config.data, config.task, files="features")
    splits, num_empty = feature_files.load_feature_splits(task, config.data.temporal_reduction)
    per_seed = [probe_one_seed(task.task, task.num_outputs, splits, config, seed) for seed in config.seeds]
    mean, std = summarise_test(per_seed)
    results = json_ready({
        **mean, "std": std, "solver": config.solver, "task": task.task, "num_outputs": task.num_outputs,
        "feature_dim": int(splits["train"].features.shape[1]), "label_names": task.label_names,
        "num_examples": {name: len(split) for name, split in splits.items()}, "num_empty_features": num_empty,
        "data_ratio": config.data_ratio, "seeds": list(config.seeds), "per_seed": per_seed,
        "config": config.to_dict()})
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RESULTS_NAME).write_text(json.dumps(results, indent=2, allow_nan=False))
    logging.info("test over %d seed(s): %s (std %s)", len(per_seed), mean, std)
    return results
