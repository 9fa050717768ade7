"""The array module and the device: NumPy always, CuPy when installed and asked for.

This is the only module that imports CuPy (:mod:`netengine.ops.cuda_kernels` builds CuPy
kernels and is imported only once CuPy is in use). Layers never choose a module themselves:
they ask a blob for its ``xp`` (see :mod:`netengine.blob`).

Device model (docs/GPU.md): after :func:`set_mode_gpu` every new Blob allocates its data and
diff with CuPy on the current device, and they stay there across iterations; ``blob.data`` and
``blob.diff`` are then CuPy arrays and ``blob.host_data()``/``host_diff()`` NumPy copies. Device
memory comes from CuPy's default memory pool, so after the first iteration no pass calls
``cudaMalloc`` again; :func:`device_memory_peak` reports what the pool reached.
"""
from __future__ import annotations

import os
import types

import numpy as np

from netengine.errors import NetEngineError
from netengine.ops import cuda_kernels

_state = {"mode": "cpu", "device": 0, "seed": None}
_rng: list[np.random.Generator] = [np.random.default_rng()]
_cupy: dict = {}  # "module": the imported CuPy (or None), "error": why the import failed
_memory = {"peak": 0, "tracking": False}

GPU_INSTALL_HINT = ("install the gpu extra: pip install 'netengine[gpu]' (cupy-cuda12x), or "
                    "pip install cupy-cuda13x for CUDA 13")


# -- CuPy and the device ----------------------------------------------------------------------
def _import_cupy() -> types.ModuleType | None:
    """CuPy, or None where it is not installed or fails to import (the reason is kept)."""
    if "module" not in _cupy:
        try:
            import cupy
        except Exception as err:  # ImportError, or CuPy's own errors on a broken install
            _cupy["module"], _cupy["error"] = None, err
        else:
            _cupy["module"], _cupy["error"] = cupy, None
    return _cupy["module"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def gpu_unavailable_reason(device_id: int | None = None) -> str | None:
    """Why GPU mode cannot be used (one line), or None when it can."""
    cupy = _import_cupy()
    if cupy is None:
        err = _cupy.get("error")
        if isinstance(err, ModuleNotFoundError):
            return f"GPU mode needs CuPy, which is not installed: {GPU_INSTALL_HINT}"
        return (f"GPU mode needs CuPy, which failed to import ({_first_line(err)}); "
                f"{GPU_INSTALL_HINT}")
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as err:
        return (f"CuPy is installed but cannot reach CUDA ({_first_line(err)}): check the "
                "NVIDIA driver and that the cupy-cudaXXx package matches the CUDA version")
    if count == 0:
        return "CuPy is installed but sees no CUDA device on this machine"
    if device_id is not None and not 0 <= int(device_id) < count:
        return (f"GPU {device_id} asked for, but this machine has {count} CUDA device(s) "
                f"(ids 0..{count - 1})")
    return None


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    return gpu_unavailable_reason() is None


def set_mode_cpu() -> None:
    _state["mode"] = "cpu"


def set_mode_gpu() -> None:
    """New blobs become CuPy arrays on the current device; one clear error where no GPU can
    be used (CPU mode keeps working)."""
    reason = gpu_unavailable_reason(_state["device"])
    if reason is not None:
        raise NetEngineError(reason)
    _state["mode"] = "gpu"
    _import_cupy().cuda.Device(_state["device"]).use()


def set_device(device_id: int) -> None:
    """Choose the GPU that GPU mode uses (Caffe's ``set_device``; call before building nets)."""
    device_id = int(device_id)
    if device_id < 0:
        raise NetEngineError(f"a GPU device id is 0 or more, got {device_id}")
    _state["device"] = device_id
    if _state["mode"] == "gpu":
        reason = gpu_unavailable_reason(device_id)
        if reason is not None:
            raise NetEngineError(reason)
        _import_cupy().cuda.Device(device_id).use()


def select_gpu(device_id: int = 0) -> None:
    """``set_device(device_id)`` then ``set_mode_gpu()``: what ``--gpu N`` and
    ``solver_mode: GPU`` (with ``device_id``) mean."""
    set_device(device_id)
    set_mode_gpu()


def mode() -> str:
    return _state["mode"]


def device_id() -> int:
    return _state["device"]


def xp() -> types.ModuleType:
    """The array module new blobs are allocated with."""
    if _state["mode"] == "gpu":
        return _import_cupy()
    return np


def is_device_module(module: types.ModuleType) -> bool:
    """True for CuPy (arrays on a GPU), False for NumPy."""
    return module is not np


def synchronize() -> None:
    """Wait for the current GPU's queued work (a no-op in CPU mode); time GPU code with it."""
    if _state["mode"] == "gpu":
        _import_cupy().cuda.get_current_stream().synchronize()


# -- arrays across host and device ------------------------------------------------------------
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
    if hasattr(array, "get"):
        return array.get()
    return np.asarray(array)


def host_copy(array) -> np.ndarray:
    """A NumPy copy of ``array`` that never aliases it (NumPy or CuPy)."""
    host = to_host(array)
    return host.copy() if host is array else host


def to_module(array, module: types.ModuleType):
    """``array`` on the device of ``module`` (numpy: host, cupy: current GPU)."""
    if module is np:
        return to_host(array)
    return module.asarray(array)


def copy_into(dst, src) -> None:
    """``dst[...] = src`` where ``src`` may live on the other side (host or device).

    A NumPy ``src`` going into a contiguous CuPy ``dst`` of the same size is one direct
    host-to-device copy (``ndarray.set``) with no temporary device array; anything else falls
    back to an assignment. This is what data layers use for each batch.
    """
    if isinstance(dst, np.ndarray):
        dst[...] = to_host(src)
        return
    if isinstance(src, np.ndarray):
        if dst.flags.c_contiguous and src.size == dst.size:
            dst.set(np.ascontiguousarray(src, dtype=dst.dtype).reshape(dst.shape))
            return
        src = get_array_module(dst).asarray(src, dtype=dst.dtype)
    dst[...] = src


def pinned_empty(shape, dtype) -> np.ndarray:
    """A NumPy array in page-locked (pinned) host memory when CuPy is usable, else an ordinary
    one: a data layer may prepare batches in it so host-to-device copies run at full speed."""
    if _state["mode"] == "gpu":
        import cupyx

        return cupyx.empty_pinned(tuple(shape), dtype=dtype)
    return np.empty(tuple(shape), dtype=dtype)


def scatter_add(xp_module: types.ModuleType, target, index, values) -> None:
    """``target[index] += values`` with repeated indices summed (NumPy's ``add.at``) on either
    module: ``np.add.at`` on NumPy, ``cupy.add.at`` (CuPy 13+) or ``cupyx.scatter_add``."""
    add_at = getattr(xp_module.add, "at", None)
    if add_at is not None:
        add_at(target, index, values)
        return
    import cupyx

    cupyx.scatter_add(target, index, values)


# -- device memory ----------------------------------------------------------------------------
MAX_ELEMENTS = 2 ** 40  # no blob is ever this large: a hostile or mistyped shape
_limits: dict[str, int] = {}


def memory_limit(xp_module: types.ModuleType) -> int:
    """Bytes an array on ``xp_module`` can have at most: the GPU's memory for CuPy, the
    machine's physical memory for NumPy (asked once, no allocation)."""
    kind = "gpu" if xp_module is not np else "cpu"
    if kind not in _limits:
        try:
            if kind == "gpu":
                _limits[kind] = int(xp_module.cuda.Device().mem_info[1])
            else:
                _limits[kind] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # unknown here: only the element cap
            _limits[kind] = MAX_ELEMENTS * 8
    return _limits[kind]


def fits_in_memory(count: int, itemsize: int, xp_module: types.ModuleType) -> bool:
    """Whether ``count`` values of ``itemsize`` bytes can be allocated at all (checked before
    allocating, so that a hostile size is refused instead of asking for exabytes)."""
    return count <= MAX_ELEMENTS and count * itemsize <= memory_limit(xp_module)


def memory_pool():
    """CuPy's default device memory pool (every blob and temporary comes from it), or None
    where CuPy is not in use."""
    cupy = _import_cupy() if _state["mode"] == "gpu" else None
    return None if cupy is None else cupy.get_default_memory_pool()


def track_device_memory(enable: bool = True) -> None:
    """Record the peak of device bytes in use, allocation by allocation (a thin wrapper around
    the pool's ``malloc``; off by default because it costs a Python call per allocation)."""
    pool = memory_pool()
    if pool is None:
        return
    cupy = _import_cupy()
    if not enable:
        cupy.cuda.set_allocator(pool.malloc)
        _memory["tracking"] = False
        return

    def malloc(size):
        memory = pool.malloc(size)
        used = pool.used_bytes()
        if used > _memory["peak"]:
            _memory["peak"] = used
        return memory

    cupy.cuda.set_allocator(malloc)
    _memory["tracking"] = True


def device_memory_used() -> int:
    """Device bytes held by live arrays now (0 in CPU mode)."""
    pool = memory_pool()
    return 0 if pool is None else int(pool.used_bytes())


def device_memory_peak() -> int:
    """Peak device bytes since the last :func:`reset_device_memory_peak` (0 in CPU mode).

    With :func:`track_device_memory` on: the peak of bytes in use. Otherwise: the bytes the
    pool holds, which only grows between resets, so it is the peak the pool reserved. Neither
    counts cuBLAS/cuDNN handles and workspaces allocated outside the pool.
    """
    pool = memory_pool()
    if pool is None:
        return 0
    held = int(pool.total_bytes())
    return max(_memory["peak"], held if not _memory["tracking"] else 0)


def reset_device_memory_peak() -> None:
    """Return the pool's free blocks to the device and restart the peak from what is in use."""
    pool = memory_pool()
    if pool is None:
        return
    pool.free_all_blocks()
    _memory["peak"] = int(pool.used_bytes())


def device_summary() -> str:
    """One line naming the GPU, CuPy, CUDA and cuDNN (or why GPU mode is unavailable)."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        return f"no GPU: {reason}"
    cupy = _import_cupy()
    dev = _state["device"]
    try:
        props = cupy.cuda.runtime.getDeviceProperties(dev)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        memory = f", {props['totalGlobalMem'] / 2**30:.0f} GiB"
    except Exception:
        name, memory = "unknown", ""
    runtime = cupy.cuda.runtime.runtimeGetVersion()

    cudnn = cuda_kernels.cudnn_version()
    return (f"GPU {dev}: {name}{memory}; CuPy {cupy.__version__}, CUDA runtime "
            f"{runtime // 1000}.{runtime % 1000 // 10}; cuDNN "
            f"{cudnn if cudnn else 'not available through CuPy'}")


# -- random streams ---------------------------------------------------------------------------
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
