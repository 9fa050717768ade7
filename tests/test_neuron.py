"""Neuron layers: forward against direct formulas, numeric gradients, in place, errors."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import need_shared

import netengine
from netengine import backend
from netengine.blob import Blob
from netengine.errors import LayerError
from netengine.testing import (
    TEST,
    TRAIN,
    check_gradient,
    forward,
    make_blobs,
    make_layer,
    setup_layer,
)

SHAPE = (2, 3, 4, 5)


def host(a):
    return backend.to_host(a).astype(np.float64)


def f32(v):
    """A parameter as the layer sees it: proto floats are float32."""
    return float(np.float32(v))


def sigmoid(x):
    return np.exp(-np.logaddexp(0, -x))


def elu(alpha):
    return lambda x: np.where(x > 0, x, f32(alpha) * (np.exp(x) - 1))


# id -> (prototxt body, reference forward on NumPy, kinks to keep inputs away from,
#        input transform making the domain valid)
CASES = {
    "relu": ('type: "ReLU"', lambda x: np.maximum(x, 0), [0.0], None),
    "relu_leaky": ('type: "ReLU" relu_param { negative_slope: 0.1 }',
                   lambda x: np.where(x > 0, x, f32(0.1) * x), [0.0], None),
    "relu_negative_slope": ('type: "ReLU" relu_param { negative_slope: -0.3 }',
                            lambda x: np.where(x > 0, x, f32(-0.3) * x), [0.0], None),
    "sigmoid": ('type: "Sigmoid"', sigmoid, [], None),
    "tanh": ('type: "TanH"', np.tanh, [], None),
    "absval": ('type: "AbsVal"', np.abs, [0.0], None),
    "bnll": ('type: "BNLL"', lambda x: np.log(1 + np.exp(x)), [], None),
    "power_square": ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }',
                     lambda x: (1 + 0.5 * x) ** 2, [], None),
    "power_linear": ('type: "Power" power_param { scale: -1.5 shift: 0.25 }',
                     lambda x: 0.25 - 1.5 * x, [], None),
    "power_general": ('type: "Power" power_param { power: 0.5 scale: 0.5 shift: 3 }',
                      lambda x: np.sqrt(3 + 0.5 * x), [], None),
    "power_cube_noshift": ('type: "Power" power_param { power: 3 scale: 0.7 }',
                           lambda x: (f32(0.7) * x) ** 3, [], None),
    "power_scale0": ('type: "Power" power_param { power: 3 scale: 0 shift: 2 }',
                     lambda x: np.full_like(x, 8.0), [], None),
    "power_power0": ('type: "Power" power_param { power: 0 scale: 2 shift: 0 }',
                     np.ones_like, [], None),
    "exp": ('type: "Exp"', np.exp, [], None),
    "exp_base2": ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.3 }',
                  lambda x: 2.0 ** (f32(0.3) + 0.5 * x), [], None),
    "exp_e_shift": ('type: "Exp" exp_param { scale: -1 shift: 0.5 }',
                    lambda x: np.exp(0.5 - x), [], None),
    "log": ('type: "Log"', np.log, [], lambda x: np.abs(x) + 0.5),
    "log_base10": ('type: "Log" log_param { base: 10 scale: 0.5 shift: 3 }',
                   lambda x: np.log10(3 + 0.5 * x), [], None),
    "elu": ('type: "ELU"', elu(1.0), [0.0], None),
    "elu_alpha0.5": ('type: "ELU" elu_param { alpha: 0.5 }', elu(0.5), [0.0], None),
    "elu_negative_alpha": ('type: "ELU" elu_param { alpha: -0.5 }', elu(-0.5), [0.0], None),
    "swish": ('type: "Swish"', lambda x: x * sigmoid(x), [], None),
    "swish_beta2": ('type: "Swish" swish_param { beta: 2 }', lambda x: x * sigmoid(2 * x),
                    [], None),
    "clip": ('type: "Clip" clip_param { min: -0.5 max: 0.7 }',
             lambda x: np.clip(x, -0.5, f32(0.7)), [-0.5, 0.7], None),
}


def inputs(xp, case, shape=SHAPE, seed=0):
    """N(0,1) data moved into the layer's domain and at least 0.05 away from its kinks."""
    _, _, kinks, transform = CASES[case]
    bottom = make_blobs([shape], xp=xp, seed=seed)
    x = host(bottom[0].data)
    if transform is not None:
        x = transform(x)
    for k in kinks:
        x = np.where(np.abs(x - k) < 0.05, x + 0.1, x)
    bottom[0].data[...] = xp.asarray(x)
    return bottom


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_formula(xp, case):
    text, reference, _, _ = CASES[case]
    layer = make_layer(text)
    bottom = inputs(xp, case)
    top = setup_layer(layer, bottom)
    forward(layer, bottom, top)
    assert top[0].shape == SHAPE
    np.testing.assert_allclose(host(top[0].data), reference(host(bottom[0].data)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient(xp, case):
    layer = make_layer(CASES[case][0])
    bottom = inputs(xp, case)
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, elementwise=True, stepsize=1e-4, threshold=1e-6)


def run_both_ways(xp, text, bottom_data, top_diff, phase=TRAIN):
    """(y, dx) out of place and in place (top is bottom), from the same data and seed."""
    results = []
    for in_place in (False, True):
        layer = make_layer(text, phase)
        bottom = [Blob(bottom_data.shape, dtype=np.float64, xp=xp)]
        bottom[0].data[...] = xp.asarray(bottom_data)
        top = bottom if in_place else [Blob((), dtype=np.float64, xp=xp)]
        layer.setup(bottom, top)
        forward(layer, bottom, top)
        y = host(top[0].data).copy()
        top[0].diff[...] = xp.asarray(top_diff)
        layer.backward(top, [True], bottom)
        results.append((y, host(bottom[0].diff).copy(), layer))
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_place_equals_out_of_place(xp, case):
    x = host(inputs(xp, case)[0].data)
    dy = np.random.default_rng(5).normal(size=SHAPE)
    (y1, dx1, _), (y2, dx2, _) = run_both_ways(xp, CASES[case][0], x, dy)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-14, atol=0)


def test_relu_derivative_at_zero_is_the_slope(xp):
    x = np.array([[-1.0, 0.0, 2.0]])
    (_, dx, _), (_, dx_in_place, _) = run_both_ways(
        xp, 'type: "ReLU" relu_param { negative_slope: 0.25 }', x, np.ones((1, 3)))
    np.testing.assert_array_equal(dx, [[0.25, 0.25, 1.0]])
    np.testing.assert_array_equal(dx_in_place, dx)


def test_clip_gradient_passes_at_both_bounds(xp):
    x = np.array([[-1.0, -0.5, 0.0, 0.75, 1.0]])
    (y, dx, _), _ = run_both_ways(xp, 'type: "Clip" clip_param { min: -0.5 max: 0.75 }', x,
                                  np.full((1, 5), 3.0))
    np.testing.assert_array_equal(y, [[-0.5, -0.5, 0.0, 0.75, 0.75]])
    np.testing.assert_array_equal(dx, [[0.0, 3.0, 3.0, 3.0, 0.0]])


def test_absval_gradient_is_zero_at_zero(xp):
    (_, dx, _), _ = run_both_ways(xp, 'type: "AbsVal"', np.array([[-2.0, 0.0, 3.0]]),
                                  np.ones((1, 3)))
    np.testing.assert_array_equal(dx, [[-1.0, 0.0, 1.0]])


def test_bnll_and_sigmoid_are_stable_for_large_inputs(xp):
    x = np.array([[-800.0, -40.0, 0.0, 40.0, 800.0]])
    dy = np.ones((1, 5))
    (y, dx, _), _ = run_both_ways(xp, 'type: "BNLL"', x, dy)
    np.testing.assert_allclose(y, np.logaddexp(0, x), rtol=1e-14)
    np.testing.assert_allclose(dx, sigmoid(x), rtol=1e-14)
    (y, dx, _), _ = run_both_ways(xp, 'type: "Sigmoid"', x, dy)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(y, sigmoid(x), rtol=1e-14)


def test_power_gradient_is_finite_where_the_base_is_zero(xp):
    # Caffe computes power·y/x here (0/0); the direct formula gives the true derivative 0.
    (_, dx, _), _ = run_both_ways(xp, 'type: "Power" power_param { power: 3 }',
                                  np.array([[0.0, 2.0]]), np.ones((1, 2)))
    np.testing.assert_allclose(dx, [[0.0, 12.0]])


def test_threshold_forward_and_no_backward(xp):
    layer = make_layer('type: "Threshold" threshold_param { threshold: 0.2 }')
    bottom = make_blobs([(2, 3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    forward(layer, bottom, top)
    x = host(bottom[0].data)
    np.testing.assert_array_equal(host(top[0].data), (x > 0.2).astype(np.float64))
    assert not layer.allow_force_backward(0)
    layer.backward(top, [False], bottom)  # nothing asked: nothing done
    with pytest.raises(LayerError, match="threshold.*cannot back-propagate"):
        layer.backward(top, [True], bottom)


def test_threshold_in_place(xp):
    layer = make_layer('type: "Threshold"')
    bottom = [Blob((4,), dtype=np.float64, xp=xp)]
    bottom[0].data[...] = xp.asarray([-1.0, 0.0, 1e-9, 5.0])
    layer.setup(bottom, bottom)
    forward(layer, bottom, bottom)
    np.testing.assert_array_equal(host(bottom[0].data), [0.0, 0.0, 1.0, 1.0])


def test_float32_stays_float32(xp):
    for text in ('type: "ReLU"', 'type: "Swish"', 'type: "Dropout"'):
        layer = make_layer(text)
        bottom = make_blobs([SHAPE], xp=xp, dtype=np.float32)
        top = setup_layer(layer, bottom)
        forward(layer, bottom, top)
        top[0].diff[...] = 1
        layer.backward(top, [True], bottom)
        assert top[0].data.dtype == np.float32 and bottom[0].diff.dtype == np.float32


# -- parameter errors ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('type: "Clip" clip_param { min: -1 }', "needs both min and max; missing max"),
    ('type: "Clip"', "missing min and max"),
    ('type: "Clip" clip_param { min: 2 max: 1 }', "min must not exceed max"),
    ('type: "Exp" exp_param { base: -2 }', "base must be strictly positive, or -1"),
    ('type: "Exp" exp_param { base: 0 }', "base must be strictly positive, or -1"),
    ('type: "Log" log_param { base: -0.5 }', "base must be strictly positive, or -1"),
    ('type: "Dropout" dropout_param { dropout_ratio: 1 }', "dropout_ratio must be in [0, 1)"),
    ('type: "Dropout" dropout_param { dropout_ratio: -0.1 }', "dropout_ratio must be in"),
])
def test_bad_parameters(xp, text, expected):
    layer = make_layer(text)
    with pytest.raises(LayerError) as err:
        setup_layer(layer, make_blobs([(2, 3)], xp=xp))
    assert expected in str(err.value)
    assert f"layer '{layer.name}'" in str(err.value)


# -- PReLU -----------------------------------------------------------------------------------

def prelu_forward_reference(x, slope, shared):
    a = slope if shared else slope.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x > 0, x, a * x)


def set_slopes(layer, values):
    layer.blobs[0].data[...] = layer.blobs[0].xp.asarray(values).reshape(layer.blobs[0].shape)


@pytest.mark.parametrize("shared, shape", [(False, (2, 3, 4, 4)), (True, (2, 3, 4, 4)),
                                           (False, (3, 4)), (True, (2, 3))])
def test_prelu_forward_and_gradient(xp, shared, shape):
    layer = make_layer(f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}')
    bottom = inputs(xp, "relu", shape)
    top = setup_layer(layer, bottom)
    assert layer.blobs[0].shape == (() if shared else (shape[1],))
    slopes = np.array(-0.3) if shared else np.linspace(-0.5, 0.6, shape[1])
    set_slopes(layer, slopes)
    forward(layer, bottom, top)
    np.testing.assert_allclose(host(top[0].data),
                               prelu_forward_reference(host(bottom[0].data), slopes, shared))
    check_gradient(layer, bottom, top, stepsize=1e-4, threshold=1e-6)


def test_prelu_default_and_given_filler(xp):
    layer = make_layer('type: "PReLU"')
    setup_layer(layer, make_blobs([(2, 3, 2)], xp=xp))
    np.testing.assert_array_equal(host(layer.blobs[0].data), [0.25, 0.25, 0.25])
    layer = make_layer('type: "PReLU" prelu_param { channel_shared: true '
                       'filler { type: "constant" value: -0.5 } }')
    setup_layer(layer, make_blobs([(2, 3, 2)], xp=xp))
    assert layer.blobs[0].shape == ()
    assert float(host(layer.blobs[0].data)) == -0.5


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_in_place_and_slope_diff_accumulates(xp, shared):
    text = f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}'
    x = host(inputs(xp, "relu", (2, 3, 4))[0].data)
    dy = np.random.default_rng(3).normal(size=x.shape)
    (y1, dx1, out_of_place), (y2, dx2, in_place) = run_both_ways(xp, text, x, dy)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    expected = np.where(x > 0, 0, dy * x)
    expected = expected.sum() if shared else expected.sum(axis=(0, 2))
    for layer in (out_of_place, in_place):
        np.testing.assert_allclose(host(layer.blobs[0].diff), expected, rtol=1e-12)
    # A second backward adds to the slope diff; the bottom diff is overwritten.
    layer = out_of_place
    bottom = [Blob(x.shape, dtype=np.float64, xp=xp)]
    bottom[0].data[...] = xp.asarray(x)
    top = [Blob((), dtype=np.float64, xp=xp)]
    layer.forward(bottom, top)
    top[0].diff[...] = xp.asarray(dy)
    layer.backward(top, [True], bottom)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(host(layer.blobs[0].diff), 3 * expected, rtol=1e-12)
    np.testing.assert_allclose(host(bottom[0].diff), dx1, rtol=1e-14)


def test_prelu_honours_propagate_down_flags(xp):
    layer = make_layer('type: "PReLU"')
    bottom = make_blobs([(2, 3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    forward(layer, bottom, top)
    top[0].diff[...] = 1
    bottom[0].diff[...] = 7
    layer.param_propagate_down[0] = False
    layer.backward(top, [False], bottom)
    assert np.all(host(bottom[0].diff) == 7)
    assert np.all(host(layer.blobs[0].diff) == 0)


def test_prelu_errors(xp):
    layer = make_layer('type: "PReLU"')
    with pytest.raises(LayerError, match="at least 2 axes"):
        setup_layer(layer, make_blobs([(5,)], xp=xp))
    layer = make_layer('type: "PReLU"')
    bottom = make_blobs([(2, 3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    bottom[0].reshape((2, 4, 4))
    with pytest.raises(LayerError, match="prelu.*4 channels, the slope blob 3"):
        layer.forward(bottom, top)
    layer = make_layer('type: "PReLU" prelu_param { channel_shared: true }')
    layer.blobs = [Blob((3,), dtype=np.float64, xp=xp)]
    with pytest.raises(LayerError, match=r"slope blob has shape \(3,\), expected \(\)"):
        setup_layer(layer, make_blobs([(2, 3, 4)], xp=xp))


# -- Dropout ---------------------------------------------------------------------------------

@pytest.fixture
def seeded_mode(xp):
    """GPU mode on CuPy runs: set_random_seed only re-seeds CuPy's generator in GPU mode, and
    these tests rely on a re-seeded forward drawing the same mask."""
    if xp is not np:
        netengine.set_mode_gpu()
    yield xp
    netengine.set_mode_cpu()


def test_dropout_test_phase_is_identity(xp):
    x = host(make_blobs([SHAPE], xp=xp)[0].data)
    dy = np.random.default_rng(1).normal(size=SHAPE)
    for y, dx, _ in run_both_ways(xp, 'type: "Dropout"', x, dy, phase=TEST):
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(dx, dy)


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_dropout_train_masks_and_scales(seeded_mode, ratio):
    xp = seeded_mode
    text = f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}'
    x = host(make_blobs([(8, 10, 10)], xp=xp)[0].data)
    dy = np.random.default_rng(1).normal(size=x.shape)
    (y1, dx1, _), (y2, dx2, _) = run_both_ways(xp, text, x, dy)
    np.testing.assert_array_equal(y1, y2)  # same seed: same mask in place and out of place
    np.testing.assert_array_equal(dx1, dx2)
    scale = 1 / (1 - f32(ratio))
    kept = y1 != 0
    np.testing.assert_allclose(y1[kept], x[kept] * scale, rtol=1e-12)
    np.testing.assert_allclose(dx1[kept], dy[kept] * scale, rtol=1e-12)
    assert np.all(dx1[~kept] == 0)
    assert abs(kept.mean() - (1 - ratio)) < 0.06


def test_dropout_train_gradient_and_fresh_masks(seeded_mode):
    xp = seeded_mode
    layer = make_layer('type: "Dropout"')
    bottom = make_blobs([(2, 3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, elementwise=True)
    forward(layer, bottom, top, seed=1)
    first = host(top[0].data).copy()
    forward(layer, bottom, top, seed=2)
    assert not np.array_equal(first, host(top[0].data))


def test_dropout_train_golden_input(xp):
    """Caffe's own dropout_train case obeys the same law (0 or x/(1-p), diff with the mask);
    ours, run on its input through the net, does too."""
    case = need_shared("caffe-golden", "cases", "dropout_train.npz")
    ref = np.load(case)
    x, y_ref = ref["bottom/data"], ref["top/out"]
    dy, dx_ref = ref["top_diff/out"], ref["bottom_diff/data"]
    kept = y_ref != 0
    np.testing.assert_allclose(y_ref[kept], 2 * x[kept], rtol=1e-6)
    np.testing.assert_allclose(dx_ref, np.where(kept, 2 * dy, 0), rtol=1e-6)
    if xp is not np:
        netengine.set_mode_gpu()
    try:
        net = netengine.Net(str(case.with_suffix(".prototxt")), netengine.TRAIN)
        net.blobs["data"].data[...] = xp.asarray(x)
        net.forward()
        y = host(net.blobs["out"].data)
        net.blobs["out"].diff[...] = xp.asarray(dy)
        net.backward()
        dx = host(net.blobs["data"].diff)
    finally:
        netengine.set_mode_cpu()
    kept = y != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(y[kept], 2 * x[kept], rtol=1e-6)
    np.testing.assert_allclose(dx, np.where(kept, 2 * dy, 0), rtol=1e-6)
