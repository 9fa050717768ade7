"""Reduction and ArgMax: shapes, forward against NumPy, gradients, Caffe's tie rule, errors."""
from __future__ import annotations

import numpy as np
import pytest

from netengine import backend
from netengine.blob import Blob
from netengine.errors import LayerError
from netengine.testing import check_gradient, forward, make_blobs, make_layer, setup_layer

SHAPE = (2, 3, 4, 5)


def host(a):
    return backend.to_host(a).astype(np.float64)


def f32(v):
    return float(np.float32(v))


# -- Reduction -------------------------------------------------------------------------------

OPS = {
    "SUM": lambda x: x,
    "ASUM": np.abs,
    "SUMSQ": np.square,
    "MEAN": lambda x: x,
}


def reduction(op, axis=None, coeff=None):
    fields = f"operation: {op}"
    if axis is not None:
        fields += f" axis: {axis}"
    if coeff is not None:
        fields += f" coeff: {coeff}"
    return make_layer(f'type: "Reduction" reduction_param {{ {fields} }}')


def away_from_zero(xp, shape, seed=0):
    bottom = make_blobs([shape], xp=xp, seed=seed)
    x = host(bottom[0].data)
    bottom[0].data[...] = xp.asarray(np.where(np.abs(x) < 0.05, x + 0.1, x))
    return bottom


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("axis", [None, 1, 2, -1])
def test_reduction_forward(xp, op, axis):
    layer = reduction(op, axis, coeff=-1.5 if axis == 2 else None)
    bottom = make_blobs([SHAPE], xp=xp)
    top = setup_layer(layer, bottom)
    start = 0 if axis is None else axis % len(SHAPE)
    assert top[0].shape == SHAPE[:start]
    forward(layer, bottom, top)
    x = host(bottom[0].data).reshape(int(np.prod(SHAPE[:start])), -1)
    expected = OPS[op](x).sum(axis=1) * (f32(-1.5) if axis == 2 else 1.0)
    if op == "MEAN":
        expected /= x.shape[1]
    np.testing.assert_allclose(host(top[0].data).reshape(-1), expected, rtol=1e-12)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("axis, coeff", [(None, None), (1, 0.5), (3, None)])
def test_reduction_gradient(xp, op, axis, coeff):
    layer = reduction(op, axis, coeff)
    bottom = away_from_zero(xp, (2, 3, 2, 3))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, stepsize=1e-4, threshold=1e-6)


def test_reduction_default_is_sum_to_a_scalar(xp):
    layer = make_layer('type: "Reduction"')
    bottom = make_blobs([(3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    forward(layer, bottom, top)
    assert top[0].shape == ()
    np.testing.assert_allclose(float(host(top[0].data)), host(bottom[0].data).sum(), rtol=1e-12)


def test_reduction_asum_gradient_is_zero_at_zero(xp):
    layer = reduction("ASUM", 1)
    bottom = [Blob((1, 3), dtype=np.float64, xp=xp)]
    bottom[0].data[...] = xp.asarray([[-2.0, 0.0, 3.0]])
    top = setup_layer(layer, bottom)
    forward(layer, bottom, top)
    top[0].diff[...] = 2
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(host(bottom[0].diff), [[-2.0, 0.0, 2.0]])


def test_reduction_follows_a_reshaped_bottom(xp):
    layer = reduction("MEAN", 1)
    bottom = make_blobs([(2, 3)], xp=xp)
    top = setup_layer(layer, bottom)
    bottom[0].reshape((4, 5, 2))
    bottom[0].data[...] = 1.0
    forward(layer, bottom, top)
    assert top[0].shape == (4,)
    np.testing.assert_allclose(host(top[0].data), np.ones(4))


def test_reduction_errors(xp):
    with pytest.raises(LayerError) as err:
        setup_layer(reduction("SUM", 4), make_blobs([SHAPE], xp=xp))
    assert "layer 'reduction'" in str(err.value)
    assert "axis 4 is out of range for a bottom of shape (2, 3, 4, 5)" in str(err.value)
    layer = reduction("SUM", 1)
    bottom = make_blobs([SHAPE], xp=xp)
    with pytest.raises(LayerError, match="in-place"):
        layer.setup(bottom, bottom)


# -- ArgMax ----------------------------------------------------------------------------------

def argmax(fields=""):
    return make_layer(f'type: "ArgMax" argmax_param {{ {fields} }}')


def topk_reference(x, k):
    """Caffe's order: values descending, equal values by index descending."""
    order = np.lexsort((-np.arange(x.shape[-1]) + np.zeros_like(x), -x), axis=-1)
    return order[..., :k]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_flattened(xp, k, out_max_val):
    layer = argmax(f"top_k: {k} out_max_val: {str(out_max_val).lower()}")
    bottom = make_blobs([SHAPE], xp=xp)
    top = setup_layer(layer, bottom)
    assert top[0].shape == (2, 2 if out_max_val else 1, k, 1)
    forward(layer, bottom, top)
    x = host(bottom[0].data).reshape(2, -1)
    idx = topk_reference(x, k)
    y = host(top[0].data)
    np.testing.assert_array_equal(y[:, 0, :, 0], idx)
    if out_max_val:
        np.testing.assert_array_equal(y[:, 1, :, 0], np.take_along_axis(x, idx, axis=1))


def test_argmax_flattened_pads_the_top_to_three_axes(xp):
    layer = argmax()
    bottom = make_blobs([(4, 6)], xp=xp)
    top = setup_layer(layer, bottom)
    assert top[0].shape == (4, 1, 1)
    forward(layer, bottom, top)
    np.testing.assert_array_equal(host(top[0].data).reshape(-1),
                                  host(bottom[0].data).argmax(axis=1))


@pytest.mark.parametrize("axis", [1, 2, -1])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_along_an_axis(xp, axis, out_max_val):
    layer = argmax(f"axis: {axis} top_k: 2 out_max_val: {str(out_max_val).lower()}")
    bottom = make_blobs([SHAPE], xp=xp)
    top = setup_layer(layer, bottom)
    a = axis % 4
    assert top[0].shape == SHAPE[:a] + (2,) + SHAPE[a + 1:]
    forward(layer, bottom, top)
    x = np.moveaxis(host(bottom[0].data), a, -1)
    idx = topk_reference(x, 2)
    expected = np.take_along_axis(x, idx, axis=-1) if out_max_val else idx
    np.testing.assert_array_equal(host(top[0].data), np.moveaxis(expected, -1, a))


def test_argmax_ties_go_to_the_higher_index(xp):
    layer = argmax("top_k: 3")
    bottom = [Blob((2, 5), dtype=np.float64, xp=xp)]
    bottom[0].data[...] = xp.asarray([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    top = setup_layer(layer, bottom)
    forward(layer, bottom, top)
    np.testing.assert_array_equal(host(top[0].data)[:, 0, :], [[4, 2, 1], [4, 3, 2]])


def test_argmax_has_no_backward(xp):
    layer = argmax()
    bottom = make_blobs([(2, 3)], xp=xp)
    top = setup_layer(layer, bottom)
    forward(layer, bottom, top)
    assert not layer.allow_force_backward(0)
    layer.backward(top, [False], bottom)
    with pytest.raises(LayerError, match="argmax.*cannot back-propagate"):
        layer.backward(top, [True], bottom)


@pytest.mark.parametrize("fields, shape, expected", [
    ("top_k: 0", (2, 3), "top_k must be at least 1; got 0"),
    ("top_k: 7", (2, 3, 2), "top_k 7 exceeds the 6 values per item"),
    ("axis: 1 top_k: 4", (2, 3, 2), "top_k 4 exceeds the size 3 of axis 1"),
    ("axis: 3", (2, 3, 2), "axis 3 is out of range for a bottom of shape (2, 3, 2)"),
    ("axis: -4", (2, 3, 2), "axis -4 is out of range"),
])
def test_argmax_errors(xp, fields, shape, expected):
    with pytest.raises(LayerError) as err:
        setup_layer(argmax(fields), make_blobs([shape], xp=xp))
    assert expected in str(err.value)
    assert "layer 'argmax' (ArgMax)" in str(err.value)
