"""`python -m marlin_jax.aot`: the tiny pretraining config compiled by the real TPU compiler (libtpu) for a v5e
2x2 slice on this CPU machine, a batch too big for the slice refused with the shortfall, and bad input named.

libtpu comes with the test extra (jax[tpu]) on Linux x86_64, the only platform it ships for; there, a missing
libtpu fails these tests instead of skipping them.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import platform
import subprocess
import sys

import pytest

from marlin_jax import aot_compile, model_flops
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.config_files import load_config
from marlin_jax.pretraining.step import StepSettings

pytestmark = pytest.mark.slow  # compiles with the TPU compiler (tens of CPU-seconds)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / "configs/pretrain/marlin_vit_base.py") + ":tiny"
TOPOLOGY = "v5e:2x2"
MEMORY_KEYS = {"arguments", "temporaries", "outputs", "aliased", "generated_code", "total", "capacity"}


@pytest.fixture(scope="module", autouse=True)
def libtpu():
    if importlib.util.find_spec("libtpu") is None:
        if sys.platform != "linux" or platform.machine() != "x86_64":
            pytest.skip("libtpu ships for Linux x86_64 only")
        pytest.fail("libtpu is missing: the test extra installs it (pip install -e '.[test]')")


def run_aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marlin_jax.aot", "--config", TINY, "--topology", TOPOLOGY, *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=540)


def test_tiny_pretraining_compiles_for_v5e(tmp_path):
    output = tmp_path / "report.json"
    result = run_aot("--json", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())

    assert report["fits"] is True
    assert (report["chip"], report["chips"], report["hosts"]) == ("TPU v5 lite", 4, 1)
    # The config's mesh, (-1, 1, 1), over the slice's chips: what the trainer builds over jax.devices().
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["global_batch"] == 4 and report["per_chip_batch"] == 1
    memory = report["hbm_per_chip_bytes"]
    assert set(memory) == MEMORY_KEYS
    assert 0 < memory["total"] < memory["capacity"] == 16 * 2 ** 30
    assert memory["aliased"] > 0  # the donated state comes back in place
    config = load_config(TINY)
    arch = MarlinArchitecture.from_dict(config.model.to_dict())
    per_clip = model_flops.pretraining_flops(arch, StepSettings.from_config(config, arch).num_visible)["jax_step"]
    assert report["model_flops_per_step"] == 4 * per_clip
    assert report["xla_flops_per_step"] > 0
    assert report["collectives"].get("all-reduce", 0) > 0  # the data-parallel gradient sum
    assert report["attention"].startswith("splash")
    assert report["compile_seconds"] > 0
    assert report["hours_at_50pct_mfu"] > 0
    assert report["schedule"]["total_steps"] == config.total_steps

    extraction = report["programs"]["extract_features"]
    assert extraction["fits"] and extraction["mesh"] == {"batch": 4} and extraction["per_chip_batch"] == 8
    # Each chip attends over its own clips: the extraction forward moves nothing between chips.
    assert extraction["collectives"] == {} and extraction["attention"].startswith("splash")
    assert "train_step" in result.stdout and "extract_features" in result.stdout


def test_oversized_batch_is_refused_with_the_shortfall(tmp_path):
    result = run_aot("--config.batch_size=131072", "--programs=train_step", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 1, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: does not fit {TOPOLOGY}: train_step needs ")
    assert "GiB short" in message
    for lever in ("--config.batch_size", "--config.grad_accum_steps", "--config.mesh.shape", "--config.remat"):
        assert lever in message
    assert json.loads((tmp_path / "r.json").read_text())["fits"] is False


def test_unknown_topology_lists_the_chip_kinds():
    with pytest.raises(ValueError, match=r"unknown TPU topology 'v9:2x2'.*v4, v5e, v5p, v6e"):
        aot_compile.compile_config(load_config(TINY), "v9:2x2")
    with pytest.raises(ValueError, match=r"libtpu does not know the TPU topology 'v5e:3x3'"):
        aot_compile.describe_slice("v5e:3x3")


def test_mesh_that_does_not_match_the_slice_names_both_counts():
    config = load_config(TINY).unlock()
    config.mesh.shape = (8, 1, 1)
    with pytest.raises(ValueError, match=r"v5e:2x2 has 4 chips; .*\(8, 1, 1\) needs 8 devices, but there are 4"):
        aot_compile.compile_config(config, TOPOLOGY)


def test_missing_libtpu_names_the_install_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "libtpu"
                        else find_spec(name, *rest))
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(ImportError, match=r"needs libtpu.*pip install 'jax\[tpu\]=="):
        aot_compile.describe_slice(TOPOLOGY)


def test_probe_config_has_no_device_program():
    with pytest.raises(ValueError, match="no device program"):
        aot_compile.compile_config(load_config(str(REPO_ROOT / "configs/probe/csv.py")), TOPOLOGY)
