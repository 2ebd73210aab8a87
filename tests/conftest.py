"""Shared fixtures: the official PyTorch MARLIN as a reference, and the sample videos."""

from __future__ import annotations

import pathlib
import sys
import types

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT.parent / "shared" / "data" / "marlin_samples"


@pytest.fixture(scope="session")
def marlin_pytorch():
    """The real `marlin_pytorch` package (installed with --no-deps, see README).

    marlin_pytorch imports torchvision at module level only for `torchvision.io.read_video`, and PyPI's
    torchvision does not load beside the CPU torch build used here. When torchvision is missing we put a stub
    module in sys.modules so the import succeeds; the model code under test never touches it, and a test that
    calls read_video would fail loudly on the stub.
    """
    pytest.importorskip("torch")
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
    if not SAMPLES_DIR.is_dir():
        pytest.skip(f"sample videos not found at {SAMPLES_DIR}")
    return SAMPLES_DIR
