"""The compiled CPU loops (netengine.ops.jit, Numba): each against the NumPy code it replaces.

Skipped where Numba is not installed; the NumPy paths are covered by the rest of the suite
(and by these tests' reference runs, which switch the compiled loops off).
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import jit_state

from netengine.ops import jit
from netengine.ops.pool_ops import Pool2d, pooled_size

pytestmark = pytest.mark.skipif(not jit.available(), reason="Numba is not installed")

def _pool(shape, kernel, stride, pad, ceil_mode, dtype=np.float32):
    out = tuple(pooled_size(s, k, st, p, ceil_mode, any(pad))
                for s, k, st, p in zip(shape[2:], kernel, stride, pad))
    pool = Pool2d()
    pool.configure(np, np.dtype(dtype), shape, kernel, stride, pad, out)
    return pool, out


def _max_pool_pass(geometry, x, dy, compiled: bool):
    with jit_state(compiled):
        pool, out = _pool(*geometry, dtype=x.dtype)
        y = np.empty(x.shape[:2] + out, x.dtype)
        choice = np.empty(y.shape, pool.index_dtype())
        assert pool._compiled(x, y, choice) == compiled  # the path under test really runs
        pool.max_forward(x, y, choice)
        dx = np.full_like(x, np.nan)
        pool.route_backward(dy, choice, dx)
        return y, choice, dx


MAX_GEOMETRIES = [  # shape, kernel, stride, pad, ceil mode
    ((3, 4, 8, 8), (2, 2), (2, 2), (0, 0), True),  # LeNet's tiles: the pair kernels
    ((2, 3, 9, 7), (2, 2), (2, 2), (0, 0), False),  # pairs, the last row/column uncovered
    ((2, 3, 9, 9), (3, 3), (2, 2), (1, 1), True),  # overlapping, padded: scatter kernel
    ((2, 2, 7, 7), (3, 3), (2, 2), (0, 0), True),  # windows over the far edge
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", MAX_GEOMETRIES, ids=str)
def test_compiled_max_pooling_matches_the_numpy_path(geometry, dtype):
    rng = np.random.default_rng(7)
    x = rng.normal(size=geometry[0]).astype(dtype)
    x.reshape(-1)[::5] = x.reshape(-1)[0]  # ties: the first maximum wins
    x.reshape(-1)[3::11] = np.nan  # never taken
    x.reshape(-1)[7::13] = -np.inf
    x[0, 0] = -np.inf  # a plane with no value above -FLT_MAX: choice 0, y = -FLT_MAX
    pool, out = _pool(*geometry[:4], geometry[4], dtype)
    dy = rng.normal(size=x.shape[:2] + out).astype(dtype)
    want = _max_pool_pass(geometry, x, dy, compiled=False)
    got = _max_pool_pass(geometry, x, dy, compiled=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert not (got[1][0, 0] != 0).any()
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("regularization", ["L2", "L1"])
def test_compiled_sgd_update_is_bitwise_the_numpy_update(regularization):
    rng = np.random.default_rng(11)
    w, g, h = (rng.normal(size=1000).astype(np.float32) for _ in range(3))
    w[:3] = (0.0, -0.0, np.nan)
    f = np.float32
    scale, decay, momentum, lr = f(0.5), f(5e-4), f(0.9), f(0.01)
    wj, gj, hj = w.copy(), g.copy(), h.copy()
    jit.sgd_update(wj, gj, hj, scale, decay, regularization == "L1", momentum, lr)
    g = g * scale
    g = g + (np.sign(w) * decay if regularization == "L1" else w * decay)
    h = h * momentum + g * lr
    np.testing.assert_array_equal(hj, h)
    np.testing.assert_array_equal(gj, h)
    np.testing.assert_array_equal(wj, w - h)


CONV_GEOMETRIES = [  # x shape, c_y, kernel, stride, pad, dilation
    ((16, 20, 12, 12), 50, (5, 5), (1, 1), (0, 0), (1, 1)),  # LeNet's conv2: item-minor
    ((9, 3, 11, 10), 4, (3, 2), (2, 3), (1, 0), (1, 1)),  # strided, padded, odd sizes
    ((8, 2, 9, 9), 3, (3, 3), (1, 1), (2, 2), (2, 2)),  # dilated
    ((2, 3, 20, 19), 4, (3, 3), (1, 1), (1, 1), (1, 1)),  # per-item: GoogLeNet-like 3x3
    ((3, 2, 23, 21), 5, (7, 5), (2, 3), (3, 1), (1, 2)),  # per-item: strided, dilated
    ((2, 2, 18, 18), 3, (5, 5), (1, 1), (0, 0), (1, 1)),  # per-item, no padding
    ((2, 1, 17, 17), 2, (3, 3), (4, 4), (0, 0), (1, 1)),  # stride past the kernel: gaps
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=str)
def test_compiled_col2im_is_bitwise_the_numpy_path(geometry, dtype, monkeypatch):
    from netengine.ops.im2col import ConvGemm, conv_output_size

    shape, c_y, kernel, stride, pad, dilation = geometry
    out = tuple(conv_output_size(*a) for a in zip(shape[2:], kernel, stride, pad, dilation))
    rng = np.random.default_rng(3)
    w = rng.normal(size=(c_y, shape[1], *kernel)).astype(dtype)
    dy = rng.normal(size=(shape[0], c_y, *out)).astype(dtype)
    calls = []
    for name in ("col2im_offset_major", "col2im_planes"):
        kernel_fn = getattr(jit, name)
        monkeypatch.setattr(jit, name, lambda *a, f=kernel_fn: (calls.append(1), f(*a)))
    results = []
    for compiled in (False, True):
        with jit_state(compiled):
            gemm = ConvGemm(kernel, stride, pad, dilation)
            gemm.configure(np, np.dtype(dtype), shape[0], shape[1], shape[2:], c_y, out)
            dx = np.full(shape, np.nan, dtype)
            gemm.conv_backward(None, dy, w, dx=dx)
            results.append(dx)
            assert len(calls) == compiled  # the path under test really ran
    np.testing.assert_array_equal(results[1], results[0])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=str)
def test_compiled_im2col_is_bitwise_the_numpy_path(geometry, bias, monkeypatch):
    from netengine.ops.im2col import ConvGemm, conv_output_size

    shape, c_y, kernel, stride, pad, dilation = geometry
    out = tuple(conv_output_size(*a) for a in zip(shape[2:], kernel, stride, pad, dilation))
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(c_y, shape[1], *kernel)).astype(np.float32)
    b = rng.normal(size=c_y).astype(np.float32) if bias else None
    calls = []
    kernel_fn = jit.im2col_planes
    monkeypatch.setattr(jit, "im2col_planes", lambda *a: (calls.append(1), kernel_fn(*a)))
    results = []
    for compiled in (False, True):
        with jit_state(compiled):
            gemm = ConvGemm(kernel, stride, pad, dilation)
            gemm.configure(np, np.dtype(np.float32), shape[0], shape[1], shape[2:], c_y, out,
                           bias=bias)
            cols = gemm.im2col(x)
            cols_copy = cols.copy()
            gemm._buffer("cols", cols.shape)[...] = np.nan  # nothing stale may survive
            gemm._ones_state = None
            y = np.full((shape[0], c_y, *out), np.nan, np.float32)
            gemm.conv(x, w, y, b)
            results.append((cols_copy, y))
            assert len(calls) == 2 * (compiled and not gemm.item_minor)  # the path ran
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])
