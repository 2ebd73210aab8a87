"""Linear probe on synthetic extracted features, in the CSV and CelebV-HQ layouts (CPU, seconds)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marlin_jax.downstream import feature_files, metrics, probe, tasks
from marlin_jax.downstream.probe import run_linear_probe

REPO = Path(__file__).resolve().parents[1]
SPLIT_SIZES = {"train": 400, "val": 100, "test": 400}
DIM, WINDOWS = 16, 4


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"probe_config_{name}", REPO / "configs/probe" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def fast(config, solver="official", **overrides):
    """The official recipe needs thousands of epochs at lr 1e-4; a planted signal needs far less."""
    config.solver = solver
    config.optimizer.learning_rate = 0.05
    config.batch_size = 64
    config.max_epochs = 30
    config.optimizer.stop_learning_rate = 1e-4
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def planted_windows(num: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num, WINDOWS, DIM)).astype(np.float32)


def planted_labels(task: str, windows: np.ndarray, num_outputs: int, shuffle: bool) -> np.ndarray:
    """Labels that are a linear function of the window mean (or a permutation of them: no signal)."""
    rng = np.random.default_rng(123)
    scores = windows.mean(axis=1) @ rng.normal(size=(DIM, num_outputs)) + 0.2 * rng.normal(size=num_outputs)
    labels = {"binary": (scores[:, 0] > 0), "multiclass": scores.argmax(axis=1), "multilabel": scores > 0}[task]
    labels = labels.astype(np.int32)
    return np.random.default_rng(7).permutation(labels) if shuffle else labels


def write_csv_layout(root: Path, task: str, num_outputs: int = 1, shuffle: bool = False) -> Path:
    """Features under root/feats/, listed in root/probe.csv; each split has its own windows."""
    (root / "feats").mkdir(parents=True)
    label_header = [f"label_{k}" for k in range(num_outputs)] if task == "multilabel" else ["label"]
    rows = []
    for seed, (split, size) in enumerate(SPLIT_SIZES.items()):
        windows = planted_windows(size, seed)
        labels = planted_labels(task, windows, num_outputs, shuffle)
        for i, (video, label) in enumerate(zip(windows, labels)):
            path = f"feats/{split}_{i:04d}.npy"
            np.save(root / path, video)
            rows.append([path, split, *np.atleast_1d(label).tolist()])
    with (root / "probe.csv").open("w", newline="") as file:
        csv.writer(file).writerows([["path", "split", *label_header], *rows])
    return root / "probe.csv"


def write_celebvhq_layout(root: Path, num: int = 600, attribute: str = "appearance", shuffle: bool = False) -> Path:
    count = tasks.ATTRIBUTE_COUNTS[attribute]
    windows = planted_windows(num, 11)
    labels = planted_labels("multilabel", windows, count, shuffle)
    (root / "marlin_vit_base_ytf").mkdir(parents=True)
    clips = {}
    for i, (video, label) in enumerate(zip(windows, labels)):
        clip_id = f"clip{(i * 7919) % num:05d}"  # written out of sorted order on purpose
        np.save(root / "marlin_vit_base_ytf" / f"{clip_id}.npy", video)
        clips[clip_id] = {"ytb_id": clip_id, "attributes": {"appearance": [0] * 40, "action": [0] * 35,
                                                            attribute: label.tolist()}}
    info = {"mete_info": {f"{attribute}_mapping": [f"{attribute}{k}" for k in range(count)]}, "clips": clips}
    (root / "celebvhq_info.json").write_text(json.dumps(info))
    return root


TASK_OUTPUTS = [("binary", 1), ("multiclass", 4), ("multilabel", 5)]


@pytest.mark.parametrize("solver", probe.SOLVERS)
@pytest.mark.parametrize("task,num_outputs", TASK_OUTPUTS)
def test_csv_probe_learns_planted_signal(tmp_path, task, num_outputs, solver):
    config = fast(load_config("csv", task), solver)
    config.data.csv = str(write_csv_layout(tmp_path / "data", task, num_outputs))
    results = run_linear_probe(config, tmp_path / "work")
    assert results["auc"] >= 0.95
    assert results["acc"] >= 0.8
    assert results["num_outputs"] == num_outputs


@pytest.mark.parametrize("solver", probe.SOLVERS)
@pytest.mark.parametrize("task,num_outputs", TASK_OUTPUTS)
def test_csv_probe_on_shuffled_labels_is_at_chance(tmp_path, task, num_outputs, solver):
    config = fast(load_config("csv", task), solver)
    config.data.csv = str(write_csv_layout(tmp_path / "data", task, num_outputs, shuffle=True))
    results = run_linear_probe(config, tmp_path / "work")
    assert abs(results["auc"] - 0.5) < 0.1


@pytest.mark.slow
def test_celebvhq_probe_learns_planted_signal_and_writes_schema(tmp_path):
    config = fast(load_config("celebvhq_appearance"), seeds=(0, 1))
    config.data.root = str(write_celebvhq_layout(tmp_path / "celebvhq"))
    results = run_linear_probe(config, tmp_path / "work")
    assert results == json.loads((tmp_path / "work/results.json").read_text())
    assert results["auc"] >= 0.95 and results["auc_per_label_mean"] >= 0.95
    assert set(results["std"]) == set(metrics.SELECTABLE["multilabel"])
    assert results["num_examples"] == {"train": 480, "val": 60, "test": 60}
    assert results["label_names"][:2] == ["appearance0", "appearance1"]
    assert [run["seed"] for run in results["per_seed"]] == [0, 1]
    for run in results["per_seed"]:
        assert set(run["metrics"]) == {"train", "val", "test"}
        assert 0 <= run["best_epoch"] < run["epochs_run"] == len(run["history"]["train_loss"])
    test_aucs = [run["metrics"]["test"]["auc"] for run in results["per_seed"]]
    assert results["auc"] == pytest.approx(np.mean(test_aucs))
    assert results["std"]["auc"] == pytest.approx(np.std(test_aucs))


@pytest.mark.slow
def test_celebvhq_probe_on_shuffled_labels_is_at_chance(tmp_path):
    config = fast(load_config("celebvhq_action"))
    config.data.root = str(write_celebvhq_layout(tmp_path / "celebvhq", 1000, "action", shuffle=True))
    results = run_linear_probe(config, tmp_path / "work")
    assert abs(results["auc_per_label_mean"] - 0.5) < 0.1


def test_celebvhq_split_is_sorted_80_10_10_unless_split_files_exist(tmp_path):
    root = write_celebvhq_layout(tmp_path / "celebvhq", num=50)
    dataset = tasks.read_celebvhq_task(root, "marlin_vit_base_ytf", ".npy", "appearance")
    ids = sorted(f"clip{i:05d}" for i in range(50))
    assert dataset.splits["train"].ids == tuple(ids[:40])
    assert dataset.splits["val"].ids == tuple(ids[40:45])
    assert dataset.splits["test"].ids == tuple(ids[45:])
    for split, chosen in {"train": ids[10:], "val": ids[:5], "test": ids[5:10]}.items():
        (root / f"{split}.txt").write_text("\n".join(chosen) + "\n")
    dataset = tasks.read_celebvhq_task(root, "marlin_vit_base_ytf", ".npy", "appearance")
    assert dataset.splits["val"].ids == tuple(ids[:5])
    labels = json.loads((root / "celebvhq_info.json").read_text())["clips"][ids[0]]["attributes"]["appearance"]
    np.testing.assert_array_equal(dataset.splits["val"].labels[0], labels)


def test_data_ratio_draws_seeded_subsets_of_train_and_val(tmp_path):
    config = fast(load_config("csv", "binary"), data_ratio=0.25, seeds=(0, 1))
    config.max_epochs = 2
    config.data.csv = str(write_csv_layout(tmp_path / "data", "binary"))
    results = run_linear_probe(config, tmp_path / "work")
    for run in results["per_seed"]:
        assert run["num_examples"] == {"train": 100, "val": 25, "test": 400}

    split = feature_files.FeatureSplit(tuple(f"v{i}" for i in range(40)), np.arange(40, dtype=np.float32)[:, None],
                                  np.arange(40, dtype=np.int32))

    def draw(seed):
        return feature_files.subsample(split, 0.3, np.random.default_rng(seed)).ids

    assert len(draw(0)) == 12
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    kept = feature_files.subsample(split, 0.3, np.random.default_rng(0))
    positions = [int(name[1:]) for name in kept.ids]
    assert positions == sorted(positions)
    np.testing.assert_array_equal(kept.features[:, 0], positions)
    np.testing.assert_array_equal(kept.labels, positions)
    assert feature_files.subsample(split, 1.0, np.random.default_rng(0)) is split
    with pytest.raises(ValueError, match="leaves no examples"):
        feature_files.subsample(split, 0.01, np.random.default_rng(0))


def test_same_seed_reproduces_results_exactly(tmp_path):
    config = fast(load_config("csv", "multiclass"))
    config.max_epochs = 5
    config.data.csv = str(write_csv_layout(tmp_path / "data", "multiclass", 4))
    first, second = (run_linear_probe(config, tmp_path / name)["per_seed"][0] for name in ("a", "b"))
    assert first == second


@pytest.mark.parametrize("reduction,expected", [("mean", [2.0, 5.0]), ("max", [4.0, 9.0]), ("min", [0.0, 1.0])])
def test_temporal_reduction(tmp_path, reduction, expected):
    windows = np.array([[0.0, 9.0], [2.0, 1.0], [4.0, 5.0]], np.float32)
    np.testing.assert_array_equal(feature_files.reduce_windows(windows, reduction), expected)
    np.save(tmp_path / "video.npy", windows)
    np.save(tmp_path / "clip.npy", windows[0])
    np.save(tmp_path / "broken.npy", np.zeros((0, 2), np.float32))
    loaded, num_empty = feature_files.load_features(
        [tmp_path / "video.npy", tmp_path / "clip.npy", tmp_path / "broken.npy"], reduction)
    np.testing.assert_array_equal(loaded, [expected, [0.0, 9.0], [0.0, 0.0]])
    assert num_empty == 1


def test_multilabel_auc_is_flattened_as_torchmetrics_binary_auroc():
    torch = pytest.importorskip("torch")
    torchmetrics = pytest.importorskip("torchmetrics")
    rng = np.random.default_rng(0)
    labels = (rng.random((50, 6)) < np.linspace(0.1, 0.9, 6)).astype(np.int32)
    logits = rng.normal(size=(50, 6)) + labels
    ours = metrics.probe_metrics("multilabel", labels, logits)
    probs = torch.from_numpy(logits).sigmoid()
    theirs = torchmetrics.AUROC(task="binary")(probs, torch.from_numpy(labels).bool())
    accuracy = ((probs > 0.5) == torch.from_numpy(labels).bool()).float().mean()
    assert ours["auc"] == pytest.approx(float(theirs), abs=1e-6)
    assert ours["acc"] == pytest.approx(float(accuracy))
    assert ours["auc_per_label_mean"] != pytest.approx(ours["auc"])


def test_plateau_halves_the_rate_after_patience_plus_one_flat_epochs_as_torch():
    config = load_config("csv").optimizer
    optimizer = probe.make_plateau_adam(config, steps_per_epoch=2)
    state = optimizer.init({"w": np.zeros(1, np.float32)})
    scales = []
    for epoch in range(10):
        for _ in range(2):
            _, state = optimizer.update({"w": np.ones(1, np.float32)}, state, value=1.0)
        scales.append(float(state[1].scale))
    # Epoch 0 sets the best loss; torch (patience 7) reduces on the 8th epoch without improvement.
    assert scales == [1.0] * 8 + [0.5, 0.5]


@pytest.mark.slow
def test_entry_point_runs_as_a_module(tmp_path):
    csv_path = write_csv_layout(tmp_path / "data", "binary")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-m", "marlin_jax.linear_probe", "--config", "configs/probe/dfd.py",
         f"--config.data.csv={csv_path}", "--config.solver=official", "--config.max_epochs=2", "--config.seeds=3,4",
         "--config.data.temporal_reduction=max", f"--workdir={tmp_path / 'work'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "work/results.json").read_text())
    assert results["seeds"] == [3, 4] and results["task"] == "binary"
    assert results["config"]["data"]["temporal_reduction"] == "max"
    assert {"acc", "auc", "f1", "std", "per_seed"} <= set(results)


def rewrite_csv(csv_path: Path, edit) -> None:
    """Replaces the CSV's rows (header included) with `edit(rows)`."""
    rows = edit(list(csv.reader(csv_path.open())))
    with csv_path.open("w", newline="") as file:
        csv.writer(file).writerows(rows)


CSV_ERRORS = [  # (task, (row, column, new cell text), expected message); row 0 is the header
    ("binary", (1, 0, "feats/nowhere.npy"), "do not exist.*nowhere.npy"),
    ("binary", (1, 2, "2"), "line 2: binary labels must be 0 or 1"),
    ("binary", (1, 1, "training"), "line 2: split"),
    ("binary", (0, 2, "target"), "'label' column"),
    ("multilabel", (0, 3, "label_7"), "label_0..label_K-1"),
    ("multiclass", (0, 0, "file"), "'path' column"),
    ("multiclass", (1, 2, "x"), "line 2: column 'label'"),
]


@pytest.mark.parametrize("task,cell,message", CSV_ERRORS)
def test_bad_csv_input_names_the_problem(tmp_path, task, cell, message):
    csv_path = write_csv_layout(tmp_path, task, 3 if task == "multilabel" else 1)
    row, column, text = cell

    def set_cell(rows):
        rows[row][column] = text
        return rows

    rewrite_csv(csv_path, set_cell)
    with pytest.raises(ValueError, match=message):
        tasks.check_files_exist(tasks.read_csv_task(csv_path, task), str(csv_path))


def test_empty_split_names_the_split(tmp_path):
    csv_path = write_csv_layout(tmp_path, "binary")
    rewrite_csv(csv_path, lambda rows: [row for row in rows if row[1] != "val"])
    with pytest.raises(ValueError, match="Split 'val' is empty in .*probe.csv"):
        tasks.read_csv_task(csv_path, "binary")


def test_bad_feature_files_name_the_file(tmp_path):
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float32))
    np.save(tmp_path / "wide.npy", np.zeros((2, 5), np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((2, 4), np.float32))
    np.save(tmp_path / "nan.npy", np.full((2, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="cube.npy has shape"):
        feature_files.load_features([tmp_path / "cube.npy"], "mean")
    with pytest.raises(ValueError, match="wide.npy has dimension 5"):
        feature_files.load_features([tmp_path / "ok.npy", tmp_path / "wide.npy"], "mean")
    with pytest.raises(ValueError, match="nan.npy contains NaN"):
        feature_files.load_features([tmp_path / "nan.npy"], "mean")
    with pytest.raises(ValueError, match="temporal_reduction"):
        feature_files.load_features([tmp_path / "ok.npy"], "median")


def test_bad_celebvhq_input_names_the_problem(tmp_path):
    root = write_celebvhq_layout(tmp_path / "celebvhq", num=20)
    with pytest.raises(ValueError, match="CelebV-HQ folder not found"):
        tasks.read_celebvhq_task(root, "marlin_vit_large_ytf", ".npy", "appearance")
    np.save(root / "marlin_vit_base_ytf/stranger.npy", np.zeros((1, DIM), np.float32))
    with pytest.raises(ValueError, match="no entry in .*celebvhq_info.json"):
        tasks.read_celebvhq_task(root, "marlin_vit_base_ytf", ".npy", "appearance")
    (root / "train.txt").write_text("clip00000\n")
    with pytest.raises(ValueError, match="split files are incomplete"):
        tasks.read_celebvhq_task(root, "marlin_vit_base_ytf", ".npy", "appearance")
    (root / "marlin_vit_base_ytf/stranger.npy").unlink()
    (root / "train.txt").unlink()
    info = json.loads((root / "celebvhq_info.json").read_text())
    info["clips"]["clip00003"]["attributes"]["appearance"] = [0, 1]
    (root / "celebvhq_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"no usable labels.*clips\['clip00003'\]\['attributes'\]\['appearance'\]"):
        tasks.read_celebvhq_task(root, "marlin_vit_base_ytf", ".npy", "appearance")
    # A clip outside the splits may lack labels (data_prep.celebvhq leaves such videos out).
    (root / "marlin_vit_base_ytf/clip00003.npy").unlink()
    train = tasks.read_celebvhq_task(root, "marlin_vit_base_ytf", ".npy", "appearance").splits["train"]
    assert len(train) == 15 and "clip00003" not in train.ids
    with pytest.raises(ValueError, match="label file not found"):
        tasks.read_attribute_labels(root / "missing.json", "appearance")


def test_bad_config_names_the_field(tmp_path):
    config = load_config("celebvhq_appearance")
    with pytest.raises(ValueError, match="config.data.root is empty"):
        run_linear_probe(config, tmp_path)
    config = load_config("csv", "multiclass")
    config.data.csv = "x.csv"
    config.select_metric = "f1"
    with pytest.raises(ValueError, match="select_metric"):
        run_linear_probe(config, tmp_path)


def separable_toy(num: int, seed: int, dim: int = 32) -> feature_files.FeatureSplit:
    """Exactly linearly separable: the label is the sign of a fixed direction, with a margin."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=dim)
    points = rng.normal(size=(num, dim)).astype(np.float32)
    scores = points @ direction
    keep = np.abs(scores) > 0.5
    return feature_files.FeatureSplit(tuple(map(str, range(keep.sum()))), points[keep], (scores[keep] > 0).astype(np.int32))


def test_convex_solver_separates_an_exactly_separable_toy():
    train, val, test = separable_toy(400, 0), separable_toy(200, 1), separable_toy(400, 2)
    fit = probe.fit_convex("binary", 1, train, val, "auc")
    scores = metrics.probe_metrics("binary", test.labels, fit.predict(test.features))
    assert scores["auc"] >= 0.98 and scores["acc"] >= 0.9
    again = probe.fit_convex("binary", 1, train, val, "auc")
    np.testing.assert_array_equal(again.predict(test.features), fit.predict(test.features))  # deterministic
    assert fit.selection["l2"] in probe.CONVEX_L2_GRID


def test_auc_batch_mean_is_the_size_weighted_mean_of_per_batch_aurocs():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 70)
    logits = (rng.normal(size=70) + labels)[:, None]
    expected_parts = [(metrics.probe_metrics("binary", labels[s:s + 32], logits[s:s + 32])["auc"],
                       len(labels[s:s + 32])) for s in (0, 32, 64)]
    expected = sum(auc * n for auc, n in expected_parts) / 70
    assert metrics.auc_batch_mean("binary", labels, logits) == pytest.approx(expected)
    one_class = np.zeros(40, np.int32)
    one_class[:32] = rng.integers(0, 2, 32)  # the second batch (8 zeros) has no AUROC and is left out
    first = metrics.probe_metrics("binary", one_class[:32], logits[:32])["auc"]
    assert metrics.auc_batch_mean("binary", one_class, logits[:40]) == pytest.approx(first)
