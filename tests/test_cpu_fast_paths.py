"""The CPU fast paths (issue 6) against their plain definitions.

Tiled MAX pooling in several cache chunks, general MAX windows in plane chunks, the bias
folded into the convolution GEMMs when the bias gradient is off, and the fused SGD update
(bitwise the same as the per-param steps); and a steady-state training step that allocates
no buffers.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from google.protobuf import text_format

import netengine
import netengine.ops.pool_ops as pool_ops
from netengine.blob import Blob
from netengine.ops.pool_ops import FLT_MAX, pooled_size
from netengine.proto import caffe_pb2
from netengine.solvers import SGDSolver, Solver
from netengine.testing import make_blobs, make_layer, setup_layer


def caffe_max_pool(x, kernel, stride, pad, out):
    """Caffe's MAX scan, loop by loop: (y, choice) with choice = 1 + kernel offset number."""
    n, c, height, width = x.shape
    y = np.full((n, c, *out), -FLT_MAX, dtype=x.dtype)
    choice = np.zeros((n, c, *out), dtype=np.int64)
    for i, j, ph, pw in itertools.product(range(n), range(c), range(out[0]), range(out[1])):
        best, pick = -FLT_MAX, 0
        for k, (a, b) in enumerate(itertools.product(range(kernel[0]), range(kernel[1]))):
            h, w = ph * stride[0] - pad[0] + a, pw * stride[1] - pad[1] + b
            if 0 <= h < height and 0 <= w < width and x[i, j, h, w] > best:
                best, pick = x[i, j, h, w], k + 1
        y[i, j, ph, pw], choice[i, j, ph, pw] = best, pick
    return y, choice


def route(dy, choice, shape, kernel, stride, pad):
    dx = np.zeros(shape)
    for i, j, ph, pw in itertools.product(*(range(s) for s in dy.shape)):
        k = choice[i, j, ph, pw] - 1
        if k >= 0:
            dx[i, j, ph * stride[0] - pad[0] + k // kernel[1],
               pw * stride[1] - pad[1] + k % kernel[1]] += dy[i, j, ph, pw]
    return dx


def tricky_input(shape, dtype, seed=0):
    """Random values rounded to 0.5 (ties), some NaN and -inf, and one window of NaN."""
    x = np.round(np.random.default_rng(seed).normal(size=shape) * 2) / 2
    x = x.astype(dtype)
    flat = x.reshape(-1)
    flat[::7] = np.nan
    flat[3::11] = -np.inf
    x[0, 0, :2, :2] = np.nan  # a whole 2x2 window with nothing above -FLT_MAX: choice 0
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", [
    ((5, 3, 6, 8), (2, 2), (2, 2), (0, 0)),  # tiles (LeNet's 2x2/2)
    ((4, 2, 6, 6), (3, 3), (3, 3), (0, 0)),  # tiles, 3x3
    ((3, 2, 7, 7), (3, 3), (2, 2), (0, 0)),  # overlapping, overhang (ceil)
    ((3, 2, 6, 7), (3, 3), (1, 1), (1, 1)),  # padding (inception style)
], ids=str)
def test_max_pooling_chunks_match_caffe(monkeypatch, geometry, dtype):
    shape, kernel, stride, pad = geometry
    monkeypatch.setattr(pool_ops, "TILE_CHUNK_BYTES", 200)  # one item or plane per chunk
    out = tuple(pooled_size(s, k, st, p, True, any(pad))
                for s, k, st, p in zip(shape[2:], kernel, stride, pad))
    layer = make_layer(f'type: "Pooling" pooling_param {{ pool: MAX kernel_h: {kernel[0]} '
                       f'kernel_w: {kernel[1]} stride_h: {stride[0]} stride_w: {stride[1]} '
                       f'pad_h: {pad[0]} pad_w: {pad[1]} }}')
    bottom = [Blob(shape, dtype=dtype)]
    x = tricky_input(shape, dtype)
    bottom[0].data[...] = x
    top = setup_layer(layer, bottom)
    assert top[0].shape == shape[:2] + out
    if pad == (0, 0) and kernel == stride and all(s % k == 0 for s, k in zip(shape[2:], kernel)):
        assert layer.pool.tiles and len(layer.pool.tile_chunks()) == shape[0]
    layer.forward(bottom, top)
    want_y, want_choice = caffe_max_pool(x, kernel, stride, pad, out)
    np.testing.assert_array_equal(top[0].data, want_y)
    np.testing.assert_array_equal(layer.choice, want_choice)
    dy = np.random.default_rng(1).normal(size=top[0].shape)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, route(dy, want_choice, shape, kernel, stride, pad),
                               rtol=1e-6)


def test_tiled_pooling_scatter_path_without_empty_windows(monkeypatch):
    """Every window has a maximum: backward takes the scatter path, chunk by chunk."""
    monkeypatch.setattr(pool_ops, "TILE_CHUNK_BYTES", 1000)
    shape = (6, 4, 8, 6)
    layer = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }')
    bottom = make_blobs([shape], dtype=np.float32)
    top = setup_layer(layer, bottom)
    assert len(layer.pool.tile_chunks()) > 1
    layer.forward(bottom, top)
    x = bottom[0].data.copy()
    want_y, want_choice = caffe_max_pool(x, (2, 2), (2, 2), (0, 0), (4, 3))
    np.testing.assert_array_equal(top[0].data, want_y)
    assert layer.choice.all()
    top[0].diff[...] = np.arange(top[0].count).reshape(top[0].shape)
    bottom[0].diff[...] = np.nan  # must be overwritten everywhere
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(
        bottom[0].diff, route(top[0].diff, want_choice, shape, (2, 2), (2, 2), (0, 0)))


@pytest.mark.parametrize("order", ["item-minor", "per-item"])
def test_conv_bias_row_with_bias_gradient_off(monkeypatch, order):
    """The columns carry the bias row; with the bias gradient off only dW accumulates, and
    with only the bias gradient on it is Σ dy."""
    import netengine.ops.im2col as im2col_ops

    minor = order == "item-minor"
    monkeypatch.setattr(im2col_ops, "ITEM_MINOR_MIN_ITEMS", 1 if minor else 1 << 30)
    monkeypatch.setattr(im2col_ops, "ITEM_MINOR_MAX_WIDTH", 1 << 30 if minor else 0)
    text = ('type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 '
            'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } }')
    results = {}
    for need in ((True, True), (True, False), (False, True)):
        netengine.set_random_seed(3)
        layer = make_layer(text)
        bottom = make_blobs([(4, 2, 6, 5)], seed=2)
        top = setup_layer(layer, bottom)
        assert layer.gemm.bias_row and layer.gemm.item_minor == minor
        layer.param_propagate_down = list(need)
        layer.forward(bottom, top)
        top[0].diff[...] = np.random.default_rng(5).normal(size=top[0].shape)
        for blob in layer.blobs:
            blob.diff[...] = 0.25  # accumulates onto this
        layer.backward(top, [True], bottom)
        results[need] = (layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy(),
                         bottom[0].diff.copy(), top[0].diff.sum(axis=(0, 2, 3)))
    dw, db, dx, bias_grad = results[(True, True)]
    np.testing.assert_allclose(db, 0.25 + bias_grad, rtol=1e-12)
    np.testing.assert_allclose(results[(True, False)][0], dw, rtol=1e-12)
    np.testing.assert_array_equal(results[(True, False)][1], 0.25)
    np.testing.assert_array_equal(results[(False, True)][0], 0.25)
    np.testing.assert_allclose(results[(False, True)][1], db, rtol=1e-12)
    for need in results:
        np.testing.assert_allclose(results[need][2], dx, rtol=1e-12)


NET = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 6 dim: 2 dim: 5 dim: 5 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 6 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "conv"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" }
    bias_filler { type: "constant" value: 0.1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
"""


@pytest.mark.parametrize("extra", ["", "iter_size: 2", 'regularization_type: "L1"',
                                   "clip_gradients: 0.01"])
def test_fused_sgd_update_is_bitwise_the_per_param_update(tmp_path, monkeypatch, extra,
                                                           cpu_path):
    import netengine.solvers.sgd as solver_module

    monkeypatch.setattr(solver_module, "UPDATE_BLOCK", 7)  # many blocks, a ragged last one
    text = ('base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 lr_policy: "inv" gamma: 0.1 '
            f'power: 0.75 max_iter: 100 display: 0 snapshot: 0 random_seed: 5 {extra}')
    runs = []
    for fused in (True, False):
        param = text_format.Parse(text, caffe_pb2.SolverParameter())
        text_format.Parse(NET, param.net_param)
        path = tmp_path / f"solver_{fused}.prototxt"
        path.write_text(text_format.MessageToString(param))
        solver = SGDSolver(str(path))
        if not fused:
            solver.apply_update = lambda s=solver: Solver.apply_update(s)
        rng = np.random.default_rng(0)
        for _ in range(4):
            solver.net.blobs["x"].data[...] = rng.normal(size=(6, 2, 5, 5))
            solver.net.blobs["y"].data[...] = rng.normal(size=(6, 4))
            solver.step(1)
        runs.append([b.data.copy() for b in solver.net.learnable_params]
                    + [b.diff.copy() for b in solver.net.learnable_params]
                    + [h.data.copy() for h in solver.history])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


LENET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 32 dim: 1 dim: 28
  dim: 28 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def test_steady_state_training_allocates_no_buffers(tmp_path, cpu_path):
    """After warm-up a LeNet SGD step reuses every blob, work buffer and history array: the
    most it allocates at once is a few small temporaries, far below its smallest buffer
    (pool2's top, 100 KiB here; the conv columns are 1.6–4 MiB)."""
    import tracemalloc

    text = ('base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001 '
            'power: 0.75 max_iter: 100 display: 0 snapshot: 0 random_seed: 5')
    param = text_format.Parse(text, caffe_pb2.SolverParameter())
    text_format.Parse(LENET, param.net_param)
    path = tmp_path / "solver.prototxt"
    path.write_text(text_format.MessageToString(param))
    solver = SGDSolver(str(path))
    rng = np.random.default_rng(0)
    batches = [(rng.random((32, 1, 28, 28), dtype=np.float32),
                rng.integers(0, 10, 32).astype(np.float32)) for _ in range(3)]

    def step(i: int) -> None:
        solver.net.blobs["data"].data[...] = batches[i % 3][0]
        solver.net.blobs["label"].data[...] = batches[i % 3][1]
        solver.step(1)

    for i in range(3):  # warm-up: buffers sized, kernels compiled
        step(i)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i in range(3):
            step(i)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Measured: 76 KiB NumPy-only (ufunc buffers in pooling's backward), 53 KiB compiled.
    assert peak - start < 96 * 1024, f"a step allocated {(peak - start) / 1024:.0f} KiB at once"
