"""The project as a user installs it: a wheel built from a clean copy of the checkout, installed (not editable)
into a fresh virtual environment, and every entry point run from a folder outside the checkout, with configs
named by their short names. The fresh environment takes its dependencies from the test environment (a .pth line
naming its site-packages, whose own .pth files, the editable install's among them, Python does not process), so
only this project's files come from the wheel."""

from __future__ import annotations

import csv
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def clean_copy(target: pathlib.Path) -> pathlib.Path:
    """The files git would commit (tracked, and untracked ones that are not ignored): what a clone holds."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("wheel")
    source = clean_copy(root / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(root / "dist"), str(source)], check=True, capture_output=True)
    (built,) = (root / "dist").glob("marlin_jax-*.whl")
    return built


def test_the_wheel_holds_every_package_and_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(path.parent.relative_to(REPO_ROOT)) for path in REPO_ROOT.glob("marlin_jax/**/__init__.py")}
    packages |= {str(path.parent.relative_to(REPO_ROOT)) for path in REPO_ROOT.glob("data_prep/**/__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, f"the wheel lacks the package {package}"
    for config in REPO_ROOT.glob("configs/*/*.py"):
        assert f"marlin_jax/configs/{config.parent.name}/{config.name}" in names
    assert {"marlin_jax/faces/assets/face_landmark.tflite", "marlin_jax/faces/assets/LICENSE"} <= names


@pytest.fixture(scope="module")
def installed_python(wheel, tmp_path_factory) -> pathlib.Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = pathlib.Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
        capture_output=True, text=True).stdout.strip())
    (site_packages / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    return python


def test_entry_points_run_from_the_installed_wheel(installed_python, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"

    def run(*args: str) -> str:
        done = subprocess.run([str(installed_python), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{args}: {done.stderr[-3000:]}"
        return done.stdout

    location = run("-c", "import marlin_jax, data_prep; print(marlin_jax.__file__, data_prep.__file__)")
    assert str(REPO_ROOT) not in location and location.count("site-packages") == 2, location
    run("-m", "data_prep.demo", "--output", "demo", "--num_videos", "6", "--image_size", "32")
    assert "done:" in run("-m", "marlin_jax.train", "--config", "marlin_vit_small:tiny", "--workdir", "run",
                          "--config.data.path=demo/shards", "--config.model.img_size=32", "--config.total_steps=2",
                          "--config.evals.val.every=0")
    assert "exported" in run("-m", "marlin_jax.export", "--workdir", "run")
    assert list((tmp_path / "run" / "exported").glob("*.pt")) and list((tmp_path / "run" / "exported").glob("*.yaml"))
    assert "wrote 6 feature file(s)" in run("-m", "marlin_jax.extract", "--weights", "run", "--output_dir",
                                             "features", "--reduction", "mean", "demo/videos")
    with (tmp_path / "features" / "labels.csv").open("w", newline="") as file:
        rows = csv.writer(file)
        rows.writerow(["path", "split", "label"])
        for index, feature in enumerate(sorted((tmp_path / "features").glob("*.npy"))):
            assert np.load(feature).ndim == 1
            rows.writerow([feature.name, ("train", "train", "val", "val", "test", "test")[index], index % 2])
    assert "done: test" in run("-m", "marlin_jax.linear_probe", "--config", "csv", "--workdir", "probe",
                               "--config.data.csv=features/labels.csv")
    assert (tmp_path / "probe" / "results.json").is_file()
