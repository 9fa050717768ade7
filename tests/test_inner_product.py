"""InnerProduct and Embed: shapes, forward formulas, gradients, errors."""
from __future__ import annotations

import numpy as np
import pytest

from netengine import backend
from netengine.errors import LayerError
from netengine.testing import check_gradient, make_blobs, make_layer, setup_layer

GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def host(a):
    return backend.to_host(a)


def ip(params: str):
    return make_layer(f'type: "InnerProduct" inner_product_param {{ {params} {GAUSS} }}')


@pytest.mark.parametrize("params, shape, top_shape", [
    ("num_output: 4", (2, 3, 2, 2), (2, 4)),
    ("num_output: 4 bias_term: false", (2, 3, 2, 2), (2, 4)),
    ("num_output: 4 transpose: true", (2, 3, 2, 2), (2, 4)),
    ("num_output: 4 axis: 2", (2, 3, 2, 2), (2, 3, 4)),
    ("num_output: 4 axis: -1 transpose: true bias_term: false", (2, 3, 2), (2, 3, 4)),
])
def test_inner_product_forward_and_gradient(xp, params, shape, top_shape):
    layer = ip(params)
    bottom = make_blobs([shape], xp=xp)
    top = setup_layer(layer, bottom)
    assert top[0].shape == top_shape
    layer.forward(bottom, top)
    axis = len(top_shape) - 1
    x = host(bottom[0].data).reshape(int(np.prod(shape[:axis])), -1)
    w = host(layer.blobs[0].data)
    expected = x @ (w if "transpose: true" in params else w.T)
    if "bias_term: false" in params:
        assert len(layer.blobs) == 1
    else:
        expected = expected + host(layer.blobs[1].data)
    np.testing.assert_allclose(host(top[0].data).reshape(expected.shape), expected, rtol=1e-12)
    check_gradient(layer, bottom, top)


def test_inner_product_weight_shapes_and_default_fillers(xp):
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 5 }')
    top = setup_layer(layer, make_blobs([(2, 3, 4)], xp=xp))
    assert [b.shape for b in layer.blobs] == [(5, 12), (5,)]
    assert not np.any(host(layer.blobs[0].data)) and not np.any(host(layer.blobs[1].data))
    assert top[0].shape == (2, 5)
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 5 transpose: true }')
    setup_layer(layer, make_blobs([(2, 3, 4)], xp=xp))
    assert layer.blobs[0].shape == (12, 5)


def test_inner_product_param_diffs_accumulate(xp):
    layer = ip("num_output: 3")
    bottom = make_blobs([(2, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    once = [host(b.diff).copy() for b in layer.blobs]
    layer.backward(top, [True], bottom)
    for blob, first in zip(layer.blobs, once):
        np.testing.assert_allclose(host(blob.diff), 2 * first)


def test_inner_product_reshape_new_batch_same_k(xp):
    layer = ip("num_output: 3")
    bottom = make_blobs([(2, 3, 2)], xp=xp)
    top = setup_layer(layer, bottom)
    bottom[0].reshape((5, 6))
    layer.forward(bottom, top)
    assert top[0].shape == (5, 3)


def test_inner_product_reshape_refuses_changed_k(xp):
    layer = ip("num_output: 3")
    bottom = make_blobs([(2, 3, 2)], xp=xp)
    top = setup_layer(layer, bottom)
    bottom[0].reshape((2, 7))
    with pytest.raises(LayerError, match="expected 6 values") as err:
        layer.forward(bottom, top)
    assert "innerproduct" in str(err.value)


def test_inner_product_bad_params(xp):
    with pytest.raises(LayerError, match="num_output"):
        setup_layer(make_layer('type: "InnerProduct"'), make_blobs([(2, 3)], xp=xp))
    with pytest.raises(LayerError, match="axis"):
        setup_layer(ip("num_output: 2 axis: 3"), make_blobs([(2, 3)], xp=xp))


def embed(params: str):
    return make_layer(f'type: "Embed" embed_param {{ {params} {GAUSS} }}')


@pytest.mark.parametrize("bias", [True, False])
def test_embed_forward_and_weight_gradient(xp, bias):
    layer = embed(f"num_output: 3 input_dim: 5 bias_term: {str(bias).lower()}")
    bottom = make_blobs([(2, 3)], xp=xp)
    index = np.array([[0, 4, 2], [2, 1, 2]], dtype=np.float64)  # repeats sum in the gradient
    bottom[0].data[...] = xp.asarray(index)
    top = setup_layer(layer, bottom)
    assert top[0].shape == (2, 3, 3)
    assert layer.blobs[0].shape == (5, 3)
    layer.forward(bottom, top)
    expected = host(layer.blobs[0].data)[index.astype(int)]
    if bias:
        expected = expected + host(layer.blobs[1].data)
    np.testing.assert_allclose(host(top[0].data), expected)
    check_gradient(layer, bottom, top, check_bottom=[])


def test_embed_errors(xp):
    layer = embed("num_output: 3 input_dim: 5")
    bottom = make_blobs([(4,)], xp=xp)
    bottom[0].data[...] = xp.asarray([0.0, 1.0, 5.0, 2.0])
    top = setup_layer(layer, bottom)
    with pytest.raises(LayerError, match=r"\[0, 5\)"):
        layer.forward(bottom, top)
    bottom[0].data[...] = xp.asarray([0.0, 1.5, 4.0, 2.0])
    with pytest.raises(LayerError, match="integer"):
        layer.forward(bottom, top)
    bottom[0].data[...] = xp.asarray([0.0, 1.0, 4.0, 2.0])
    layer.forward(bottom, top)
    assert not layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="indices"):
        layer.backward(top, [True], bottom)
    with pytest.raises(LayerError, match="input_dim"):
        setup_layer(make_layer('type: "Embed" embed_param { num_output: 2 }'), bottom)
