"""The array module: NumPy always, CuPy when installed and asked for.

This is the only module that imports CuPy. Layers never choose a module themselves:
they ask a blob for its ``xp`` (see :mod:`netengine.blob`).
"""
from __future__ import annotations

import types

import numpy as np

from netengine.errors import NetEngineError

_state = {"mode": "cpu", "device": 0, "seed": None}
_rng: list[np.random.Generator] = [np.random.default_rng()]


def _import_cupy() -> types.ModuleType | None:
    try:
        import cupy
    except Exception:
        return None
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    cupy = _import_cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def set_mode_cpu() -> None:
    _state["mode"] = "cpu"


def set_mode_gpu() -> None:
    """Switch new blobs to CuPy arrays; one clear error where no GPU can be used."""
    cupy = _import_cupy()
    if cupy is None:
        raise NetEngineError(
            "GPU mode needs CuPy: install the gpu extra (pip install 'netengine[gpu]'); "
            "CPU mode works without it")
    if not cupy_available():
        raise NetEngineError("GPU mode asked for, but CuPy sees no CUDA device on this machine")
    _state["mode"] = "gpu"
    cupy.cuda.Device(_state["device"]).use()


def set_device(device_id: int) -> None:
    _state["device"] = int(device_id)
    if _state["mode"] == "gpu":
        _import_cupy().cuda.Device(int(device_id)).use()


def mode() -> str:
    return _state["mode"]


def xp() -> types.ModuleType:
    """The array module new blobs are allocated with."""
    if _state["mode"] == "gpu":
        return _import_cupy()
    return np


def get_array_module(array) -> types.ModuleType:
    """NumPy or CuPy, whichever owns ``array``."""
    if isinstance(array, np.ndarray) or np.isscalar(array):
        return np
    cupy = _import_cupy()
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy
    return np


def to_host(array) -> np.ndarray:
    """A NumPy array with the contents of ``array`` (no copy when it is one already)."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()


def to_module(array, module: types.ModuleType):
    """``array`` on the device of ``module`` (numpy: host, cupy: current GPU)."""
    if module is np:
        return to_host(array)
    return module.asarray(array)


def set_random_seed(seed: int) -> None:
    """Seed every random stream netengine draws from (fillers, dropout, data shuffling)."""
    _state["seed"] = int(seed)
    _rng[0] = np.random.default_rng(int(seed))
    cupy = _import_cupy()
    if cupy is not None and cupy_available():
        # Seeded whatever the mode, so CuPy arrays used in CPU mode repeat their draws too.
        cupy.random.seed(int(seed))


def get_random_seed() -> int | None:
    """The seed last given to :func:`set_random_seed` (None when never seeded)."""
    return _state["seed"]


def rng() -> np.random.Generator:
    """The host random generator (fillers draw here, then copy to the device)."""
    return _rng[0]


def random_uniform(module: types.ModuleType, shape: tuple, dtype) -> object:
    """U[0,1) samples on ``module``'s device; NumPy draws from the seeded host generator."""
    if module is np:
        return _rng[0].random(shape, dtype=np.float64).astype(dtype, copy=False)
    return module.random.random_sample(shape).astype(dtype, copy=False)
