"""Convolution, Deconvolution and Im2col: shapes, forward against direct formulas, gradients,
errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from netengine import backend
from netengine.errors import LayerError
from netengine.ops import im2col as im2col_ops
from netengine.testing import check_gradient, make_blobs, make_layer, setup_layer

GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def host(a):
    return backend.to_host(a)


def layer_of(kind: str, params: str):
    return make_layer(f'type: "{kind}" convolution_param {{ {params} {GAUSS} }}')


def per_axis(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def ref_conv(x, w, b, stride=1, pad=0, dilation=1, group=1):
    """Direct N-d cross-correlation: a sum over kernel offsets of shifted input slices."""
    n_sp = x.ndim - 2
    stride, pad, dilation = (per_axis(v, n_sp) for v in (stride, pad, dilation))
    kernel = w.shape[2:]
    xp_ = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    out = [(s + 2 * p - (d * (k - 1) + 1)) // st + 1
           for s, p, d, k, st in zip(x.shape[2:], pad, dilation, kernel, stride)]
    cout, cin_g = w.shape[:2]
    y = np.zeros((x.shape[0], cout, *out))
    mg = cout // group
    for g in range(group):
        xg = xp_[:, g * cin_g:(g + 1) * cin_g]
        for off in itertools.product(*(range(k) for k in kernel)):
            sl = tuple(slice(o * d, o * d + st * (m - 1) + 1, st)
                       for o, d, st, m in zip(off, dilation, stride, out))
            patch = xg[(slice(None), slice(None)) + sl]
            wk = w[(slice(g * mg, (g + 1) * mg), slice(None)) + off]
            y[:, g * mg:(g + 1) * mg] += np.einsum("mc,nc...->nm...", wk, patch)
    if b is not None:
        y += b.reshape((1, -1) + (1,) * n_sp)
    return y


def ref_deconv(x, w, b, stride=1, pad=0, dilation=1, group=1):
    """Direct transposed convolution: scatter every input value through the kernel."""
    n_sp = x.ndim - 2
    stride, pad, dilation = (per_axis(v, n_sp) for v in (stride, pad, dilation))
    kernel = w.shape[2:]
    cin, cout_g = w.shape[:2]
    full = [st * (s - 1) + d * (k - 1) + 1
            for s, st, d, k in zip(x.shape[2:], stride, dilation, kernel)]
    y = np.zeros((x.shape[0], cout_g * group, *full))
    cin_g = cin // group
    for g in range(group):
        for off in itertools.product(*(range(k) for k in kernel)):
            sl = tuple(slice(o * d, o * d + st * (s - 1) + 1, st)
                       for o, d, st, s in zip(off, dilation, stride, x.shape[2:]))
            wk = w[(slice(g * cin_g, (g + 1) * cin_g), slice(None)) + off]
            y[(slice(None), slice(g * cout_g, (g + 1) * cout_g)) + sl] += np.einsum(
                "cm,nc...->nm...", wk, x[:, g * cin_g:(g + 1) * cin_g])
    crop = tuple(slice(p, f - p) for p, f in zip(pad, full))
    y = y[(slice(None), slice(None)) + crop]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * n_sp)
    return y


@pytest.fixture(params=["item-major", "item-minor"])
def order(request, monkeypatch):
    """Force one of ConvGemm's two column orders (the choice is otherwise by shape)."""
    minor = request.param == "item-minor"
    monkeypatch.setattr(im2col_ops, "ITEM_MINOR_MIN_ITEMS", 1 if minor else 1 << 30)
    monkeypatch.setattr(im2col_ops, "ITEM_MINOR_MAX_WIDTH", 1 << 30 if minor else 0)
    return minor


# (params, bottom shape, reference keyword arguments, expected top shape)
CONV_CASES = [
    ("num_output: 4 kernel_size: 3", (2, 3, 5, 5), {}, (2, 4, 3, 3)),
    ("num_output: 3 kernel_size: 3 stride: 2 pad: 1", (2, 2, 6, 5), dict(stride=2, pad=1),
     (2, 3, 3, 3)),
    ("num_output: 2 kernel_size: 2 dilation: 2 pad: 1", (1, 3, 5, 6), dict(dilation=2, pad=1),
     (1, 2, 5, 6)),
    ("num_output: 4 kernel_size: 3 group: 2 pad: 1", (2, 4, 4, 4), dict(group=2, pad=1),
     (2, 4, 4, 4)),
    ("num_output: 3 kernel_size: 3 bias_term: false", (2, 2, 4, 5), {}, (2, 3, 2, 3)),
    ("num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
     (2, 2, 5, 4), dict(stride=(2, 1), pad=(1, 0)), (2, 3, 3, 3)),
    ("num_output: 3 kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 pad: 0 pad: 1",
     (1, 2, 5, 5), dict(stride=(1, 2), pad=(0, 1)), (1, 3, 3, 3)),
    ("num_output: 5 kernel_size: 1", (2, 3, 3, 4), {}, (2, 5, 3, 4)),
    ("num_output: 4 kernel_size: 1 group: 2", (2, 4, 2, 3), dict(group=2), (2, 4, 2, 3)),
    ("num_output: 3 kernel_size: 1 stride: 2", (1, 2, 5, 5), dict(stride=2), (1, 3, 3, 3)),
    ("num_output: 2 kernel_size: 3 stride: 2 pad: 1", (2, 3, 7), dict(stride=2, pad=1),
     (2, 2, 4)),
    ("num_output: 2 kernel_size: 2 pad: 1 stride: 2", (1, 2, 3, 4, 3), dict(pad=1, stride=2),
     (1, 2, 2, 3, 2)),
]


@pytest.mark.parametrize("params, shape, kw, top_shape", CONV_CASES,
                         ids=[c[0] for c in CONV_CASES])
def test_convolution_forward_and_gradient(xp, order, params, shape, kw, top_shape):
    layer = layer_of("Convolution", params)
    bottom = make_blobs([shape], xp=xp)
    top = setup_layer(layer, bottom)
    assert layer.gemm.item_minor == (order and not layer.gemm.is_1x1)  # 1x1: no columns
    assert top[0].shape == top_shape
    layer.forward(bottom, top)
    bias = host(layer.blobs[1].data) if len(layer.blobs) > 1 else None
    expected = ref_conv(host(bottom[0].data), host(layer.blobs[0].data), bias, **kw)
    np.testing.assert_allclose(host(top[0].data), expected, rtol=1e-10, atol=1e-12)
    check_gradient(layer, bottom, top)


DECONV_CASES = [
    ("num_output: 3 kernel_size: 4 stride: 2 pad: 1", (2, 2, 3, 3), dict(stride=2, pad=1),
     (2, 3, 6, 6)),
    ("num_output: 2 kernel_size: 3", (1, 3, 3, 4), {}, (1, 2, 5, 6)),
    ("num_output: 4 kernel_size: 3 stride: 2 group: 2", (2, 4, 2, 3), dict(stride=2, group=2),
     (2, 4, 5, 7)),
    ("num_output: 2 kernel_size: 2 dilation: 2 bias_term: false", (1, 2, 3, 3),
     dict(dilation=2), (1, 2, 5, 5)),
    ("num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0",
     (1, 2, 3, 3), dict(stride=(1, 2), pad=(1, 0)), (1, 3, 3, 6)),
    ("num_output: 4 kernel_size: 1 group: 2", (2, 2, 3, 2), dict(group=2), (2, 4, 3, 2)),
    ("num_output: 2 kernel_size: 3 stride: 2 pad: 1", (2, 3, 4), dict(stride=2, pad=1),
     (2, 2, 7)),
]


@pytest.mark.parametrize("params, shape, kw, top_shape", DECONV_CASES,
                         ids=[c[0] for c in DECONV_CASES])
def test_deconvolution_forward_and_gradient(xp, order, params, shape, kw, top_shape):
    layer = layer_of("Deconvolution", params)
    bottom = make_blobs([shape], xp=xp)
    top = setup_layer(layer, bottom)
    assert layer.gemm.item_minor == (order and not layer.gemm.is_1x1)  # 1x1: no columns
    assert top[0].shape == top_shape
    layer.forward(bottom, top)
    bias = host(layer.blobs[1].data) if len(layer.blobs) > 1 else None
    expected = ref_deconv(host(bottom[0].data), host(layer.blobs[0].data), bias, **kw)
    np.testing.assert_allclose(host(top[0].data), expected, rtol=1e-10, atol=1e-12)
    check_gradient(layer, bottom, top)


def test_deconvolution_is_the_adjoint_of_convolution(xp):
    conv = layer_of("Convolution", "num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 "
                                   "bias_term: false")
    x = make_blobs([(2, 6, 7, 5)], xp=xp, seed=1)
    y = setup_layer(conv, x)
    deconv = layer_of("Deconvolution", "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2 "
                                       "bias_term: false")
    z = make_blobs([y[0].shape], xp=xp, seed=2)
    deconv.blobs = conv.blobs  # (C_out, C_in/g, k, k) read as the deconv's (C_in', C_out'/g, ..)
    back = setup_layer(deconv, z)
    conv.forward(x, y)
    deconv.forward(z, back)
    lhs = float(np.sum(host(y[0].data) * host(z[0].data)))
    rhs = float(np.sum(host(x[0].data) * host(back[0].data)))
    assert back[0].shape == (2, 6, 7, 5)  # 2·(4−1) + 3 − 2 = 7, 2·(3−1) + 3 − 2 = 5
    assert abs(lhs - rhs) < 1e-9 * max(abs(lhs), 1.0)


def test_weight_shapes_and_default_constant_zero_fillers(xp):
    conv = make_layer('type: "Convolution" convolution_param { num_output: 6 kernel_size: 3 '
                      'kernel_size: 2 group: 3 }')
    top = setup_layer(conv, make_blobs([(2, 9, 5, 5)], xp=xp))
    assert [b.shape for b in conv.blobs] == [(6, 3, 3, 2), (6,)]
    assert not np.any(host(conv.blobs[0].data)) and not np.any(host(conv.blobs[1].data))
    assert top[0].shape == (2, 6, 3, 4)
    deconv = make_layer('type: "Deconvolution" convolution_param { num_output: 6 kernel_size: 4 '
                        'stride: 2 pad: 1 group: 3 }')
    top = setup_layer(deconv, make_blobs([(2, 9, 5, 5)], xp=xp))
    assert [b.shape for b in deconv.blobs] == [(9, 2, 4, 4), (6,)]
    assert top[0].shape == (2, 6, 10, 10)  # 2·(5−1) + 4 − 2


@pytest.mark.parametrize("size, k, s, p, d, expected", [
    (8, 3, 2, 0, 1, 3), (7, 3, 1, 1, 1, 7), (7, 5, 1, 2, 1, 7), (6, 3, 1, 0, 2, 2),
    (28, 5, 1, 0, 1, 24), (9, 2, 3, 0, 1, 3)])
def test_convolution_output_size_rounds_down(size, k, s, p, d, expected):
    assert im2col_ops.conv_output_size(size, k, s, p, d) == expected


def test_convolution_axis_and_leading_dims(xp):
    layer = layer_of("Convolution", "num_output: 2 kernel_size: 3 pad: 1 axis: 2")
    bottom = make_blobs([(2, 2, 3, 4)], xp=xp)  # batch 2·2, channels 3, 1-D length 4
    top = setup_layer(layer, bottom)
    assert top[0].shape == (2, 2, 2, 4)
    layer.forward(bottom, top)
    x = host(bottom[0].data).reshape(4, 3, 4)
    expected = ref_conv(x, host(layer.blobs[0].data), host(layer.blobs[1].data), pad=1)
    np.testing.assert_allclose(host(top[0].data).reshape(4, 2, 4), expected, rtol=1e-10)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("kind, ref", [("Convolution", ref_conv),
                                       ("Deconvolution", ref_deconv)])
def test_multiple_bottoms_share_weights(xp, order, kind, ref):
    layer = layer_of(kind, "num_output: 2 kernel_size: 2 stride: 2")
    bottom = make_blobs([(1, 2, 4, 4), (1, 2, 4, 4)], xp=xp)
    top = setup_layer(layer, bottom, 2)
    layer.forward(bottom, top)
    for b, t in zip(bottom, top):
        expected = ref(host(b.data), host(layer.blobs[0].data), host(layer.blobs[1].data),
                       stride=2)
        np.testing.assert_allclose(host(t.data), expected, rtol=1e-10)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
def test_param_diffs_accumulate_and_bottom_diff_is_overwritten(xp, order, kind):
    layer = layer_of(kind, "num_output: 3 kernel_size: 3 stride: 2 pad: 1")
    bottom = make_blobs([(2, 2, 5, 5)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = xp.asarray(np.random.default_rng(3).normal(size=top[0].shape))
    layer.backward(top, [True], bottom)
    once = [host(b.diff).copy() for b in layer.blobs]
    dx = host(bottom[0].diff).copy()
    bottom[0].diff[...] = 7.0
    layer.backward(top, [True], bottom)
    for blob, first in zip(layer.blobs, once):
        np.testing.assert_allclose(host(blob.diff), 2 * first, rtol=1e-12)
    np.testing.assert_allclose(host(bottom[0].diff), dx, rtol=1e-12)


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
def test_propagate_down_flags_are_honoured(xp, kind):
    layer = layer_of(kind, "num_output: 2 kernel_size: 3")
    bottom = make_blobs([(1, 2, 4, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = 1.0
    bottom[0].diff[...] = 5.0
    layer.param_propagate_down = [False, True]
    layer.backward(top, [False], bottom)
    assert np.all(host(bottom[0].diff) == 5.0)
    assert not np.any(host(layer.blobs[0].diff))
    np.testing.assert_allclose(host(layer.blobs[1].diff), top[0].count // 2)


def test_chunked_batch_matches_whole_batch(xp, order, monkeypatch):
    params = "num_output: 3 kernel_size: 3 stride: 2 pad: 1 group: 1"
    results = []
    default = im2col_ops.COL_BUDGET
    # 60: one item per chunk; 330 / 1400: chunks of 2, 2, 1 for Convolution / Deconvolution.
    for budget in (default, 60, 330, 1400):
        monkeypatch.setattr(im2col_ops, "COL_BUDGET", budget)
        out = []
        for kind in ("Convolution", "Deconvolution"):
            backend.set_random_seed(7)
            layer = layer_of(kind, params)
            bottom = make_blobs([(5, 2, 5, 5)], xp=xp)
            top = setup_layer(layer, bottom)
            assert len(layer.gemm.chunks()) == {60: 5, 330: 3 if kind[0] == "C" else 5,
                                                1400: 1 if kind[0] == "C" else 3}.get(budget, 1)
            layer.forward(bottom, top)
            top[0].diff[...] = top[0].data
            layer.backward(top, [True], bottom)
            out += [host(top[0].data).copy(), host(bottom[0].diff).copy(),
                    host(layer.blobs[0].diff).copy()]
        results.append(out)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_backward_after_bottom_changes_shape(xp, order):
    layer = layer_of("Convolution", "num_output: 2 kernel_size: 3 pad: 1")
    bottom = make_blobs([(2, 2, 4, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    bottom[0].reshape((1, 2, 6, 5))
    bottom[0].data[...] = xp.asarray(np.random.default_rng(5).normal(size=(1, 2, 6, 5)))
    layer.forward(bottom, top)
    assert top[0].shape == (1, 2, 6, 5)
    expected = ref_conv(host(bottom[0].data), host(layer.blobs[0].data),
                        host(layer.blobs[1].data), pad=1)
    np.testing.assert_allclose(host(top[0].data), expected, rtol=1e-10)
    check_gradient(layer, bottom, top)


def test_im2col_layer_layout_and_gradient(xp):
    layer = make_layer('type: "Im2col" convolution_param { kernel_size: 2 stride: 1 pad: 1 }')
    bottom = make_blobs([(2, 3, 3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    assert top[0].shape == (2, 12, 4, 5)
    layer.forward(bottom, top)
    x = np.pad(host(bottom[0].data), [(0, 0), (0, 0), (1, 1), (1, 1)])
    y = host(top[0].data)
    for c, i, j in itertools.product(range(3), range(2), range(2)):
        np.testing.assert_array_equal(y[:, c * 4 + i * 2 + j], x[:, c, i:i + 4, j:j + 5])
    check_gradient(layer, bottom, top)


def bad(kind: str, params: str, shape=(2, 4, 5, 5)):
    layer = make_layer(f'name: "bad" type: "{kind}" convolution_param {{ {params} }}')
    with pytest.raises(LayerError) as err:
        setup_layer(layer, make_blobs([shape]))
    assert "bad" in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("params, shape, words", [
    ("num_output: 4 kernel_size: 3 group: 3", (2, 4, 5, 5), "multiple of group"),
    ("num_output: 5 kernel_size: 3 group: 2", (2, 4, 5, 5), "multiple of group"),
    ("num_output: 4", (2, 4, 5, 5), "kernel_size must be given"),
    ("num_output: 4 kernel_size: 3 kernel_size: 3 kernel_size: 3", (2, 4, 5, 5),
     "kernel_size must be given once or once per spatial axis (2)"),
    ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", (2, 4, 5, 5), "not both"),
    ("num_output: 4 kernel_h: 3 kernel_w: 3", (2, 4, 5, 5, 5), "only be used for 2-D"),
    ("num_output: 4 kernel_h: 3", (2, 4, 5, 5), "must be positive"),
    ("kernel_size: 3", (2, 4, 5, 5), "num_output"),
    ("num_output: 4 kernel_size: 3 stride: 0", (2, 4, 5, 5), "stride must be positive"),
    ("num_output: 4 kernel_size: 3 dilation: 1 dilation: 1 dilation: 1", (2, 4, 5, 5),
     "dilation must be given once"),
    ("num_output: 4 kernel_size: 3 axis: 3", (2, 4, 5, 5), "spatial axis"),
])
def test_convolution_errors(kind, params, shape, words):
    assert words in bad(kind, params, shape)


def test_convolution_errors_on_sizes_and_blobs(xp):
    assert "not positive" in bad("Convolution", "num_output: 2 kernel_size: 7", (1, 4, 5, 5))
    assert "not positive" in bad("Deconvolution", "num_output: 2 kernel_size: 1 pad: 1",
                                 (1, 4, 1, 1))
    layer = layer_of("Convolution", "num_output: 2 kernel_size: 3")
    bottom = make_blobs([(1, 4, 5, 5)], xp=xp)
    top = setup_layer(layer, bottom)
    bottom[0].reshape((1, 3, 5, 5))
    with pytest.raises(LayerError, match="weights expect 4"):
        layer.forward(bottom, top)
    bottom[0].reshape((1, 4, 5, 5, 1))
    with pytest.raises(LayerError, match="keep 4 axes"):
        layer.forward(bottom, top)
    other = layer_of("Convolution", "num_output: 2 kernel_size: 3")
    other.blobs = layer.blobs[:1] + [layer.make_blob((3,))]
    with pytest.raises(LayerError, match=r"incorrect bias shape: expected \(2,\)"):
        setup_layer(other, make_blobs([(1, 4, 5, 5)], xp=xp))
    two = make_blobs([(1, 4, 5, 5), (1, 4, 5, 4)], xp=xp)
    with pytest.raises(LayerError, match="same shape"):
        setup_layer(layer_of("Convolution", "num_output: 2 kernel_size: 3"), two, 2)
