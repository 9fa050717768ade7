"""BatchNorm, Scale, Bias, LRN and MVN: forward formulas, gradients, in-place runs, errors."""
from __future__ import annotations

import numpy as np
import pytest

from netengine.backend import to_host
from netengine.blob import Blob
from netengine.errors import LayerError
from netengine.testing import TEST, TRAIN, check_gradient, make_blobs, make_layer, setup_layer

BN_TRAIN = 'type: "BatchNorm" batch_norm_param { use_global_stats: false }'
BN_GLOBAL = 'type: "BatchNorm" batch_norm_param { use_global_stats: true }'


def host(a) -> np.ndarray:
    return np.asarray(to_host(a))


def run(layer, bottom, top, seed=5):
    """Forward, random top diffs, backward to every bottom; returns (tops, bottom diffs)."""
    layer.forward(bottom, top)
    outputs = [host(t.data).copy() for t in top]
    rng = np.random.default_rng(seed)
    for t in top:
        t.diff[...] = t.xp.asarray(rng.normal(size=t.shape))
    layer.backward(top, [True] * len(bottom), bottom)
    return outputs, [host(b.diff).copy() for b in bottom]


def assert_inplace_matches(text, shape, xp, prepare=None, phase=None):
    """The layer run in place gives the same top, bottom diff and param diffs as not in place."""
    results = []
    for inplace in (False, True):
        kwargs = {} if phase is None else {"phase": phase}
        layer = make_layer(text, **kwargs)
        bottom = make_blobs([shape], xp=xp)
        top = bottom if inplace else [Blob((), dtype=np.float64, xp=xp)]
        layer.setup(bottom, top)
        if prepare:
            prepare(layer)
        outs, diffs = run(layer, bottom, top)
        results.append((outs, diffs, [host(b.diff).copy() for b in layer.blobs],
                        [host(b.data).copy() for b in layer.blobs]))
    for got, want in zip(results[1], results[0]):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


# -- BatchNorm ---------------------------------------------------------------------------------
def bn_reference(x, mean, var, eps=1e-5):
    c = x.shape[1] if x.ndim > 1 else 1
    shape = (1, c) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 3), (2, 3, 2, 2, 2)])
def test_batchnorm_train_forward_and_statistics(xp, shape):
    layer = make_layer(BN_TRAIN)
    bottom = make_blobs([shape], xp=xp)
    top = setup_layer(layer, bottom)
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,)]
    layer.forward(bottom, top)
    x = host(bottom[0].data)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    np.testing.assert_allclose(host(top[0].data), bn_reference(x, mean, var), atol=1e-12)
    m = x.size // 3
    np.testing.assert_allclose(host(layer.blobs[0].data), mean, atol=1e-12)
    np.testing.assert_allclose(host(layer.blobs[1].data), var * m / (m - 1), atol=1e-12)
    np.testing.assert_allclose(host(layer.blobs[2].data), [1.0])


def test_batchnorm_train_accumulates_with_fraction(xp):
    layer = make_layer(BN_TRAIN + ' batch_norm_param { moving_average_fraction: 0.5 }')
    bottom = make_blobs([(4, 3, 2, 2)], xp=xp)
    top = setup_layer(layer, bottom)
    start = [np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 1.5]), np.array([3.0])]
    for blob, value in zip(layer.blobs, start):
        blob.data[...] = xp.asarray(value)
    layer.forward(bottom, top)
    x = host(bottom[0].data)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(host(layer.blobs[0].data), 0.5 * start[0] + mean, atol=1e-12)
    np.testing.assert_allclose(host(layer.blobs[1].data), 0.5 * start[1] + var * 16 / 15,
                               atol=1e-12)
    np.testing.assert_allclose(host(layer.blobs[2].data), [2.5])
    # The output uses the batch statistics only.
    np.testing.assert_allclose(host(top[0].data), bn_reference(x, mean, var), atol=1e-12)


def test_batchnorm_single_value_per_channel_uses_factor_one(xp):
    layer = make_layer(BN_TRAIN)
    bottom = make_blobs([(1, 3)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    np.testing.assert_allclose(host(layer.blobs[1].data), np.zeros(3))
    np.testing.assert_allclose(host(top[0].data), np.zeros((1, 3)))


@pytest.mark.parametrize("factor", [0.5, 0.0])
def test_batchnorm_global_forward(xp, factor):
    layer = make_layer(BN_GLOBAL)
    bottom = make_blobs([(2, 3, 2, 2)], xp=xp)
    top = setup_layer(layer, bottom)
    s0, s1 = np.array([0.1, -0.2, 0.3]), np.array([0.5, 1.0, 2.0])
    for blob, value in zip(layer.blobs, (s0, s1, np.array([factor]))):
        blob.data[...] = xp.asarray(value)
    layer.forward(bottom, top)
    scale = 1 / factor if factor else 0.0
    want = bn_reference(host(bottom[0].data), s0 * scale, s1 * scale)
    np.testing.assert_allclose(host(top[0].data), want, atol=1e-12)
    np.testing.assert_allclose(host(layer.blobs[2].data), [factor])  # not updated


@pytest.mark.parametrize("phase, global_stats", [(TEST, True), (TRAIN, False)])
def test_batchnorm_use_global_stats_defaults_to_phase(phase, global_stats):
    layer = make_layer('type: "BatchNorm"', phase=phase)
    bottom = make_blobs([(2, 3)])
    top = setup_layer(layer, bottom)
    layer.phase = TRAIN if phase == TEST else TEST  # frozen at setup: later changes do nothing
    layer.forward(bottom, top)
    touched = bool(np.any(host(layer.blobs[2].data) != 0))
    assert touched is not global_stats


def test_batchnorm_forces_lr_mult_zero():
    layer = make_layer(BN_TRAIN)
    setup_layer(layer, make_blobs([(2, 3)]))
    assert [p.lr_mult for p in layer.layer_param.param] == [0, 0, 0]
    assert layer.param_propagate_down == [False, False, False]
    old = make_layer(BN_TRAIN + " param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }")
    setup_layer(old, make_blobs([(2, 3)]))
    assert len(old.layer_param.param) == 3


def test_batchnorm_refuses_learned_statistics():
    layer = make_layer(BN_TRAIN + " param { lr_mult: 0 } param { lr_mult: 1 }")
    layer.layer_param.name = "bn1"
    with pytest.raises(LayerError) as err:
        setup_layer(layer, make_blobs([(2, 3)]))
    assert "bn1" in str(err.value) and "lr_mult" in str(err.value)


def test_batchnorm_accepts_legacy_shaped_statistics(xp):
    layer = make_layer(BN_GLOBAL)
    layer.blobs = [Blob(shape, dtype=np.float64, xp=xp) for shape in
                   [(1, 1, 1, 3), (1, 1, 1, 3), (1, 1, 1, 1)]]
    bottom = make_blobs([(2, 3, 2)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.blobs[1].data[...] = 1.0
    layer.blobs[2].data[...] = 1.0
    layer.forward(bottom, top)
    np.testing.assert_allclose(host(top[0].data), host(bottom[0].data) / np.sqrt(1 + 1e-5))


def test_batchnorm_channel_mismatch():
    layer = make_layer(BN_TRAIN)
    bottom = make_blobs([(2, 3)])
    top = setup_layer(layer, bottom)
    bottom[0].reshape((2, 4))
    with pytest.raises(LayerError, match="4 channels"):
        layer.forward(bottom, top)


@pytest.mark.parametrize("text", [BN_TRAIN, BN_GLOBAL])
@pytest.mark.parametrize("shape", [(3, 2, 2, 2), (4, 2)])
def test_batchnorm_gradient(xp, text, shape):
    layer = make_layer(text)
    bottom = make_blobs([shape], xp=xp)
    top = setup_layer(layer, bottom)
    layer.blobs[1].data[...] = 1.5
    layer.blobs[2].data[...] = 2.0
    check_gradient(layer, bottom, top)
    assert all(not np.any(host(b.diff)) for b in layer.blobs)


@pytest.mark.parametrize("text", [BN_TRAIN, BN_GLOBAL])
def test_batchnorm_in_place(xp, text):
    def prepare(layer):
        layer.blobs[0].data[...] = 0.3
        layer.blobs[1].data[...] = 2.0
        layer.blobs[2].data[...] = 1.5

    assert_inplace_matches(text, (3, 2, 2, 3), xp, prepare)


# -- Scale and Bias ----------------------------------------------------------------------------
def test_scale_default_filler_is_one_and_bias_zero(xp):
    layer = make_layer('type: "Scale" scale_param { bias_term: true }')
    bottom = make_blobs([(2, 3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    assert [b.shape for b in layer.blobs] == [(3,), (3,)]
    np.testing.assert_array_equal(host(layer.blobs[0].data), np.ones(3))
    np.testing.assert_array_equal(host(layer.blobs[1].data), np.zeros(3))
    layer.forward(bottom, top)
    np.testing.assert_allclose(host(top[0].data), host(bottom[0].data))


def test_scale_explicit_filler_is_used(xp):
    layer = make_layer('type: "Scale" scale_param { filler { type: "constant" } }')
    setup_layer(layer, make_blobs([(2, 3)], xp=xp))
    np.testing.assert_array_equal(host(layer.blobs[0].data), np.zeros(3))


@pytest.mark.parametrize("params, blob_shape, view", [
    ("axis: 1", (3,), (1, 3, 1, 1)),
    ("axis: 1 num_axes: 2", (3, 4), (1, 3, 4, 1)),
    ("axis: -2 num_axes: -1", (4, 5), (1, 1, 4, 5)),
    ("axis: 0 num_axes: 0", (), ()),
    ("axis: 2 num_axes: 0", (), ()),
])
def test_scale_learned_shapes_and_forward(xp, params, blob_shape, view):
    layer = make_layer(f'type: "Scale" scale_param {{ {params} bias_term: true '
                       f'filler {{ type: "gaussian" }} bias_filler {{ type: "gaussian" }} }}')
    bottom = make_blobs([(2, 3, 4, 5)], xp=xp)
    top = setup_layer(layer, bottom)
    assert layer.blobs[0].shape == blob_shape and layer.blobs[1].shape == blob_shape
    layer.forward(bottom, top)
    s, b = (host(blob.data).reshape(view) for blob in layer.blobs)
    np.testing.assert_allclose(host(top[0].data), host(bottom[0].data) * s + b, atol=1e-12)


@pytest.mark.parametrize("params, shapes", [
    ("", [(2, 3, 4), (3,)]),
    ("bias_term: true", [(2, 3, 4), (3,)]),
    ("axis: 0 num_axes: -1", [(2, 3, 2), (2, 3, 2)]),
    ("axis: 1 num_axes: 2 bias_term: true", [(2, 3, 2, 2), None]),
    ("num_axes: 0 bias_term: true", [(2, 3, 2), None]),
])
def test_scale_gradient_learned(xp, params, shapes):
    layer = make_layer(f'type: "Scale" scale_param {{ {params} filler {{ type: "gaussian" }} '
                       f'bias_filler {{ type: "gaussian" }} }}')
    bottom = make_blobs([shapes[0]], xp=xp)
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("params, shapes, view", [
    ("", [(2, 3, 4), (3,)], (1, 3, 1)),
    ("axis: 1 bias_term: true", [(2, 3, 4), (3, 4)], (1, 3, 4)),
    ("bias_term: true", [(2, 3, 2), ()], ()),
    ("axis: -1", [(2, 3, 2), (2,)], (1, 1, 2)),
])
def test_scale_second_bottom(xp, params, shapes, view):
    layer = make_layer(f'type: "Scale" scale_param {{ {params} bias_filler {{ type: "gaussian" }} '
                       f'}}')
    bottom = make_blobs(shapes, xp=xp)
    top = setup_layer(layer, bottom)
    assert len(layer.blobs) == (1 if "bias_term" in params else 0)
    layer.forward(bottom, top)
    want = host(bottom[0].data) * host(bottom[1].data).reshape(view)
    if layer.blobs:
        want += host(layer.blobs[0].data).reshape(view)
    np.testing.assert_allclose(host(top[0].data), want, atol=1e-12)
    check_gradient(layer, bottom, top)


def test_scale_param_diffs_accumulate(xp):
    layer = make_layer('type: "Scale" scale_param { bias_term: true }')
    bottom = make_blobs([(2, 3, 2)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    once = [host(b.diff).copy() for b in layer.blobs]
    layer.backward(top, [True], bottom)
    for blob, first in zip(layer.blobs, once):
        np.testing.assert_allclose(host(blob.diff), 2 * first)


def test_scale_in_place(xp):
    def prepare(layer):
        for i, blob in enumerate(layer.blobs):
            blob.data[...] = xp.asarray([0.5, -1.5, 2.0]) + i

    assert_inplace_matches('type: "Scale" scale_param { bias_term: true }', (2, 3, 2, 2), xp,
                           prepare)


@pytest.mark.parametrize("text, shapes, expect", [
    ('type: "Scale"', [(2, 3, 4), (4,)], "must match the axes"),
    ('type: "Scale" scale_param { axis: 2 num_axes: 2 }', [(2, 3, 4)], "exceeds"),
    ('type: "Scale" scale_param { axis: 3 }', [(2, 3, 4)], "out of range"),
    ('type: "Scale" scale_param { num_axes: -2 }', [(2, 3, 4)], "num_axes"),
    ('type: "Bias"', [(2, 3, 4), (3, 5)], "must match the axes"),
    ('type: "Bias" bias_param { axis: -4 }', [(2, 3, 4)], "out of range"),
])
def test_scale_bias_errors(text, shapes, expect):
    layer = make_layer(text)
    with pytest.raises(LayerError, match=expect) as err:
        setup_layer(layer, make_blobs(shapes))
    assert layer.name in str(err.value)


def test_bias_forward_default_filler(xp):
    layer = make_layer('type: "Bias"')
    bottom = make_blobs([(2, 3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    np.testing.assert_array_equal(host(layer.blobs[0].data), np.zeros(3))
    layer.blobs[0].data[...] = xp.asarray([1.0, 2.0, 3.0])
    layer.forward(bottom, top)
    want = host(bottom[0].data) + np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    np.testing.assert_allclose(host(top[0].data), want)


@pytest.mark.parametrize("text, shapes", [
    ('type: "Bias" bias_param { filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "Bias" bias_param { axis: 0 num_axes: 2 filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "Bias" bias_param { num_axes: 0 filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "Bias" bias_param { axis: 2 }', [(2, 3, 4), (4,)]),
    ('type: "Bias"', [(2, 3, 4), ()]),
])
def test_bias_gradient(xp, text, shapes):
    layer = make_layer(text)
    bottom = make_blobs(shapes, xp=xp)
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


def test_bias_in_place(xp):
    def prepare(layer):
        layer.blobs[0].data[...] = xp.asarray([0.5, -1.5, 2.0])

    assert_inplace_matches('type: "Bias"', (2, 3, 2), xp, prepare)


# -- LRN ---------------------------------------------------------------------------------------
def lrn_reference(x, n, alpha, beta, k, within):
    pad = (n - 1) // 2
    sq = np.pad(x * x, [(0, 0), (pad, pad), (0, 0), (0, 0)] if not within
                else [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    total = np.zeros_like(x)
    _, c, h, w = x.shape
    if within:
        for dh in range(n):
            for dw in range(n):
                total += sq[:, :, dh:dh + h, dw:dw + w]
        return x * (1 + alpha / n ** 2 * total) ** -beta
    for dc in range(n):
        total += sq[:, dc:dc + c]
    return x * (k + alpha / n * total) ** -beta


@pytest.mark.parametrize("params, within", [
    ("", False),
    ("local_size: 3 alpha: 0.5 beta: 0.6 k: 2", False),
    ("local_size: 7 alpha: 2", False),
    ("norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.5 k: 5", True),
    ("norm_region: WITHIN_CHANNEL local_size: 1 alpha: 3 beta: 1", True),
])
def test_lrn_forward(xp, params, within):
    layer = make_layer(f'type: "LRN" lrn_param {{ {params} }}')
    bottom = make_blobs([(2, 5, 3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    p = layer.layer_param.lrn_param
    want = lrn_reference(host(bottom[0].data), p.local_size, p.alpha, p.beta, p.k, within)
    np.testing.assert_allclose(host(top[0].data), want, rtol=1e-12)


@pytest.mark.parametrize("params", [
    "local_size: 3 alpha: 1.5 beta: 0.75 k: 1.5",
    "local_size: 5 alpha: 0.8",
    "norm_region: WITHIN_CHANNEL local_size: 3 alpha: 2.0 beta: 0.75",
])
def test_lrn_gradient(xp, params):
    layer = make_layer(f'type: "LRN" lrn_param {{ {params} }}')
    bottom = make_blobs([(2, 4, 3, 3)], xp=xp)
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


def test_lrn_in_place(xp):
    assert_inplace_matches('type: "LRN" lrn_param { local_size: 3 alpha: 2 }', (2, 4, 2, 3), xp)


@pytest.mark.parametrize("text, shape, expect", [
    ('type: "LRN" lrn_param { local_size: 4 }', (2, 3, 4, 4), "local_size must be odd, got 4"),
    ('type: "LRN"', (2, 3, 4), "4-D"),
])
def test_lrn_errors(text, shape, expect):
    layer = make_layer(text)
    with pytest.raises(LayerError, match=expect) as err:
        setup_layer(layer, make_blobs([shape]))
    assert "'lrn'" in str(err.value)


# -- MVN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", ["", "across_channels: true", "normalize_variance: false",
                                    "normalize_variance: false across_channels: true",
                                    "eps: 0.5"])
def test_mvn_forward(xp, params):
    layer = make_layer(f'type: "MVN" mvn_param {{ {params} }}')
    bottom = make_blobs([(2, 3, 4, 5)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    p = layer.layer_param.mvn_param
    x = host(bottom[0].data)
    axes = (1, 2, 3) if p.across_channels else (2, 3)
    want = x - x.mean(axis=axes, keepdims=True)
    if p.normalize_variance:
        want /= x.std(axis=axes, keepdims=True) + p.eps
    np.testing.assert_allclose(host(top[0].data), want, atol=1e-12)


@pytest.mark.parametrize("params", ["", "across_channels: true", "normalize_variance: false"])
def test_mvn_gradient(xp, params):
    layer = make_layer(f'type: "MVN" mvn_param {{ {params} }}')
    bottom = make_blobs([(2, 2, 3, 3)], xp=xp)
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


def test_mvn_in_place(xp):
    assert_inplace_matches('type: "MVN"', (2, 3, 2, 3), xp)


# -- in place inside a net, against Caffe's output --------------------------------------------
def test_bn_scale_chain_in_place_matches_caffe():
    from conftest import need_shared
    from google.protobuf import text_format

    import netengine
    from netengine.proto import caffe_pb2

    cases = need_shared("caffe-golden", "cases")
    param = text_format.Parse((cases / "bn_scale_chain.prototxt").read_text(),
                              caffe_pb2.NetParameter())
    param.layer[1].top[0] = "data"        # bn: data -> data
    param.layer[2].bottom[0] = "data"     # scale: data -> data
    param.layer[2].top[0] = "data"
    ref = np.load(cases / "bn_scale_chain.npz")
    net = netengine.Net(param, netengine.TRAIN)
    net.blobs["data"].data[...] = ref["bottom/data"]
    for layer in ("bn", "scale"):
        for i, blob in enumerate(net.params[layer]):
            blob.data[...] = ref[f"param/{layer}/{i}"].reshape(blob.shape)
    net.forward()
    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.blobs["data"].data, ref["top/out"], **tol)
    for i in range(3):
        np.testing.assert_allclose(net.params["bn"][i].data, ref[f"param_after_forward/bn/{i}"],
                                   **tol)
    net.blobs["data"].diff[...] = ref["top_diff/out"]
    net.clear_param_diffs()
    net.backward()
    np.testing.assert_allclose(net.blobs["data"].diff, ref["bottom_diff/data"], **tol)
    for i in range(2):
        np.testing.assert_allclose(net.params["scale"][i].diff, ref[f"param_diff/scale/{i}"],
                                   **tol)
