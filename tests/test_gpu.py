"""netengine on a real GPU: NumPy and CuPy agree, the kernels match the generic code, LeNet
trains the same. Every test is marked ``gpu`` and skips cleanly without CuPy or a GPU
(``pytest -m gpu`` on the GPU machine; CI runs ``-m "not gpu"`` or just skips them).

Tolerance: max abs error <= 1e-4 * max |NumPy value| per array (``device_agreement``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN, HAVE_GPU, REPO
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
from netengine.ops import cuda_kernels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAVE_GPU, reason="CuPy with a usable GPU is not available")]


@pytest.fixture
def cp():
    import cupy

    yield cupy
    backend.set_mode_cpu()


# -- plumbing ----------------------------------------------------------------------------------
def test_device_plumbing(cp):
    netengine.set_device(0)
    netengine.set_mode_gpu()
    assert backend.xp() is cp
    blob = Blob((64, 1, 28, 28))
    assert isinstance(blob.data, cp.ndarray) and isinstance(blob.diff, cp.ndarray)
    host = np.random.default_rng(0).random((64, 1, 28, 28)).astype(np.float32)
    backend.copy_into(blob.data, host)  # one host-to-device copy into the blob
    np.testing.assert_array_equal(blob.host_data(), host)
    assert isinstance(blob.host_diff(), np.ndarray)
    target = cp.zeros(4, dtype=cp.float32)
    backend.scatter_add(cp, target, cp.asarray([1, 1, 3]), cp.asarray([1.0, 2.0, 5.0],
                                                                       dtype=cp.float32))
    assert target.get().tolist() == [0.0, 3.0, 0.0, 5.0]
    backend.synchronize()
    assert backend.device_memory_peak() >= blob.count * 4
    backend.track_device_memory(True)
    try:
        backend.reset_device_memory_peak()
        extra = cp.ones(1 << 20, dtype=cp.float32)
        assert backend.device_memory_peak() >= extra.nbytes
    finally:
        backend.track_device_memory(False)
    assert backend.device_summary().startswith("GPU 0:")
    pinned = backend.pinned_empty((4, 4), np.float32)
    pinned[...] = 1
    backend.copy_into(cp.zeros((4, 4), dtype=cp.float32), pinned)


def test_bad_device_id_is_one_line(cp):
    count = cp.cuda.runtime.getDeviceCount()
    with pytest.raises(NetEngineError, match=f"this machine has {count} CUDA device"):
        backend.select_gpu(count)
    backend.set_device(0)


def test_net_weights_move_between_host_and_device(cp, tmp_path):
    """copy_from and save move weights host<->device; CPU and GPU nets share caffemodels."""
    golden = GOLDEN / "lenet_train.prototxt"
    if not golden.exists():
        pytest.skip("golden LeNet absent")
    netengine.set_mode_gpu()
    gpu_net = netengine.Net(str(golden), netengine.TRAIN,
                            weights=str(GOLDEN / "lenet_init.caffemodel"))
    gpu_net.save(str(tmp_path / "from_gpu.caffemodel"))
    backend.set_mode_cpu()
    cpu_net = netengine.Net(str(golden), netengine.TRAIN,
                            weights=str(tmp_path / "from_gpu.caffemodel"))
    for name, blobs in cpu_net.params.items():
        for cpu_blob, gpu_blob in zip(blobs, gpu_net.params[name]):
            assert isinstance(gpu_blob.data, cp.ndarray)
            np.testing.assert_array_equal(cpu_blob.data, gpu_blob.host_data())


# -- every layer: NumPy vs CuPy ------------------------------------------------------------------
@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["name"])
def test_golden_case_numpy_vs_cupy(case, cp, golden_dir):
    missing = missing_types(case["layer_types_in_net"])
    if missing:
        pytest.skip(f"layer type(s) not implemented yet: {missing}")
    assert_agree(run_golden_case(case, False), run_golden_case(case, True), case["name"])


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.name)
def test_layer_snippet_numpy_vs_cupy(snippet, cp):
    assert_agree(run_snippet(snippet, False), run_snippet(snippet, True), snippet.name)


def test_random_layers_on_gpu(cp):
    """Dropout and STOCHASTIC pooling draw from CuPy's generator on GPU: checked by property."""
    netengine.set_mode_gpu()
    bottom = testing.make_blobs([(8, 4, 10, 10)], xp=cp, dtype=np.float32)
    layer = testing.make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.25 }')
    top = testing.setup_layer(layer, bottom)
    testing.forward(layer, bottom, top)
    x, y = bottom[0].host_data(), top[0].host_data()
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.03
    bottom = testing.make_blobs([(2, 3, 9, 9)], xp=cp, dtype=np.float32)
    bottom[0].data[...] = cp.abs(bottom[0].data) + 0.1
    layer = testing.make_layer('type: "Pooling" pooling_param { pool: STOCHASTIC '
                               'kernel_size: 3 stride: 2 }')
    top = testing.setup_layer(layer, bottom)
    testing.forward(layer, bottom, top)
    values = set(np.round(bottom[0].host_data().ravel(), 6))
    assert set(np.round(top[0].host_data().ravel(), 6)) <= values  # each output is an input


# -- kernels -------------------------------------------------------------------------------------
CONV_GEOMETRIES = [((8, 20, 12, 12), (5, 5), (1, 1), (0, 0), (1, 1)),
                   ((2, 3, 9, 8), (3, 3), (2, 1), (1, 2), (2, 1))]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=str)
@pytest.mark.parametrize("item_minor", [False, True])
def test_column_kernels_match_convgemm(geometry, item_minor, cp):
    from netengine.ops.im2col import ConvGemm, conv_output_size

    shape, kernel, stride, pad, dilation = geometry
    n, c, h, w = shape
    out = tuple(conv_output_size(s, k, st, p, d)
                for s, k, st, p, d in zip((h, w), kernel, stride, pad, dilation))
    gemm = ConvGemm(kernel, stride, pad, dilation)
    gemm.configure(cp, np.dtype(np.float32), n, c, (h, w), 4, out, item_minor=item_minor)
    x = cp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    want = gemm.im2col(x).copy()
    cols = cp.empty_like(want)
    layout = "item_minor" if item_minor else "item_major"
    cuda_kernels.im2col_2d(x, cols, kernel, stride, pad, dilation, out, layout=layout)
    cp.testing.assert_array_equal(cols, want)
    grad = cp.asarray(np.random.default_rng(1).normal(size=want.shape).astype(np.float32))
    want_dx, dx = cp.empty(shape, cp.float32), cp.empty(shape, cp.float32)
    gemm.col2im(grad, want_dx)
    cuda_kernels.col2im_2d(grad, dx, kernel, stride, pad, dilation, out, layout=layout)
    cp.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", [((64, 20, 24, 24), (2, 2), (2, 2), (0, 0)),
                                      ((2, 3, 7, 7), (3, 3), (2, 2), (1, 1))], ids=str)
def test_pooling_kernels_match_pool_ops(geometry, cp):
    from netengine.ops.pool_ops import Pool2d, pooled_size

    shape, kernel, stride, pad = geometry
    out = tuple(pooled_size(s, k, st, p, True, any(pad))
                for s, k, st, p in zip(shape[2:], kernel, stride, pad))
    pool = Pool2d()
    pool.configure(cp, np.dtype(np.float32), shape, kernel, stride, pad, out)
    x = cp.asarray(np.random.default_rng(2).normal(size=shape).astype(np.float32))
    y_shape = shape[:2] + out
    index = pool.index_dtype()
    want_y, want_c = cp.empty(y_shape, cp.float32), cp.empty(y_shape, index)
    pool.max_forward(x, want_y, want_c)
    y, choice = cp.empty(y_shape, cp.float32), cp.empty(y_shape, index)
    cuda_kernels.max_pool_2d(x, y, choice, kernel, stride, pad, base=1)
    cp.testing.assert_array_equal(y, want_y)
    cp.testing.assert_array_equal(choice, want_c)
    dy = cp.asarray(np.random.default_rng(3).normal(size=y_shape).astype(np.float32))
    want_dx, dx = cp.empty(shape, cp.float32), cp.empty(shape, cp.float32)
    pool.route_backward(dy, want_c, want_dx)
    cuda_kernels.pool_route_backward_2d(dy, choice, dx, kernel, stride, pad, base=1)
    cp.testing.assert_array_equal(dx, want_dx)
    inv = cp.asarray(1.0 / pool.ave_divisor(), dtype=cp.float32)
    pool.window_sums(x, want_y)
    want_y *= inv
    cuda_kernels.ave_pool_2d(x, y, kernel, stride, pad)
    cp.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    pool.spread_backward(dy * inv, want_dx)
    cuda_kernels.ave_pool_backward_2d(dy, dx, kernel, stride, pad)
    cp.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)


def test_sgd_update_kernel(cp):
    rng = np.random.default_rng(4)
    w, g, h = (rng.normal(size=1000).astype(np.float32) for _ in range(3))
    dw, dg, dh = cp.asarray(w), cp.asarray(g), cp.asarray(h)
    cuda_kernels.sgd_update(dw, dg, dh, local_rate=0.01, momentum=0.9, decay=5e-4)
    want_h = np.float32(0.01) * (g + np.float32(5e-4) * w) + np.float32(0.9) * h
    np.testing.assert_allclose(dh.get(), want_h, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(dg.get(), dh.get())


def test_cudnn_convolution_matches_generic(cp):
    if cuda_kernels.cudnn_version() is None:
        pytest.skip("this CuPy has no cuDNN support (CuPy 14 removed it): im2col + cuBLAS only")
    netengine.set_mode_gpu()
    rng = np.random.default_rng(5)
    x = cp.asarray(rng.normal(size=(4, 6, 11, 10)).astype(np.float32))
    text = ('type: "Convolution" convolution_param { num_output: 8 kernel_size: 3 stride: 2 '
            'pad: 1 group: 2 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
    layer = testing.make_layer(text)
    bottom = [Blob(x.shape, dtype=np.float32, xp=cp)]
    bottom[0].data[...] = x
    top = testing.setup_layer(layer, bottom)
    layer.forward(bottom, top)
    dy = cp.asarray(rng.normal(size=top[0].shape).astype(np.float32))
    top[0].diff[...] = dy
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.backward(top, [True], bottom)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    args = dict(stride=(2, 2), pad=(1, 1), dilation=(1, 1), group=2)
    assert cuda_kernels.cudnn_conv_supported(cp, x, w, **{k: v for k, v in args.items()
                                                      if k != "group"}, group=2)
    y = cp.empty_like(top[0].data)
    cuda_kernels.cudnn_conv_forward(x, w, b, y, **args)
    cp.testing.assert_allclose(y, top[0].data, rtol=1e-4, atol=1e-4)
    dx, dw, db = cp.empty_like(x), cp.zeros_like(w), cp.zeros_like(b)
    cuda_kernels.cudnn_conv_backward(x, w, dy, dx=dx, dw=dw, db=db, **args)
    cp.testing.assert_allclose(dx, bottom[0].diff, rtol=1e-4, atol=1e-4)
    cp.testing.assert_allclose(dw, layer.blobs[0].diff, rtol=1e-4, atol=1e-3)
    cp.testing.assert_allclose(db, layer.blobs[1].diff, rtol=1e-4, atol=1e-3)


# -- LeNet: 40 solver iterations, steady-state memory, tools/train ---------------------------------
def _lenet_run(tmp_path: Path, device: bool, iterations: int = 40):
    from netengine.solvers import get_solver

    data = np.load(GOLDEN / "lenet_data.npz")
    images = data["images_uint8"].astype(np.float32)[:, None] * np.float32(0.00390625)
    labels = data["labels"].astype(np.float32)
    text = (GOLDEN / "lenet_solver_sgd.prototxt").read_text().replace(
        'net: "lenet_train.prototxt"', f'net: "{GOLDEN / "lenet_train.prototxt"}"')
    path = tmp_path / f"solver_{int(device)}.prototxt"
    path.write_text(text)
    if device:
        backend.set_mode_gpu()
    try:
        solver = get_solver(str(path))
        solver.net.copy_from(str(GOLDEN / "lenet_init.caffemodel"))
        losses, pool_bytes = [], []
        for it in range(iterations):
            solver.net.blobs["data"].data[...] = images[64 * it:64 * it + 64]
            solver.net.blobs["label"].data[...] = labels[64 * it:64 * it + 64]
            solver.step(1)
            losses.append(float(solver.smoothed_loss))
            pool_bytes.append(backend.device_memory_peak())
        params = {name: [b.host_data() for b in blobs]
                  for name, blobs in solver.net.params.items()}
        return np.array(losses), params, pool_bytes
    finally:
        backend.set_mode_cpu()


def test_lenet_40_iterations_gpu_vs_cpu(cp, tmp_path, golden_dir):
    pytest.importorskip("netengine.solvers")
    if not (GOLDEN / "lenet_data.npz").exists():
        pytest.skip("golden LeNet data absent")
    cpu_losses, cpu_params, _ = _lenet_run(tmp_path, False)
    gpu_losses, gpu_params, pool_bytes = _lenet_run(tmp_path, True)
    rel = np.abs(gpu_losses - cpu_losses) / np.abs(cpu_losses)
    assert rel.max() <= 1e-4, f"loss curves differ by {rel.max():.3g} relative"
    caffe = np.load(GOLDEN / "lenet_run_sgd.npz")["loss_per_iter"]
    assert np.max(np.abs(gpu_losses - caffe)) <= 2e-4
    for name in cpu_params:
        for i, (a, b) in enumerate(zip(cpu_params[name], gpu_params[name])):
            err = np.max(np.abs(a - b)) / np.max(np.abs(a))
            assert err <= 1e-4, f"final {name}/{i} differs by {err:.3g} relative"
    # The memory pool serves every pass after the first ones: no growth in the steady state.
    assert pool_bytes[-1] == pool_bytes[5], f"device pool grew: {pool_bytes[5]} -> {pool_bytes[-1]}"


def _train_command(tmp_path: Path, gpu: bool, max_iter: int) -> list[str]:
    """tools/train on nets/mnist_solver.prototxt (absolute net path, no snapshots)."""
    solver = (REPO / "nets" / "mnist_solver.prototxt").read_text()
    solver = solver.replace('net: "nets/mnist_train_test.prototxt"',
                            f'net: "{REPO / "nets" / "mnist_train_test.prototxt"}"')
    solver += (f"\ntest_interval: {max_iter}\nsnapshot: 0\nsnapshot_after_train: false\n"
               f'snapshot_prefix: "{tmp_path / "lenet"}"\n')
    path = tmp_path / f"solver_{'gpu' if gpu else 'cpu'}.prototxt"
    path.write_text(solver)
    return [sys.executable, str(REPO / "tools" / "train"), "--solver", str(path),
            "--max_iter", str(max_iter)] + (["--gpu", "0"] if gpu else [])


def _train_accuracies(tmp_path: Path, max_iter: int, timeout: int = 300) -> dict[str, float]:
    """Final test accuracy of tools/train on GPU and on CPU, both runs at the same time."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = {kind: subprocess.Popen(_train_command(tmp_path, kind == "gpu", max_iter), cwd=REPO,
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
             for kind in ("gpu", "cpu")}
    accuracies = {}
    for kind, proc in procs.items():
        try:
            _, log = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            raise
        assert proc.returncode == 0, f"{kind} run failed:\n{log[-2000:]}"
        found = re.findall(r"Test net output #\d+: accuracy = ([0-9.]+)", log)
        assert found, log[-2000:]
        accuracies[kind] = float(found[-1])
    return accuracies


@pytest.mark.slow
def test_train_tool_gpu_reaches_cpu_accuracy(cp, tmp_path):
    """tools/train --gpu 0 on nets/mnist_solver.prototxt (500 iterations) = the CPU run."""
    if not (REPO / "data" / "mnist").exists():
        pytest.skip("embedded MNIST data absent")
    accuracy = _train_accuracies(tmp_path, 500)
    gpu, cpu = accuracy["gpu"], accuracy["cpu"]
    assert gpu >= 0.95 and abs(gpu - cpu) <= 0.005, f"GPU accuracy {gpu} vs CPU {cpu}"
