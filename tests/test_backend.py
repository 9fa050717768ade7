"""The backend (device plumbing, host/device helpers) and the GPU code path without a GPU.

No test here needs CuPy. The GPU path runs on ``fake_cupy``: an array module with CuPy's
rules (no implicit host conversion, no NumPy arrays inside device operations, only names CuPy
has), monkeypatched in as ``cupy``. Every golden case, every layer snippet of
``device_agreement`` and a few LeNet solver iterations run in GPU mode on it and must agree
with CPU mode, so NumPy-only calls in layers, ops, the net and the solver fail here, on a CPU
machine, before they would fail on a GPU.
"""
from __future__ import annotations

import ast
import ctypes
import functools
import math
import shutil
import subprocess
from pathlib import Path

import fake_cupy
import numpy as np
import pytest
from conftest import GOLDEN, REPO
from device_agreement import (
    SNIPPETS,
    assert_agree,
    golden_cases,
    missing_types,
    run_golden_case,
    run_snippet,
)

import netengine
from netengine import backend, testing
from netengine.blob import Blob
from netengine.errors import NetEngineError
from netengine.layers import REGISTRY
from netengine.ops import cuda_kernels

fcp = fake_cupy.cupy


@pytest.fixture
def fake_gpu(monkeypatch):
    """GPU mode backed by fake_cupy for the test's duration."""
    monkeypatch.setattr(backend, "_import_cupy", lambda: fcp)
    yield fcp
    backend.set_mode_cpu()


@pytest.fixture
def no_cupy(monkeypatch):
    """As on a machine where CuPy is not installed."""
    monkeypatch.setitem(backend._cupy, "module", None)
    monkeypatch.setitem(backend._cupy, "error", ModuleNotFoundError("No module named 'cupy'"))
    yield
    backend.set_mode_cpu()


# -- backend without a GPU -------------------------------------------------------------------
def test_gpu_mode_without_cupy_is_one_clear_line(no_cupy):
    reason = backend.gpu_unavailable_reason()
    assert "not installed" in reason and "pip install" in reason and "cupy-cuda" in reason
    assert "\n" not in reason
    with pytest.raises(NetEngineError, match="netengine\\[gpu\\]"):
        netengine.set_mode_gpu()
    assert backend.mode() == "cpu" and not backend.cupy_available()
    assert Blob((2,)).xp is np  # CPU mode keeps working


def test_broken_cupy_install_names_the_error(monkeypatch):
    monkeypatch.setitem(backend._cupy, "module", None)
    monkeypatch.setitem(backend._cupy, "error", ImportError("CuPy is not correctly installed.\n"
                                                           "long explanation"))
    reason = backend.gpu_unavailable_reason()
    assert "failed to import (ImportError: CuPy is not correctly installed.)" in reason
    assert "\n" not in reason


def test_device_checks(fake_gpu, monkeypatch):
    with pytest.raises(NetEngineError, match="0 or more"):
        backend.set_device(-1)
    backend.set_device(3)
    try:
        with pytest.raises(NetEngineError, match="GPU 3 asked for, but this machine has 1"):
            backend.set_mode_gpu()
    finally:
        backend.set_device(0)
    monkeypatch.setattr(fcp.cuda.runtime, "getDeviceCount", lambda: 0)
    assert "sees no CUDA device" in backend.gpu_unavailable_reason()


def test_cpu_mode_helpers():
    a = np.arange(6.0).reshape(2, 3)
    assert backend.to_host(a) is a
    copy = backend.host_copy(a)
    assert copy is not a and np.array_equal(copy, a)
    dst = np.zeros((2, 3))
    backend.copy_into(dst, a)
    assert np.array_equal(dst, a)
    target = np.zeros(4)
    backend.scatter_add(np, target, np.array([1, 1, 3]), np.array([1.0, 2.0, 5.0]))
    assert target.tolist() == [0.0, 3.0, 0.0, 5.0]
    assert backend.device_memory_peak() == 0 and backend.memory_pool() is None
    backend.synchronize()
    assert backend.pinned_empty((2, 2), np.float32).shape == (2, 2)


def test_blob_host_copies():
    blob = Blob((2, 3), dtype=np.float64)
    blob.data[...] = 1.5
    host = blob.host_data()
    host[...] = 0
    assert float(blob.data.sum()) == 9.0  # a copy, never a view
    assert blob.host_diff().shape == (2, 3)


# -- the fake CuPy itself ------------------------------------------------------------------------
def test_fake_cupy_has_cupys_rules():
    x = fcp.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    with pytest.raises(TypeError, match="NumPy array was mixed"):
        x + np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="NumPy array was mixed"):
        np.ones(3, dtype=np.float32) * x
    with pytest.raises(TypeError, match="NumPy array was mixed"):
        fcp.maximum(x, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-scalar numpy"):
        fcp.copyto(x, np.zeros((2, 3)))
    with pytest.raises(AttributeError, match="CuPy does not"):
        fcp.nditer  # noqa: B018
    with pytest.raises(NotImplementedError):
        fcp.multiply.at(x, 0, 2.0)
    with pytest.raises(ValueError, match="kind"):
        fcp.argsort(x, kind="quicksort")
    assert isinstance(x[0, 1], fcp.ndarray) and x[0, 1].ndim == 0  # 0-d, not a NumPy scalar
    assert isinstance(x.sum(), fcp.ndarray) and float(x.sum()) == 15.0
    x[...] = np.ones((2, 3))  # assigning host values is allowed, as in CuPy
    assert isinstance(np.sum(x), fcp.ndarray)  # __array_function__ dispatch, as in CuPy
    fcp.add.at(x, fcp.asarray([0, 0]), 1.0)
    assert x.get()[0].tolist() == [3.0, 3.0, 3.0]
    target = fcp.zeros(3)
    backend.scatter_add(fcp, target, fcp.asarray([2, 2]), fcp.asarray([1.0, 2.0]))
    assert target.get().tolist() == [0.0, 0.0, 3.0]


def test_gpu_mode_blobs_live_on_the_device(fake_gpu):
    netengine.set_mode_gpu()
    assert backend.mode() == "gpu" and backend.xp() is fcp
    blob = Blob((2, 3))
    assert isinstance(blob.data, fcp.ndarray) and isinstance(blob.diff, fcp.ndarray)
    blob.data[...] = np.arange(6).reshape(2, 3)
    host = blob.host_data()
    assert isinstance(host, np.ndarray) and host.tolist() == [[0, 1, 2], [3, 4, 5]]
    dst = fcp.zeros((2, 3), dtype=np.float32)
    backend.copy_into(dst, np.full((2, 3), 7.0))  # host -> device via ndarray.set
    assert dst.get().tolist() == [[7.0] * 3] * 2
    backend.copy_into(dst[:, :2], np.zeros((2, 2)))  # not contiguous: plain assignment
    assert dst.get()[:, 2].tolist() == [7.0, 7.0]
    assert backend.device_memory_peak() == 0  # the fake pool holds nothing
    backend.track_device_memory(True)
    backend.track_device_memory(False)
    backend.reset_device_memory_peak()
    assert "fake_cupy" in backend.device_summary()


# -- every layer through the GPU code path --------------------------------------------------------
@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["name"])
def test_golden_case_on_fake_gpu(case, fake_gpu, golden_dir):
    missing = missing_types(case["layer_types_in_net"])
    if missing:
        pytest.skip(f"layer type(s) not implemented yet: {missing}")
    assert_agree(run_golden_case(case, False), run_golden_case(case, True), case["name"])


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.name)
def test_layer_snippet_on_fake_gpu(snippet, fake_gpu):
    assert_agree(run_snippet(snippet, False), run_snippet(snippet, True), snippet.name)


def test_every_registered_type_is_covered():
    """Each registered type has a golden case or a snippet, or reads files/host data only."""
    host_only = {"Data", "HDF5Data", "HDF5Output", "ImageData", "WindowData", "MemoryData", "Input",
                 "Python"}
    covered = {t for c in golden_cases() for t in c["layer_types_in_net"]}
    covered |= {s.text.split('"')[1] for s in SNIPPETS}
    if not GOLDEN.exists():
        pytest.skip("golden cases absent")
    netengine.layer_type_list()
    engine_types = {name for name, cls in REGISTRY.items()
                    if cls.__module__.startswith("netengine.layers")}  # not tests' own types
    missing = sorted(engine_types - covered - host_only)
    assert not missing, f"add a device_agreement snippet for: {missing}"


def test_lenet_solver_steps_on_fake_gpu(fake_gpu, tmp_path, golden_dir):
    """Three LeNet SGD iterations (golden net, weights and data) in GPU mode agree with CPU."""
    solver_module = pytest.importorskip("netengine.solvers")
    data = np.load(golden_dir / "lenet_data.npz")
    images = data["images_uint8"][:192, None].astype(np.float32) * np.float32(0.00390625)
    labels = data["labels"][:192].astype(np.float32)
    text = (golden_dir / "lenet_solver_sgd.prototxt").read_text().replace(
        'net: "lenet_train.prototxt"', f'net: "{golden_dir / "lenet_train.prototxt"}"')
    (tmp_path / "solver.prototxt").write_text(text)

    def run(device: bool):
        if device:
            backend.set_mode_gpu()
        try:
            solver = solver_module.get_solver(str(tmp_path / "solver.prototxt"))
            solver.net.copy_from(str(golden_dir / "lenet_init.caffemodel"))
            losses = []
            for it in range(3):
                solver.net.blobs["data"].data[...] = images[64 * it:64 * it + 64]
                solver.net.blobs["label"].data[...] = labels[64 * it:64 * it + 64]
                solver.step(1)
                losses.append(float(solver.smoothed_loss))
            return losses, {name: [b.host_data() for b in blobs]
                            for name, blobs in solver.net.params.items()}
        finally:
            backend.set_mode_cpu()

    cpu_losses, cpu_params = run(False)
    gpu_losses, gpu_params = run(True)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-5)
    for name in cpu_params:
        for a, b in zip(cpu_params[name], gpu_params[name]):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_snapshot_and_restore_on_fake_gpu(fmt, fake_gpu, tmp_path, golden_dir):
    """Snapshots copy device weights and history to the host; restore copies them back."""
    solver_module = pytest.importorskip("netengine.solvers")
    if fmt == "HDF5":
        pytest.importorskip("h5py")
    text = (golden_dir / "tiny_solver_sgd.prototxt").read_text().replace(
        'net: "tiny_net.prototxt"', f'net: "{golden_dir / "tiny_net.prototxt"}"').replace(
        'snapshot_prefix: "tiny_sgd"', f'snapshot_prefix: "{tmp_path / "tiny"}"')
    path = tmp_path / "solver.prototxt"
    path.write_text(text + f"\nsnapshot_format: {fmt}\n")
    rng = np.random.default_rng(0)
    backend.set_mode_gpu()
    solver = solver_module.get_solver(str(path))
    solver.net.blobs["x"].data[...] = rng.normal(size=(4, 3))
    solver.net.blobs["y"].data[...] = rng.normal(size=(4, 2))
    solver.step(2)
    _, state = solver.snapshot()
    again = solver_module.get_solver(str(path))
    again.restore(state)
    assert again.iter == 2
    for a, b in zip(solver.net.learnable_params, again.net.learnable_params):
        assert isinstance(b.data, fcp.ndarray)
        np.testing.assert_array_equal(a.host_data(), b.host_data())
    for a, b in zip(solver.history, again.history):
        np.testing.assert_array_equal(a.host_data(), b.host_data())


def test_data_layers_feed_the_device(fake_gpu, monkeypatch):
    """Data (IDX files, prefetch thread) and MemoryData fill device blobs: LeNet's TEST net
    gives the same outputs in GPU mode as in CPU mode."""
    if not (REPO / "data" / "mnist").exists():
        pytest.skip("embedded MNIST data absent")
    monkeypatch.chdir(REPO)
    outputs = []
    for device in (False, True):
        if device:
            backend.set_mode_gpu()
        backend.set_random_seed(1701)
        net = netengine.Net(str(REPO / "nets" / "mnist_train_test.prototxt"), netengine.TEST)
        net.forward()
        outputs.append({name: net.blobs[name].host_data() for name in net.outputs})
        assert isinstance(net.blobs["data"].data, fcp.ndarray if device else np.ndarray)
        for layer in net.layers:
            getattr(layer, "close", lambda: None)()
        backend.set_mode_cpu()
    assert_agree(outputs[0], outputs[1], "LeNet TEST net")
    backend.set_mode_gpu()
    layer = testing.make_layer('type: "MemoryData" memory_data_param { batch_size: 2 '
                               'channels: 1 height: 2 width: 2 }')
    tops = [Blob(()), Blob(())]
    layer.setup([], tops)
    layer.reset(np.arange(24, dtype=np.float32).reshape(6, 1, 2, 2), np.arange(6.0))
    layer.forward([], tops)
    layer.forward([], tops)
    assert isinstance(tops[0].data, fcp.ndarray)
    assert tops[1].host_data().tolist() == [2.0, 3.0]


# -- static audit --------------------------------------------------------------------------------
COMPUTE_METHODS = {"compute_forward", "compute_backward", "forward", "backward", "reshape"}
PASS_METHODS = {"compute_forward", "compute_backward", "forward", "backward"}
HOST_SIDE_FILES = {"data.py", "python_layer.py",  # read files / call user code on the host
                   "jit.py"}  # the Numba CPU loops: used only on NumPy arrays
# (call prefix, why, where): where "all" = every compute method and every ops function,
# "pass" = only the forward/backward passes (reshape may build host constants with NumPy).
FORBIDDEN_CALLS = {
    ("np", "add", "at"): ("np.add.at works on NumPy only: use backend.scatter_add(xp, ...)", "all"),
    ("np", "lib"): ("np.lib.stride_tricks is NumPy only: use xp.lib.stride_tricks", "all"),
    ("np", "random"): ("np.random draws on the host: use backend.random_uniform(xp, ...)", "all"),
    ("np", "copyto"): ("NumPy only: use xp.copyto", "all"),
    ("np", "einsum"): ("NumPy only: use xp.einsum", "all"),
    ("np", "where"): ("NumPy only: use xp.where", "all"),
    ("np", "zeros_like"): ("NumPy only: use xp.zeros_like", "all"),
    ("np", "empty_like"): ("NumPy only: use xp.empty_like", "all"),
    ("np", "asarray"): ("np.asarray on a device array raises: use backend.to_host or "
                        "xp.asarray", "pass"),
    ("np", "array"): ("np.array on a device array raises: use backend.to_host or xp.asarray",
                      "pass"),
    ("np", "ascontiguousarray"): ("NumPy only: use xp.ascontiguousarray", "pass"),
}


def _dotted(node) -> tuple[str, ...]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def _audit(path: Path) -> list[str]:
    problems = []
    tree = ast.parse(path.read_text())
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        in_ops = path.parent.name == "ops"
        if not in_ops and func.name not in COMPUTE_METHODS:
            continue
        in_pass = func.name in PASS_METHODS
        for node in ast.walk(func):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                for prefix, (why, where) in FORBIDDEN_CALLS.items():
                    if name[:len(prefix)] == prefix and (where == "all" or in_pass):
                        problems.append(f"{path.name}:{node.lineno} {'.'.join(name)}: {why}")
                        break
                if name[-1:] == ("tolist",) and (in_pass or in_ops):
                    problems.append(f"{path.name}:{node.lineno} .tolist() copies device data to "
                                    "the host every pass")
    return problems


def test_layers_avoid_numpy_only_calls():
    """Layers' compute methods and the ops kernels call no NumPy-only functions on data."""
    files = sorted((REPO / "netengine" / "layers").glob("*.py"))
    files += sorted((REPO / "netengine" / "ops").glob("*.py"))
    problems = [p for f in files if f.name not in HOST_SIDE_FILES for p in _audit(f)]
    assert not problems, "NumPy-only calls in the GPU code path:\n" + "\n".join(problems)


# -- the CUDA kernels' arithmetic, compiled for the host ---------------------------------------
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@functools.cache
def _host_kernel(name: str, dtype: str, index_dtype: str | None, build_dir: str):
    """cuda_kernels.py's CUDA source compiled with the host C++ compiler (NE_CPU: a plain loop)."""
    source, func = cuda_kernels.kernel_source(name, dtype, index_dtype)
    src = Path(build_dir) / f"{func}.cpp"
    lib = src.with_suffix(".so")
    src.write_text("#define NE_CPU 1\n" + source)
    subprocess.run([CXX, "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                   capture_output=True)
    return getattr(ctypes.CDLL(str(lib)), func)


def _call(kernel, *args) -> None:
    converted = []
    for a in args:
        if isinstance(a, np.ndarray):
            assert a.flags.c_contiguous
            converted.append(ctypes.c_void_p(a.ctypes.data))
        elif isinstance(a, np.int64):
            converted.append(ctypes.c_longlong(int(a)))
        else:
            converted.append(ctypes.c_int(int(a)))
    kernel(*converted)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler to check the kernel sources with")
    return str(tmp_path_factory.mktemp("kernels"))


CONV_GEOMETRIES = [  # (n, C, H, W), kernel, stride, pad, dilation
    ((2, 3, 7, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((1, 2, 9, 8), (3, 2), (2, 3), (0, 1), (1, 1)),
    ((3, 2, 10, 9), (3, 3), (2, 1), (2, 0), (2, 3)),
    ((2, 1, 5, 5), (5, 5), (1, 1), (0, 0), (1, 1)),
    ((8, 2, 12, 12), (5, 5), (1, 1), (0, 0), (1, 1)),  # LeNet-like: ConvGemm goes item-minor
    ((9, 2, 7, 8), (3, 3), (2, 1), (1, 2), (1, 2)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=str)
def test_im2col_col2im_sources_match_convgemm(geometry, dtype, build_dir):
    from netengine.ops.im2col import ConvGemm, conv_output_size

    shape, kernel, stride, pad, dilation = geometry
    n, c, h, w = shape
    out = tuple(conv_output_size(s, k, st, p, d)
                for s, k, st, p, d in zip((h, w), kernel, stride, pad, dilation))
    gemm = ConvGemm(kernel, stride, pad, dilation)
    gemm.configure(np, np.dtype(dtype), n, c, (h, w), 4, out)
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape).astype(dtype)
    want = gemm.im2col(x).copy()
    layout = "item_minor" if gemm.item_minor else "item_major"
    (m1, m2), roles, strides = cuda_kernels._layout(layout, c * math.prod(kernel), n, math.prod(out))
    cols = np.empty_like(want)
    args = (n, c, h, w, *kernel, *stride, *pad, *out, *dilation)
    _call(_host_kernel("im2col", dtype, None, build_dir), x, cols, np.int64(cols.size), *args,
          np.int64(m1), np.int64(m2), *roles)
    np.testing.assert_array_equal(cols, want)

    grad_cols = rng.normal(size=want.shape).astype(dtype)
    want_dx = np.empty(shape, dtype=dtype)
    gemm.col2im(grad_cols, want_dx)
    dx = np.full(shape, np.nan, dtype=dtype)
    _call(_host_kernel("col2im", dtype, None, build_dir), grad_cols, dx, np.int64(dx.size),
          *args, *(np.int64(v) for v in strides))
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6 if dtype == "float32" else 1e-13,
                               atol=1e-6 if dtype == "float32" else 1e-13)


POOL_GEOMETRIES = [  # (n, C, H, W), kernel, stride, pad, ceil mode
    ((2, 3, 8, 8), (2, 2), (2, 2), (0, 0), True),  # LeNet: tiles the input
    ((2, 2, 7, 7), (3, 3), (2, 2), (0, 0), True),  # windows hang over the far edge
    ((1, 2, 6, 7), (3, 3), (2, 2), (1, 1), True),  # padding, clipped last window
    ((1, 1, 5, 6), (3, 2), (1, 2), (1, 0), False),
    ((1, 2, 4, 4), (4, 4), (1, 1), (0, 0), True),  # global
]


def _pool(shape, kernel, stride, pad, ceil_mode, dtype):
    from netengine.ops.pool_ops import Pool2d, pooled_size

    out = tuple(pooled_size(s, k, st, p, ceil_mode, any(pad))
                for s, k, st, p in zip(shape[2:], kernel, stride, pad))
    pool = Pool2d()
    pool.configure(np, np.dtype(dtype), shape, kernel, stride, pad, out)
    return pool, out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("geometry", POOL_GEOMETRIES, ids=str)
def test_pooling_sources_match_pool_ops(geometry, dtype, build_dir, numpy_path):
    shape, kernel, stride, pad, ceil_mode = geometry
    pool, out = _pool(shape, kernel, stride, pad, ceil_mode, dtype)
    n, c, h, w = shape
    args = (n, c, h, w, *kernel, *stride, *pad, *out)
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape).astype(dtype)
    x.reshape(-1)[::7] = x.reshape(-1)[1]  # ties: the first maximum must win
    index = np.dtype(pool.index_dtype())
    y_shape = (n, c, *out)

    want_y, want_choice = np.empty(y_shape, dtype), np.empty(y_shape, index)
    pool.max_forward(x, want_y, want_choice)
    y, choice = np.empty(y_shape, dtype), np.empty(y_shape, index)
    base = 1  # pool_ops numbers its choice 1 + kernel offset, 0 for none
    _call(_host_kernel("max_pool", dtype, index.name, build_dir), x, y, choice,
          np.int64(y.size), *args, base)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(choice, want_choice)

    dy = rng.normal(size=y_shape).astype(dtype)
    want_dx, dx = np.empty(shape, dtype), np.full(shape, np.nan, dtype)
    pool.route_backward(dy, want_choice, want_dx)
    _call(_host_kernel("pool_route_backward", dtype, index.name, build_dir), dy, choice, dx,
          np.int64(dx.size), *args, base)
    np.testing.assert_array_equal(dx, want_dx)

    inv = (1.0 / pool.ave_divisor()).astype(dtype)
    want_y = np.empty(y_shape, dtype)
    pool.window_sums(x, want_y)
    want_y *= inv
    _call(_host_kernel("ave_pool", dtype, None, build_dir), x, y, np.int64(y.size), *args)
    np.testing.assert_array_equal(y, want_y)
    pool.spread_backward(dy * inv, want_dx)
    _call(_host_kernel("ave_pool_backward", dtype, None, build_dir), dy, dx, np.int64(dx.size),
          *args)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-7)
