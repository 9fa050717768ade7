"""Shared test fixtures: the ../shared material and the array-module (backend) parameter."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "caffe-golden" / "cases"
ACCEPTANCE = SHARED / "acceptance"


def _cupy_usable() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAVE_GPU = _cupy_usable()


def need_shared(*parts: str) -> Path:
    """Path under ../shared, or skip the test where the shared material is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (shared material not available)")
    return path


@pytest.fixture
def shared_dir() -> Path:
    return need_shared()


@pytest.fixture
def golden_dir() -> Path:
    return need_shared("caffe-golden", "cases")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module a layer test runs on: NumPy always, CuPy where a GPU is present."""
    if request.param == "numpy":
        return np
    if not HAVE_GPU:
        pytest.skip("CuPy with a usable GPU is not available")
    import cupy

    return cupy


@contextlib.contextmanager
def jit_state(flag: bool):
    """The compiled CPU loops (netengine.ops.jit) on or off inside the block, then as before."""
    from netengine.ops import jit

    saved = jit._state["enabled"]
    jit.set_enabled(flag)
    try:
        yield
    finally:
        jit.set_enabled(saved)


@pytest.fixture
def numpy_path():
    """Run the test with the compiled CPU loops (netengine.ops.jit) off: the NumPy code only."""
    with jit_state(False):
        yield


@pytest.fixture(params=["numpy-only", "compiled"])
def cpu_path(request):
    """Run the test twice on the CPU: NumPy code only, and with the compiled loops (skipped
    where Numba is not installed)."""
    from netengine.ops import jit

    if request.param == "compiled" and not jit.available():
        pytest.skip("Numba is not installed (the fast extra)")
    with jit_state(request.param == "compiled"):
        yield request.param


def serve(layer, top, count: int) -> list:
    """``count`` forward passes of a source layer (no bottoms): each pass's two tops, copied
    to the host."""
    from netengine import backend

    out = []
    for _ in range(count):
        layer.forward([], top)
        out.append((backend.to_host(top[0].data).copy(), backend.to_host(top[1].data).copy()))
    return out
