"""LSTMUnit, RNN and LSTM: formulas against step-by-step references, Caffe's blob shapes and
order, sequence resets through cont, the carried state, exposed states, gradients."""
from __future__ import annotations

import numpy as np
import pytest

import netengine as caffe
from netengine import backend
from netengine.errors import LayerError
from netengine.testing import check_gradient, make_blobs, make_layer, setup_layer

FILLERS = ('weight_filler { type: "gaussian" std: 0.4 } '
           'bias_filler { type: "gaussian" std: 0.4 }')


def host(a):
    return backend.to_host(a)


def sig(x):
    return 1 / (1 + np.exp(-x))


def recurrent(kind: str, hidden: int = 3, expose: bool = False):
    extra = " expose_hidden: true" if expose else ""
    return make_layer(f'type: "{kind}" recurrent_param {{ num_output: {hidden} {FILLERS}{extra} }}')


def cont_blob(xp, rows, dtype=np.float64):
    blob = make_blobs([np.shape(rows)], xp=xp, dtype=dtype)[0]
    blob.data[...] = backend.to_module(np.asarray(rows, dtype=dtype), xp)
    return blob


# -- references, one step at a time (float64, NumPy) ----------------------------------------------
def lstm_reference(x, cont, w_xc, b_c, w_hc, h, c, static=None, w_static=None):
    hidden = w_hc.shape[1]
    outs = []
    for t in range(x.shape[0]):
        gates = x[t].reshape(x.shape[1], -1) @ w_xc.T + b_c + (cont[t][:, None] * h) @ w_hc.T
        if static is not None:
            gates = gates + static.reshape(static.shape[0], -1) @ w_static.T
        i, f = sig(gates[:, :hidden]), cont[t][:, None] * sig(gates[:, hidden:2 * hidden])
        o, g = sig(gates[:, 2 * hidden:3 * hidden]), np.tanh(gates[:, 3 * hidden:])
        c = f * c + i * g
        h = o * np.tanh(c)
        outs.append(h)
    return np.stack(outs), h, c


def rnn_reference(x, cont, w_xh, b_h, w_hh, w_ho, b_o, h):
    outs = []
    for t in range(x.shape[0]):
        h = np.tanh(x[t].reshape(x.shape[1], -1) @ w_xh.T + b_h + (cont[t][:, None] * h) @ w_hh.T)
        outs.append(np.tanh(h @ w_ho.T + b_o))
    return np.stack(outs), h


CONT = [[0, 0], [1, 1], [1, 0], [1, 1]]  # stream 1 starts a new sequence at t = 2


# -- LSTMUnit ---------------------------------------------------------------------------------
def test_lstm_unit_forward_and_gradient(xp):
    layer = make_layer('type: "LSTMUnit"')
    bottom = make_blobs([(1, 3, 2), (1, 3, 8)], xp=xp) + [cont_blob(xp, [[1, 0, 1]])]
    top = setup_layer(layer, bottom, num_tops=2)
    layer.forward(bottom, top)
    c_prev, gates, cont = host(bottom[0].data)[0], host(bottom[1].data)[0], np.array([1, 0, 1.])
    i, f = sig(gates[:, :2]), cont[:, None] * sig(gates[:, 2:4])
    o, g = sig(gates[:, 4:6]), np.tanh(gates[:, 6:])
    c = f * c_prev + i * g
    np.testing.assert_allclose(host(top[0].data)[0], c, rtol=1e-12)
    np.testing.assert_allclose(host(top[1].data)[0], o * np.tanh(c), rtol=1e-12)
    check_gradient(layer, bottom, top, check_bottom=[0, 1])
    with pytest.raises(LayerError, match="sequence indicators"):
        layer.backward(top, [False, False, True], bottom)


def test_lstm_unit_checks_shapes():
    layer = make_layer('type: "LSTMUnit"')
    bottom = make_blobs([(1, 3, 2), (1, 3, 7), (1, 3)])
    with pytest.raises(LayerError, match=r"gate inputs\) must be \(1, 3, 8\)"):
        setup_layer(layer, bottom, num_tops=2)


# -- LSTM -------------------------------------------------------------------------------------
@pytest.mark.parametrize("static", [False, True])
def test_lstm_matches_the_step_reference_and_caffe_blob_order(xp, static):
    layer = recurrent("LSTM")
    shapes = [(4, 2, 3, 2)] + ([(2, 5)] if static else [])
    x, *rest = make_blobs(shapes, xp=xp)
    bottom = [x, cont_blob(xp, CONT)] + rest
    top = setup_layer(layer, bottom)
    expected_shapes = [(12, 6), (12,)] + ([(12, 5)] if static else []) + [(12, 3)]
    assert [b.shape for b in layer.blobs] == expected_shapes and top[0].shape == (4, 2, 3)
    layer.forward(bottom, top)
    w = [host(b.data) for b in layer.blobs]
    zeros = np.zeros((2, 3))
    ref, _, _ = lstm_reference(host(x.data), np.array(CONT, float), w[0], w[1], w[-1], zeros,
                               zeros, host(rest[0].data) if static else None,
                               w[2] if static else None)
    np.testing.assert_allclose(host(top[0].data), ref, rtol=1e-10, atol=1e-12)
    check_gradient(layer, bottom, top, check_bottom=[0] + ([2] if static else []))


def test_lstm_exposed_states_and_their_gradients(xp):
    layer = recurrent("LSTM", expose=True)
    x, h0, c0 = make_blobs([(3, 2, 4), (1, 2, 3), (1, 2, 3)], xp=xp)
    bottom = [x, cont_blob(xp, [[1, 1], [1, 0], [1, 1]]), h0, c0]
    top = setup_layer(layer, bottom, num_tops=3)
    assert [t.shape for t in top] == [(3, 2, 3), (1, 2, 3), (1, 2, 3)]
    layer.forward(bottom, top)
    w = [host(b.data) for b in layer.blobs]
    ref, h_t, c_t = lstm_reference(host(x.data), np.array([[1, 1], [1, 0], [1, 1.]]), w[0],
                                   w[1], w[2], host(h0.data)[0], host(c0.data)[0])
    np.testing.assert_allclose(host(top[0].data), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(top[1].data)[0], h_t, rtol=1e-10)
    np.testing.assert_allclose(host(top[2].data)[0], c_t, rtol=1e-10)
    check_exposed_backward(layer, bottom, top, first_state=2)


def check_exposed_backward(layer, bottom, top, first_state):
    """Caffe's rule for exposed states: their top diffs are ignored and no gradient reaches
    the initial-state bottoms; x's gradient is that of the output top alone."""
    rng = np.random.default_rng(3)
    xp = bottom[0].xp
    weight = rng.normal(size=top[0].shape)
    layer.forward(bottom, top)
    top[0].diff[...] = backend.to_module(weight, xp)
    grads = []
    for state_diff in (1.0, 0.0):
        for t in top[1:]:
            t.diff[...] = state_diff
        for b in bottom:
            b.diff[...] = 7.0
        layer.backward(top, [i != 1 for i in range(len(bottom))], bottom)
        grads.append(host(bottom[0].diff).copy())
        for b in bottom[first_state:]:
            assert not host(b.diff).any()
    np.testing.assert_array_equal(grads[0], grads[1])
    x = bottom[0].data
    for index in [(0, 0, 0), (1, 1, 2), (2, 0, 3)]:
        values = []
        for step in (1e-5, -1e-5):
            x[index] += step
            layer.forward(bottom, top)
            values.append(float((host(top[0].data) * weight).sum()))
            x[index] -= step
        numeric = (values[0] - values[1]) / 2e-5
        np.testing.assert_allclose(grads[0][index], numeric, rtol=1e-5, atol=1e-8)


def test_lstm_carries_its_state_across_forward_passes_unless_cont_resets_it():
    layer = recurrent("LSTM")
    x = make_blobs([(2, 1, 2)])[0]
    top = setup_layer(layer, [x, cont_blob(np, [[0], [1]])])
    layer.forward([x, cont_blob(np, [[0], [1]])], top)
    first = host(top[0].data).copy()
    layer.forward([x, cont_blob(np, [[1], [1]])], top)  # continues from the last state
    assert not np.allclose(host(top[0].data), first)
    layer.forward([x, cont_blob(np, [[0], [1]])], top)  # a new sequence: same as the first
    np.testing.assert_allclose(host(top[0].data), first, rtol=1e-12)


def test_lstm_refuses_bad_shapes_and_cont_gradient():
    layer = recurrent("LSTM")
    x = make_blobs([(4, 2, 3)])[0]
    with pytest.raises(LayerError, match=r"cont\) must be \(T, N\) = \(4, 2\)"):
        setup_layer(layer, [x, cont_blob(np, [[1, 1]])])
    with pytest.raises(LayerError, match=r"expects bottoms x, cont\[, x_static\]: 2 or 3 "
                                          "of them, got 4"):
        setup_layer(recurrent("LSTM"), [x, cont_blob(np, [[1, 1]] * 4), *make_blobs([(2,)] * 2)])
    top = setup_layer(layer, [x, cont_blob(np, [[1, 1]] * 4)])
    layer.forward([x, cont_blob(np, [[1, 1]] * 4)], top)
    with pytest.raises(LayerError, match="sequence indicators"):
        layer.backward(top, [False, True], [x, cont_blob(np, [[1, 1]] * 4)])


# -- RNN --------------------------------------------------------------------------------------
def test_rnn_matches_the_step_reference_and_caffe_blob_order(xp):
    layer = recurrent("RNN")
    x = make_blobs([(4, 2, 5)], xp=xp)[0]
    bottom = [x, cont_blob(xp, CONT)]
    top = setup_layer(layer, bottom)
    assert [b.shape for b in layer.blobs] == [(3, 5), (3,), (3, 3), (3, 3), (3,)]
    layer.forward(bottom, top)
    w = [host(b.data) for b in layer.blobs]
    ref, _ = rnn_reference(host(x.data), np.array(CONT, float), *w, np.zeros((2, 3)))
    np.testing.assert_allclose(host(top[0].data), ref, rtol=1e-10, atol=1e-12)
    check_gradient(layer, bottom, top, check_bottom=[0])


def test_rnn_exposed_hidden_and_static_input(xp):
    layer = recurrent("RNN", expose=True)
    x, xs, h0 = make_blobs([(3, 2, 4), (2, 3), (1, 2, 3)], xp=xp)
    bottom = [x, cont_blob(xp, [[1, 1], [1, 0], [1, 1]]), xs, h0]
    top = setup_layer(layer, bottom, num_tops=2)
    assert [b.shape for b in layer.blobs] == [(3, 4), (3,), (3, 3), (3, 3), (3, 3), (3,)]
    assert top[1].shape == (1, 2, 3)
    layer.forward(bottom, top)
    w = [host(b.data) for b in layer.blobs]
    xw_static = host(xs.data) @ w[2].T
    ref, h_t = rnn_reference(host(x.data), np.array([[1, 1], [1, 0], [1, 1.]]), w[0],
                             w[1] + xw_static, w[3], w[4], w[5], host(h0.data)[0])
    np.testing.assert_allclose(host(top[0].data), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(top[1].data)[0], h_t, rtol=1e-10)
    check_exposed_backward(layer, bottom, top, first_state=3)


def test_rnn_output_gradient_survives_an_in_place_layer_on_its_top(xp):
    """The backward pass must not read o back from the top: an in-place layer may have
    rewritten it (Sigmoid here)."""
    layer = recurrent("RNN")
    x = make_blobs([(3, 2, 4)], xp=xp)[0]
    bottom = [x, cont_blob(xp, [[0, 0], [1, 1], [1, 1]])]
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = 1.0
    layer.backward(top, [True, False], bottom)
    clean = host(bottom[0].diff).copy()
    layer.forward(bottom, top)
    top[0].data[...] = 0.0  # what an in-place layer might leave
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(host(bottom[0].diff), clean)


# -- in a net ------------------------------------------------------------------------------------
LRCN = """name: "seq"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 5 dim: 2 dim: 4 } } }
layer { name: "cont" type: "Input" top: "cont" input_param { shape { dim: 5 dim: 2 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
        recurrent_param { num_output: 6 weight_filler { type: "uniform" min: -0.1 max: 0.1 }
                          bias_filler { type: "constant" value: 0 } } }
layer { name: "out" type: "InnerProduct" bottom: "h" top: "y"
        inner_product_param { num_output: 3 axis: 2 weight_filler { type: "xavier" } } }
"""


def test_lstm_net_runs_saves_and_reloads(tmp_path):
    path = tmp_path / "seq.prototxt"
    path.write_text(LRCN)
    net = caffe.Net(str(path), caffe.TEST)
    x = np.random.default_rng(0).normal(size=(5, 2, 4))
    cont = np.ones((5, 2))
    cont[0] = 0
    y = net.forward(x=x, cont=cont)["y"].copy()
    assert y.shape == (5, 2, 3) and np.isfinite(y).all()
    net.save(str(tmp_path / "seq.caffemodel"))
    again = caffe.Net(str(path), caffe.TEST, weights=str(tmp_path / "seq.caffemodel"))
    np.testing.assert_array_equal(again.forward(x=x, cont=cont)["y"], y)
