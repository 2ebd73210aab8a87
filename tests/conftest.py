"""Shared fixtures: PyTorch and the official PyTorch MARLIN as references, the sample videos, a Python with
TensorFlow for the tf.data cross-read, and what several test files train on, built once per session: the 32 px
demo shards and one uninterrupted tiny pretraining run (tests/tiny_pretraining.py), and colour-cast videos for
fine-tuning and probes (tests/synthetic_videos.py).

Session fixtures are read-only: a test that damages, extends or resumes one works on a copy."""

from __future__ import annotations

import atexit
import fcntl
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

# XLA:CPU compiles the session's programs without LLVM's optimisations, in this process and every process the
# tests start (inherited through XLA_FLAGS): the tests' tiny programs spend far more time compiling than running,
# and compile in about 40% less CPU time; the matmuls call the same library kernels either way. A level the
# caller set is kept (XLA_FLAGS=--xla_backend_optimization_level=2 runs the suite as users compile).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# The tests run on the CPU, and so does every process they start. The test extra installs libtpu (for
# tests/test_aot.py, which compiles for TPU slices without running anything); without a pinned platform, JAX would
# try to start a TPU backend in every process and log libtpu's complaints before falling back to the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


def built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
    """`<folder>` after `build(folder)`, run once for the whole test run: also when pytest-xdist runs the tests in
    several worker processes, whose temporary folders share a parent. The first to ask builds it, holding a lock;
    the others wait and reuse it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            (root / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def small_demo_shards(tmp_path_factory) -> pathlib.Path:
    """6 demo videos (`<shards>/../videos`) built into 32 px shards: 5 train clips in 3 shards, 1 val clip."""
    from tiny_pretraining import make_small_demo
    return built_once(tmp_path_factory, "small_demo", make_small_demo) / "shards"


@pytest.fixture(scope="session")
def tiny_reference_run(small_demo_shards, tmp_path_factory) -> pathlib.Path:
    """The workdir of an uninterrupted tiny run on `small_demo_shards` (`python -m marlin_jax.train`,
    tiny_pretraining.REFERENCE_RUN): every step logged and checkpointed, validation at steps 4 and 6. Resume tests
    compare their runs with it; copy it (tiny_pretraining.copy_run_until) to continue from one of its steps."""
    from tiny_pretraining import REFERENCE_RUN, run_train
    return built_once(tmp_path_factory, "tiny_reference_run",
                      lambda workdir: run_train(workdir, small_demo_shards, *REFERENCE_RUN))


@pytest.fixture(scope="session")
def colour_csv(tmp_path_factory) -> pathlib.Path:
    """A labelled CSV of 64 px videos whose binary class is a colour cast (32 train, 12 val, 12 test)."""
    from synthetic_videos import write_colour_csv
    folder = built_once(tmp_path_factory, "colour",
                        lambda root: write_colour_csv(root, {"train": 32, "val": 12, "test": 12}))
    return folder / "videos.csv"


# The files that take longest, longest first (CPU time in the whole-suite run of docs/testing.md). With
# pytest-xdist handing out whole files in this order, each starts on a worker at once and the quick files fill in
# at the end; a long file handed out last would keep its worker busy after the others had finished.
LONGEST_FILES = ("test_multihost.py", "test_train.py", "test_gcs.py", "test_default_compute_path.py",
                 "test_elastic_resume.py", "test_finetune.py", "test_aot.py", "test_reference_iteration.py",
                 "test_checkpoint_faults.py")


def pytest_collection_modifyitems(config, items):
    """Files run whole, each file's tests in their order: LONGEST_FILES first, then the other files holding slow
    tests, then the rest."""
    files = {}
    for item in items:
        files.setdefault(item.path, []).append(item)
    has_slow = {path: any(item.get_closest_marker("slow") for item in tests) for path, tests in files.items()}

    def position(path):
        return (LONGEST_FILES.index(path.name) if path.name in LONGEST_FILES else len(LONGEST_FILES),
                not has_slow[path])

    items[:] = [item for path in sorted(files, key=position) for item in files[path]]

