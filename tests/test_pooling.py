"""Pooling and SPP: Caffe's output sizes, window rules, gradients, errors."""
from __future__ import annotations

import numpy as np
import pytest

from netengine import backend
from netengine.blob import Blob
from netengine.errors import LayerError
from netengine.ops.pool_ops import FLT_MAX, pooled_size
from netengine.testing import TEST, TRAIN, check_gradient, make_blobs, make_layer, setup_layer


def host(a):
    return backend.to_host(a)


def pooling(params: str, phase=TRAIN):
    return make_layer(f'type: "Pooling" pooling_param {{ {params} }}', phase=phase)


def distinct_blob(shape, xp, seed=0, low=-1.0, high=1.0):
    """A blob whose values are all different and at least 0.01 apart (no max ties)."""
    count = int(np.prod(shape))
    values = np.linspace(low, high, count) if (high - low) / count >= 0.01 else \
        np.arange(count) * 0.01 + low
    values = np.random.default_rng(seed).permutation(values).reshape(shape)
    blob = Blob(shape, dtype=np.float64, xp=xp)
    blob.data[...] = xp.asarray(values)
    return blob


def windows(height, width, k, s, p, out):
    """Caffe's windows: (row range, column range, AVE divisor) for each output cell."""
    for ph in range(out[0]):
        for pw in range(out[1]):
            hs, ws = ph * s[0] - p[0], pw * s[1] - p[1]
            he, we = min(hs + k[0], height + p[0]), min(ws + k[1], width + p[1])
            size = (he - hs) * (we - ws)
            yield ph, pw, (max(hs, 0), min(he, height)), (max(ws, 0), min(we, width)), size


def ref_pool(x, k, s, p, out, method):
    n, c, height, width = x.shape
    y = np.zeros((n, c, *out))
    arg = np.full((n, c, *out), -1.0)
    for ph, pw, (h0, h1), (w0, w1), size in windows(height, width, k, s, p, out):
        win = x[:, :, h0:h1, w0:w1].reshape(n, c, -1)
        if method == "MAX":
            if win.shape[2] == 0:
                y[:, :, ph, pw] = -FLT_MAX
                continue
            first = win.argmax(axis=2)  # first occurrence in raster order
            y[:, :, ph, pw] = win.max(axis=2)
            arg[:, :, ph, pw] = (h0 + first // (w1 - w0)) * width + w0 + first % (w1 - w0)
        else:
            y[:, :, ph, pw] = win.sum(axis=2) / size
    return y, arg


@pytest.mark.parametrize("size, k, s, p, ceil, expected", [
    (8, 3, 2, 0, True, 4), (7, 3, 2, 0, True, 3), (5, 2, 2, 1, True, 3), (8, 3, 2, 0, False, 3),
    (6, 3, 2, 1, True, 4), (24, 2, 2, 0, True, 12), (5, 1, 3, 0, True, 3), (4, 3, 2, 1, True, 3),
    (4, 3, 2, 1, False, 2)])
def test_pooled_size_ceil_and_clip(size, k, s, p, ceil, expected):
    assert pooled_size(size, k, s, p, ceil, clip=p > 0) == expected


@pytest.mark.parametrize("params, shape, top_shape", [
    ("kernel_size: 3 stride: 2", (1, 2, 8, 8), (1, 2, 4, 4)),
    ("kernel_size: 2 stride: 2 pad: 1", (1, 2, 5, 5), (1, 2, 3, 3)),
    ("kernel_size: 3 stride: 2 round_mode: FLOOR", (1, 2, 8, 8), (1, 2, 3, 3)),
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (1, 1, 6, 5),
     (1, 1, 4, 4)),
])
def test_pooling_top_shapes(xp, params, shape, top_shape):
    for method in ("MAX", "AVE"):
        top = setup_layer(pooling(f"pool: {method} {params}"), make_blobs([shape], xp=xp))
        assert top[0].shape == top_shape


GEOMETRIES = [  # (params, bottom shape, kernel, stride, pad)
    ("kernel_size: 3 stride: 2", (2, 2, 8, 8), (3, 3), (2, 2), (0, 0)),
    ("kernel_size: 3 stride: 2", (1, 2, 7, 7), (3, 3), (2, 2), (0, 0)),
    ("kernel_size: 2 stride: 2 pad: 1", (2, 2, 5, 5), (2, 2), (2, 2), (1, 1)),
    ("kernel_size: 3 stride: 2 pad: 1", (1, 2, 6, 6), (3, 3), (2, 2), (1, 1)),
    ("kernel_size: 2 stride: 2", (2, 3, 4, 6), (2, 2), (2, 2), (0, 0)),
    ("kernel_size: 3 stride: 1", (1, 2, 5, 5), (3, 3), (1, 1), (0, 0)),
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (1, 2, 6, 5),
     (3, 2), (2, 1), (1, 0)),
    ("kernel_size: 3 stride: 2 round_mode: FLOOR", (1, 2, 8, 8), (3, 3), (2, 2), (0, 0)),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("params, shape, k, s, p", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_pooling_forward_and_gradient(xp, method, params, shape, k, s, p):
    layer = pooling(f"pool: {method} {params}")
    bottom = [distinct_blob(shape, xp)]
    top = setup_layer(layer, bottom, 2 if method == "MAX" else 1)
    layer.forward(bottom, top)
    expected, arg = ref_pool(host(bottom[0].data), k, s, p, top[0].shape[2:], method)
    np.testing.assert_allclose(host(top[0].data), expected, rtol=1e-12, atol=1e-15)
    if method == "MAX":
        np.testing.assert_array_equal(host(top[1].data), arg)
        check_gradient(layer, bottom, top[:1])
    else:
        check_gradient(layer, bottom, top)


def test_ave_divisor_counts_padding_but_not_overhang(xp):
    # H = W = 6, k3 s2 p1: output 4; the last window covers 1 image row + 1 pad row.
    layer = pooling("pool: AVE kernel_size: 3 stride: 2 pad: 1")
    bottom = [Blob((1, 1, 6, 6), dtype=np.float64, xp=xp)]
    bottom[0].data[...] = 1.0
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    y = host(top[0].data)[0, 0]
    assert y.shape == (4, 4)
    # Row windows start at -1, 1, 3, 5 and end at min(start + 3, 6 + 1): divisors 3, 3, 3, 2;
    # the real rows they hold are 2, 3, 3, 1 (columns alike).
    real, divisor = np.array([2, 3, 3, 1]), np.array([3, 3, 3, 2])
    np.testing.assert_allclose(y, np.outer(real, real) / np.outer(divisor, divisor), rtol=1e-12)
    assert y[0, 0] == pytest.approx(4 / 9) and y[3, 3] == pytest.approx(1 / 4)


def test_max_ties_take_the_first_maximum(xp):
    layer = pooling("pool: MAX kernel_size: 2 stride: 2")
    bottom = [Blob((1, 1, 2, 4), dtype=np.float64, xp=xp)]
    bottom[0].data[...] = xp.asarray([[[[1.0, 3.0, 2.0, 2.0], [3.0, 0.0, 2.0, 2.0]]]])
    top = setup_layer(layer, bottom, 2)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(host(top[0].data), [[[[3.0, 2.0]]]])
    np.testing.assert_array_equal(host(top[1].data), [[[[1.0, 2.0]]]])
    top[0].diff[...] = xp.asarray([[[[10.0, 20.0]]]])
    bottom[0].diff[...] = 99.0
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(host(bottom[0].diff),
                                  [[[[0, 10.0, 20.0, 0], [0, 0, 0, 0]]]])


def test_max_window_past_the_input_gives_minus_flt_max(xp):
    # pad 0 and stride > kernel: ceil rounding puts the last window wholly past the input.
    layer = pooling("pool: MAX kernel_size: 1 stride: 3")
    bottom = [distinct_blob((1, 2, 5, 5), xp)]
    top = setup_layer(layer, bottom, 2)
    assert top[0].shape == (1, 2, 3, 3)
    layer.forward(bottom, top)
    y, mask = host(top[0].data), host(top[1].data)
    assert np.all(y[:, :, 2, :] == -FLT_MAX) and np.all(y[:, :, :, 2] == -FLT_MAX)
    assert np.all(mask[:, :, 2, :] == -1) and np.all(mask[:, :, :, 2] == -1)
    np.testing.assert_array_equal(y[:, :, :2, :2], host(bottom[0].data)[:, :, ::3, ::3])
    top[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    assert host(bottom[0].diff).sum() == 2 * 4


def test_max_ignores_nan_like_caffe(xp):
    layer = pooling("pool: MAX kernel_size: 2")
    bottom = [Blob((1, 1, 2, 2), dtype=np.float64, xp=xp)]
    bottom[0].data[...] = xp.asarray([[[[np.nan, 1.0], [2.0, -1.0]]]])
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    assert float(host(top[0].data)[0, 0, 0, 0]) == 2.0


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling_recomputes_the_kernel(xp, method):
    layer = pooling(f"pool: {method} global_pooling: true")
    bottom = [distinct_blob((2, 3, 5, 6), xp)]
    top = setup_layer(layer, bottom)
    assert top[0].shape == (2, 3, 1, 1)
    for shape in ((2, 3, 5, 6), (1, 3, 4, 3)):
        bottom = [distinct_blob(shape, xp, seed=shape[2])]
        layer.forward(bottom, top)
        x = host(bottom[0].data)
        expected = x.max(axis=(2, 3)) if method == "MAX" else x.mean(axis=(2, 3))
        np.testing.assert_allclose(host(top[0].data)[:, :, 0, 0], expected, rtol=1e-12)
    check_gradient(layer, bottom, top)


def test_stochastic_test_phase_is_sum_of_squares_over_sum(xp):
    layer = pooling("pool: STOCHASTIC kernel_size: 3 stride: 2", phase=TEST)
    bottom = [distinct_blob((1, 2, 7, 8), xp, low=0.1, high=2.0)]
    top = setup_layer(layer, bottom)
    assert top[0].shape == (1, 2, 3, 4)
    layer.forward(bottom, top)
    x = host(bottom[0].data)
    expected = np.zeros(top[0].shape)
    for ph, pw, (h0, h1), (w0, w1), _ in windows(7, 8, (3, 3), (2, 2), (0, 0), (3, 4)):
        win = x[:, :, h0:h1, w0:w1]
        expected[:, :, ph, pw] = (win ** 2).sum(axis=(2, 3)) / win.sum(axis=(2, 3))
    np.testing.assert_allclose(host(top[0].data), expected, rtol=1e-12)
    top[0].diff[...] = 1.0
    with pytest.raises(LayerError, match="TRAIN"):
        layer.backward(top, [True], bottom)


def test_stochastic_train_samples_window_elements_and_routes_gradient(xp):
    layer = pooling("pool: STOCHASTIC kernel_size: 2 stride: 2")
    bottom = [distinct_blob((2, 2, 4, 5), xp, low=0.1, high=2.0)]
    top = setup_layer(layer, bottom)
    backend.set_random_seed(3)
    layer.forward(bottom, top)
    x, y = host(bottom[0].data), host(top[0].data)
    for ph, pw, (h0, h1), (w0, w1), _ in windows(4, 5, (2, 2), (2, 2), (0, 0), (2, 3)):
        win = x[:, :, h0:h1, w0:w1].reshape(2, 2, -1)
        assert np.all(np.any(win == y[:, :, ph, pw, None], axis=2))
    check_gradient(layer, bottom, top)
    # Probability proportional to value: a window [1, 3] picks 3 about three times in four.
    layer = pooling("pool: STOCHASTIC kernel_size: 2 stride: 2")
    bottom = [Blob((1, 4000, 1, 2), dtype=np.float64, xp=xp)]
    bottom[0].data[...] = xp.asarray([1.0, 3.0])
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    assert abs(float(np.mean(host(top[0].data) == 3.0)) - 0.75) < 0.04


def test_pooling_backward_overwrites_bottom_diff(xp):
    layer = pooling("pool: AVE kernel_size: 2 stride: 2")
    bottom = make_blobs([(1, 1, 4, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = 4.0
    bottom[0].diff[...] = 123.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(host(bottom[0].diff), np.ones((1, 1, 4, 4)))


@pytest.mark.parametrize("params, shape, tops, words", [
    ("pool: MAX kernel_size: 2 pad: 2", (1, 1, 5, 5), 1, "smaller than the kernel"),
    ("pool: MAX stride: 2", (1, 1, 5, 5), 1, "needs kernel_size"),
    ("pool: MAX kernel_h: 2", (1, 1, 5, 5), 1, "needs kernel_size"),
    ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", (1, 1, 5, 5), 1, "not both"),
    ("pool: MAX kernel_size: 2 pad_h: 1", (1, 1, 5, 5), 1, "both pad_h and pad_w"),
    ("pool: MAX kernel_size: 2", (1, 5, 5), 1, "4 axes"),
    ("pool: MAX kernel_size: 2", (1, 1, 1, 5, 5), 1, "4 axes"),
    ("pool: MAX global_pooling: true kernel_size: 2", (1, 1, 5, 5), 1, "global_pooling"),
    ("pool: AVE global_pooling: true stride: 2", (1, 1, 5, 5), 1, "pad 0 and stride 1"),
    ("pool: AVE kernel_size: 2", (1, 1, 5, 5), 2, "second top"),
    ("pool: STOCHASTIC kernel_size: 2 pad: 1", (1, 1, 5, 5), 1, "only for MAX and AVE"),
    ("pool: MAX kernel_size: 7", (1, 1, 5, 5), 1, "does not fit"),
    ("pool: MAX kernel_size: 2 stride: 0", (1, 1, 5, 5), 1, "stride must be positive"),
])
def test_pooling_errors(params, shape, tops, words):
    layer = make_layer(f'name: "pool1" type: "Pooling" pooling_param {{ {params} }}')
    with pytest.raises(LayerError) as err:
        setup_layer(layer, make_blobs([shape]), tops)
    assert "pool1" in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_spp_concatenates_pyramid_levels(xp, method):
    layer = make_layer(f'type: "SPP" spp_param {{ pyramid_height: 3 pool: {method} }}')
    bottom = [distinct_blob((2, 2, 7, 6), xp)]
    top = setup_layer(layer, bottom)
    assert top[0].shape == (2, 2 * (1 + 4 + 16))
    layer.forward(bottom, top)
    x = host(bottom[0].data)
    parts = []
    for level in range(3):
        bins = 2 ** level
        kh, kw = -(-7 // bins), -(-6 // bins)
        pad = ((kh * bins - 7 + 1) // 2, (kw * bins - 6 + 1) // 2)
        out = (pooled_size(7, kh, kh, pad[0], True, any(pad)),
               pooled_size(6, kw, kw, pad[1], True, any(pad)))
        parts.append(ref_pool(x, (kh, kw), (kh, kw), pad, out, method)[0].reshape(2, -1))
    np.testing.assert_allclose(host(top[0].data), np.concatenate(parts, axis=1), rtol=1e-12)
    check_gradient(layer, bottom, top)
    single = make_layer(f'type: "SPP" spp_param {{ pyramid_height: 1 pool: {method} }}')
    assert setup_layer(single, bottom)[0].shape == (2, 2, 1, 1)


def test_spp_errors():
    layer = make_layer('name: "spp" type: "SPP" spp_param { pool: MAX }')
    with pytest.raises(LayerError, match="pyramid_height"):
        setup_layer(layer, make_blobs([(1, 1, 4, 4)]))
