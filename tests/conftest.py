"""Shared fixtures: PyTorch and the official PyTorch MARLIN as references, the sample videos, and a Python
with TensorFlow for the tf.data cross-read."""

from __future__ import annotations

import atexit
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import types

import pytest

# One persistent XLA compilation cache for the whole session, set before anything imports JAX and inherited by
# every process the tests start (training, fine-tuning, export, the multi-process runs). A tiny run spends most
# of its time compiling, and the same programs recur across test files; a cached program is the executable XLA
# built, so results are unchanged. A cache the caller set is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_COMPILE_CACHE = tempfile.mkdtemp(prefix="marlin_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_COMPILE_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, _SESSION_COMPILE_CACHE, ignore_errors=True)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Real face videos (not in the repository): the folder named by $MARLIN_SAMPLES_DIR, else this default beside the
# checkout.
SAMPLES_DIR_VARIABLE = "MARLIN_SAMPLES_DIR"
DEFAULT_SAMPLES_DIR = REPO_ROOT.parent / "shared" / "data" / "marlin_samples"


@pytest.fixture(scope="session")
def torch():
    """PyTorch (the test extra). Tests that use it ask for this fixture, so without torch only they skip."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def torch_reference(torch):
    """tests/torch_reference.py, which imports torch."""
    import torch_reference
    return torch_reference


@pytest.fixture(scope="session")
def marlin_pytorch(torch):
    """The real `marlin_pytorch` package (installed with --no-deps, see README).

    marlin_pytorch imports torchvision at module level only for `torchvision.io.read_video`, and PyPI's
    torchvision does not load beside the CPU torch build used here. When torchvision is missing we put a stub
    module in sys.modules so the import succeeds; the model code under test never touches it, and a test that
    calls read_video would fail loudly on the stub.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        stub = types.ModuleType("torchvision")
        stub.io = types.ModuleType("torchvision.io")

        def read_video(*_, **__):
            raise RuntimeError("torchvision is stubbed in tests; marlin_pytorch.read_video is unavailable")

        stub.io.read_video = read_video
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.io"] = stub.io
        try:
            return pytest.importorskip("marlin_pytorch")
        finally:
            # marlin_pytorch.util keeps its reference to the stub; other libraries (torchmetrics) must keep
            # seeing torchvision as absent rather than find a module without a spec.
            del sys.modules["torchvision"], sys.modules["torchvision.io"]
    return pytest.importorskip("marlin_pytorch")


@pytest.fixture(scope="session")
def samples_dir() -> pathlib.Path:
    """The sample face videos. A folder named in $MARLIN_SAMPLES_DIR must hold them (the tests fail otherwise);
    without the variable the tests that need them skip when the default folder is absent."""
    configured = os.environ.get(SAMPLES_DIR_VARIABLE)
    if configured:
        folder = pathlib.Path(configured)
        if not any(folder.glob("cropped*.mp4")):
            pytest.fail(f"${SAMPLES_DIR_VARIABLE}={configured} holds no sample videos (cropped*.mp4)")
        return folder
    if not DEFAULT_SAMPLES_DIR.is_dir():
        pytest.skip(f"sample videos not found at {DEFAULT_SAMPLES_DIR}; set ${SAMPLES_DIR_VARIABLE} to their folder")
    return DEFAULT_SAMPLES_DIR


TFDATA_PYTHON_VARIABLE = "MARLIN_TFDATA_PYTHON"


@pytest.fixture(scope="session")
def tfdata_python() -> str:
    """A Python interpreter with TensorFlow, for tests/tfdata_crossread.py.

    TensorFlow is too heavy for the project's install, so `.ci/run` puts tensorflow-cpu in a venv of its own and
    names its interpreter in $MARLIN_TFDATA_PYTHON; when that is set the cross-read runs (and fails rather than
    skips if that interpreter is broken). Otherwise this interpreter is used if it has TensorFlow.
    """
    configured = os.environ.get(TFDATA_PYTHON_VARIABLE)
    if configured:
        return configured
    if importlib.util.find_spec("tensorflow") is not None:
        return sys.executable
    pytest.skip(f"the tf.data cross-read needs TensorFlow: set {TFDATA_PYTHON_VARIABLE} to a Python with "
                "tensorflow-cpu (.ci/run makes one)")
