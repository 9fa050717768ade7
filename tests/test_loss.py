"""Softmax, the loss layers and Accuracy: formulas, gradients, normalisation, errors."""
from __future__ import annotations

import numpy as np
import pytest

from netengine import backend
from netengine.errors import LayerError, NetEngineError
from netengine.testing import check_gradient, make_blobs, make_layer, setup_layer


def host(a):
    return backend.to_host(a)


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def with_labels(xp, shapes, labels, at=-1):
    """Blobs for `shapes`, blob `at` (default the last) overwritten with the integer `labels`."""
    blobs = make_blobs(shapes, xp=xp)
    blobs[at].data[...] = xp.asarray(np.asarray(labels, dtype=np.float64).reshape(shapes[at]))
    return blobs


# -- Softmax ----------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_forward_and_gradient(xp, axis):
    layer = make_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}')
    bottom = make_blobs([(2, 3, 4)], xp=xp, scale=3.0)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    np.testing.assert_allclose(host(top[0].data), np_softmax(host(bottom[0].data), axis),
                               rtol=1e-12)
    check_gradient(layer, bottom, top)


def test_softmax_is_max_subtracted(xp):
    layer = make_layer('type: "Softmax"')
    bottom = make_blobs([(2, 3)], xp=xp)
    bottom[0].data[...] = xp.asarray([[1000.0, 1001.0, 1002.0], [-1000.0, -1000.0, -1000.0]])
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    np.testing.assert_allclose(host(top[0].data)[1], [1 / 3] * 3)
    assert np.all(np.isfinite(host(top[0].data)))


def test_softmax_in_place(xp):
    layer = make_layer('type: "Softmax"')
    bottom = make_blobs([(2, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = xp.asarray(np.arange(8.0).reshape(2, 4))
    layer.backward(top, [True], bottom)
    expected = host(bottom[0].diff).copy()
    blob = make_blobs([(2, 4)], xp=xp)[0]  # same data as bottom, now run in place
    layer.forward([blob], [blob])
    blob.diff[...] = xp.asarray(np.arange(8.0).reshape(2, 4))
    layer.backward([blob], [True], [blob])
    np.testing.assert_allclose(host(blob.diff), expected)
    np.testing.assert_allclose(host(blob.data), host(top[0].data))


# -- SoftmaxWithLoss --------------------------------------------------------------------------
LABELS = [[0, 3, 1], [2, -1, 3]]  # shape (2, 3): one label per (item, spatial) position


def softmax_loss_reference(x, labels, ignore, mode):
    prob = np_softmax(x, 1)
    labels = np.asarray(labels).reshape(x.shape[0], -1)
    valid = labels != ignore if ignore is not None else np.ones(labels.shape, bool)
    safe = np.where(valid, labels, 0)
    picked = np.take_along_axis(prob.reshape(x.shape[0], x.shape[1], -1), safe[:, None], 1)[:, 0]
    total = -np.sum(np.log(np.maximum(picked, np.finfo(np.float32).tiny)) * valid)
    norm = {"FULL": labels.size, "VALID": valid.sum(), "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    return total / max(norm, 1)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("ignore", [None, -1])
def test_softmax_loss_normalizations(xp, mode, ignore):
    loss_param = f"normalization: {mode}" + (f" ignore_label: {ignore}" if ignore is not None
                                              else "")
    labels = LABELS if ignore is not None else [[0, 3, 1], [2, 2, 3]]
    layer = make_layer(f'type: "SoftmaxWithLoss" loss_param {{ {loss_param} }}')
    bottom = with_labels(xp, [(2, 4, 3), (2, 3)], labels)
    top = setup_layer(layer, bottom)
    assert top[0].shape == ()
    loss = layer.forward(bottom, top)
    expected = softmax_loss_reference(host(bottom[0].data), labels, ignore, mode)
    assert float(host(top[0].data)) == pytest.approx(expected, rel=1e-12)
    assert loss == pytest.approx(expected, rel=1e-12)
    check_gradient(layer, bottom, top, check_bottom=[0])
    if ignore is not None:  # ignored position: zero gradient
        layer.backward(top, [True, False], bottom)
        assert not np.any(host(bottom[0].diff)[1, :, 1])


@pytest.mark.parametrize("normalize, mode", [("true", "VALID"), ("false", "BATCH_SIZE")])
def test_softmax_loss_deprecated_normalize(xp, normalize, mode):
    layer = make_layer(f'type: "SoftmaxWithLoss" loss_param {{ normalize: {normalize} '
                       f'ignore_label: -1 }}')
    bottom = with_labels(xp, [(2, 4, 3), (2, 3)], LABELS)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    expected = softmax_loss_reference(host(bottom[0].data), LABELS, -1, mode)
    assert float(host(top[0].data)) == pytest.approx(expected, rel=1e-12)
    # `normalization` set explicitly wins over `normalize`
    layer = make_layer('type: "SoftmaxWithLoss" loss_param { normalize: false '
                       'normalization: NONE ignore_label: -1 }')
    setup_layer(layer, bottom)
    layer.forward(bottom, top)
    expected = softmax_loss_reference(host(bottom[0].data), LABELS, -1, "NONE")
    assert float(host(top[0].data)) == pytest.approx(expected, rel=1e-12)


def test_softmax_loss_all_ignored_clamps_normalizer(xp):
    layer = make_layer('type: "SoftmaxWithLoss" loss_param { ignore_label: 7 }')
    bottom = with_labels(xp, [(2, 3), (2,)], [7, 7])
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    assert float(host(top[0].data)) == 0.0
    layer.backward(top, [True, False], bottom)
    assert not np.any(host(bottom[0].diff))


def test_softmax_loss_gradient_formula_and_loss_weight(xp):
    layer = make_layer('type: "SoftmaxWithLoss" loss_weight: 2.5')
    bottom = with_labels(xp, [(3, 4), (3,)], [1, 0, 3])
    top = setup_layer(layer, bottom)
    loss = layer.forward(bottom, top)
    assert float(host(top[0].diff)) == 2.5
    assert loss == pytest.approx(2.5 * float(host(top[0].data)))  # the top itself is unscaled
    layer.backward(top, [True, False], bottom)
    prob = np_softmax(host(bottom[0].data), 1)
    expected = (prob - np.eye(4)[[1, 0, 3]]) * 2.5 / 3
    np.testing.assert_allclose(host(bottom[0].diff), expected, rtol=1e-12)


def test_softmax_loss_axis_and_prob_top(xp):
    layer = make_layer('type: "SoftmaxWithLoss" softmax_param { axis: 2 }')
    bottom = with_labels(xp, [(2, 3, 4), (2, 3)], [[0, 1, 3], [2, 3, 0]])
    top = setup_layer(layer, bottom, 2)
    assert top[1].shape == (2, 3, 4)
    layer.forward(bottom, top)
    np.testing.assert_allclose(host(top[1].data), np_softmax(host(bottom[0].data), 2))
    moved = np.moveaxis(host(bottom[0].data), 2, 1)
    expected = softmax_loss_reference(moved, [[0, 1, 3], [2, 3, 0]], None, "VALID")
    assert float(host(top[0].data)) == pytest.approx(expected, rel=1e-12)
    layer = make_layer('type: "SoftmaxWithLoss" softmax_param { axis: 2 }')
    check_gradient(layer, bottom, setup_layer(layer, bottom), check_bottom=[0])


def test_softmax_loss_errors(xp):
    layer = make_layer('type: "SoftmaxWithLoss"')
    with pytest.raises(LayerError, match="number of labels") as err:
        setup_layer(layer, with_labels(xp, [(2, 4, 3), (2, 2)], [[0, 1], [2, 3]]))
    assert "softmaxwithloss" in str(err.value) and "need 6 labels, got 4" in str(err.value)
    bottom = with_labels(xp, [(2, 4), (2,)], [1, 4])
    top = setup_layer(layer, bottom)
    with pytest.raises(LayerError, match=r"\[0, 4\)"):
        layer.forward(bottom, top)
    bottom[1].data[...] = xp.asarray([1.0, 3.0])
    layer.forward(bottom, top)
    assert not layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="labels"):
        layer.backward(top, [True, True], bottom)
    with pytest.raises(LayerError, match="at most 2 top"):
        setup_layer(make_layer('type: "SoftmaxWithLoss"'), bottom, 3)


# -- EuclideanLoss ----------------------------------------------------------------------------
def test_euclidean_loss(xp):
    layer = make_layer('type: "EuclideanLoss"')
    bottom = make_blobs([(3, 2, 2), (3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    a, b = host(bottom[0].data).reshape(3, 4), host(bottom[1].data)
    assert float(host(top[0].data)) == pytest.approx(np.sum((a - b) ** 2) / 6, rel=1e-12)
    assert layer.allow_force_backward(1)
    check_gradient(layer, bottom, top)
    with pytest.raises(LayerError, match="same number of values"):
        setup_layer(layer, make_blobs([(3, 4), (3, 5)], xp=xp))


# -- SigmoidCrossEntropyLoss ------------------------------------------------------------------
def sigmoid_ce_reference(x, t, valid, norm):
    p = 1 / (1 + np.exp(-x))
    return -np.sum((t * np.log(p) + (1 - t) * np.log(1 - p)) * valid) / norm


@pytest.mark.parametrize("loss_param, norm", [
    ("", "batch"), ("normalization: FULL", "full"), ("normalize: true", "valid"),
    ("ignore_label: -1", "batch"), ("ignore_label: -1 normalization: VALID", "valid"),
])
def test_sigmoid_cross_entropy_loss(xp, loss_param, norm):
    layer = make_layer(f'type: "SigmoidCrossEntropyLoss" loss_param {{ {loss_param} }}')
    bottom = make_blobs([(3, 4), (3, 4)], xp=xp, scale=3.0)
    target = np.random.default_rng(1).uniform(size=(3, 4))
    target[1, 2] = target[2, 0] = -1  # ignored only when ignore_label is -1
    bottom[1].data[...] = xp.asarray(target)
    valid = target != -1 if "ignore_label" in loss_param else np.ones(target.shape, bool)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    divisor = {"batch": 3, "full": 12, "valid": valid.sum()}[norm]
    expected = sigmoid_ce_reference(host(bottom[0].data), target, valid, divisor)
    assert float(host(top[0].data)) == pytest.approx(expected, rel=1e-12)
    check_gradient(layer, bottom, top, check_bottom=[0])
    with pytest.raises(LayerError, match="targets"):
        layer.backward(top, [True, True], bottom)


def test_sigmoid_cross_entropy_loss_is_stable(xp):
    layer = make_layer('type: "SigmoidCrossEntropyLoss"')
    bottom = make_blobs([(1, 2), (1, 2)], xp=xp)
    bottom[0].data[...] = xp.asarray([[800.0, -800.0]])
    bottom[1].data[...] = xp.asarray([[0.0, 1.0]])
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    assert float(host(top[0].data)) == pytest.approx(1600.0)


# -- HingeLoss, MultinomialLogisticLoss, ContrastiveLoss --------------------------------------
@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(xp, norm):
    layer = make_layer(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}')
    bottom = with_labels(xp, [(4, 5), (4,)], [0, 4, 2, 2])
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    x = host(bottom[0].data)
    sign = 1 - 2 * np.eye(5)[[0, 4, 2, 2]]
    margin = np.maximum(0, 1 + sign * x)
    expected = (margin if norm == "L1" else margin ** 2).sum() / 4
    assert float(host(top[0].data)) == pytest.approx(expected, rel=1e-12)
    check_gradient(layer, bottom, top, check_bottom=[0], kink=0.0)


def test_multinomial_logistic_loss(xp):
    layer = make_layer('type: "MultinomialLogisticLoss"')
    bottom = with_labels(xp, [(3, 4), (3,)], [3, 0, 1])
    probs = np.random.default_rng(2).uniform(0.1, 1.0, size=(3, 4))
    probs[1, 0] = 0.0  # clamped at 1e-20
    bottom[0].data[...] = xp.asarray(probs)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    expected = -(np.log(probs[0, 3]) + np.log(1e-20) + np.log(probs[2, 1])) / 3
    assert float(host(top[0].data)) == pytest.approx(expected, rel=1e-12)
    bottom[0].data[1, 0] = 0.5
    check_gradient(layer, bottom, top, check_bottom=[0])


@pytest.mark.parametrize("legacy", ["false", "true"])
def test_contrastive_loss(xp, legacy):
    layer = make_layer('type: "ContrastiveLoss" contrastive_loss_param '
                       f'{{ margin: 2.0 legacy_version: {legacy} }}')
    bottom = with_labels(xp, [(4, 3, 1, 1), (4, 3, 1, 1), (4, 1, 1, 1)], [1, 0, 0, 1])
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    d2 = np.sum((host(bottom[0].data) - host(bottom[1].data)).reshape(4, 3) ** 2, axis=1)
    if legacy == "true":
        far = np.maximum(2.0 - d2, 0)
    else:
        far = np.maximum(2.0 - np.sqrt(d2), 0) ** 2
    expected = np.where([1, 0, 0, 1], d2, far).sum() / 8
    assert float(host(top[0].data)) == pytest.approx(expected, rel=1e-12)
    if legacy == "true":
        check_gradient(layer, bottom, top, check_bottom=[0, 1])
    assert not layer.allow_force_backward(2)


def test_contrastive_loss_gradient_caffe_epsilon(xp):
    # Caffe's dissimilar-pair gradient divides by (d + 1e-4): compare with that formula.
    layer = make_layer('type: "ContrastiveLoss" contrastive_loss_param { margin: 2.0 }')
    bottom = with_labels(xp, [(3, 2), (3, 2), (3,)], [0, 0, 1])
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    layer.backward(top, [True, True, False], bottom)
    delta = host(bottom[0].data) - host(bottom[1].data)
    d = np.sqrt(np.sum(delta ** 2, axis=1))
    beta = np.where(2.0 - d > 0, -(2.0 - d) / (d + 1e-4), 0)
    expected = np.where([[0], [0], [1]], delta, beta[:, None] * delta) / 3
    np.testing.assert_allclose(host(bottom[0].diff), expected, rtol=1e-12)
    np.testing.assert_allclose(host(bottom[1].diff), -expected, rtol=1e-12)


# -- InfogainLoss -----------------------------------------------------------------------------
def test_infogain_identity_equals_softmax_loss(xp):
    bottom = with_labels(xp, [(2, 4, 3), (2, 3), (4, 4)], LABELS, at=1)
    bottom[2].data[...] = xp.asarray(np.eye(4))
    layer = make_layer('type: "InfogainLoss" loss_param { ignore_label: -1 }')
    top = setup_layer(layer, bottom, 2)
    layer.forward(bottom, top)
    expected = softmax_loss_reference(host(bottom[0].data), LABELS, -1, "VALID")
    assert float(host(top[0].data)) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(host(top[1].data), np_softmax(host(bottom[0].data), 1))


@pytest.mark.parametrize("loss_param", ["", "ignore_label: -1 normalization: FULL"])
def test_infogain_loss_gradient(xp, loss_param):
    labels = LABELS if loss_param else [[0, 3, 1], [2, 2, 3]]
    bottom = with_labels(xp, [(2, 4, 3), (2, 3), (4, 4)], labels, at=1)
    h = np.random.default_rng(5).uniform(size=(4, 4))
    bottom[2].data[...] = xp.asarray(h)
    layer = make_layer(f'type: "InfogainLoss" loss_param {{ {loss_param} }}')
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    prob = np_softmax(host(bottom[0].data), 1)
    lab = np.asarray(labels)
    valid = lab != -1
    rows = np.moveaxis(h[np.where(valid, lab, 0)], 2, 1)
    total = -np.sum((rows * np.log(prob)).sum(axis=1) * valid)
    divisor = 6 if loss_param else valid.sum()
    assert float(host(top[0].data)) == pytest.approx(total / divisor, rel=1e-12)
    check_gradient(layer, bottom, top, check_bottom=[0])


def test_infogain_matrix_from_source(xp, tmp_path):
    from netengine.proto import caffe_pb2

    h = np.random.default_rng(6).uniform(size=(3, 3))
    proto = caffe_pb2.BlobProto()
    proto.num, proto.channels, proto.height, proto.width = 1, 1, 3, 3
    proto.data.extend(h.ravel().tolist())
    path = tmp_path / "h.binaryproto"
    path.write_bytes(proto.SerializeToString())
    bottom = with_labels(xp, [(2, 3), (2,), (3, 3)], [2, 0], at=1)
    bottom[2].data[...] = xp.asarray(h.astype(np.float32))
    with_bottom = make_layer('type: "InfogainLoss"')
    top_b = setup_layer(with_bottom, bottom)
    with_bottom.forward(bottom, top_b)
    layer = make_layer(f'type: "InfogainLoss" infogain_loss_param {{ source: "{path}" }}')
    top = setup_layer(layer, bottom[:2])
    layer.forward(bottom[:2], top)
    assert float(host(top[0].data)) == pytest.approx(float(host(top_b[0].data)), rel=1e-12)


def test_infogain_errors(xp):
    bottom = with_labels(xp, [(2, 3), (2,), (2, 2)], [2, 0], at=1)
    with pytest.raises(LayerError, match="3x3"):
        setup_layer(make_layer('type: "InfogainLoss"'), bottom)
    with pytest.raises(LayerError, match="source"):
        setup_layer(make_layer('type: "InfogainLoss"'), bottom[:2])
    with pytest.raises(LayerError, match="normalization"):
        setup_layer(make_layer('type: "InfogainLoss" loss_param { normalize: true }'), bottom)
    with pytest.raises(NetEngineError, match="infogainloss.*file not found"):
        setup_layer(make_layer('type: "InfogainLoss" infogain_loss_param { source: "/no/h" }'),
                    bottom[:2])


# -- Accuracy ---------------------------------------------------------------------------------
def accuracy(xp, scores, labels, params="", tops=1):
    scores = np.asarray(scores, dtype=np.float64)
    layer = make_layer(f'type: "Accuracy" accuracy_param {{ {params} }}')
    bottom = with_labels(xp, [scores.shape, (np.asarray(labels).size,)], labels)
    bottom[0].data[...] = xp.asarray(scores)
    top = setup_layer(layer, bottom, tops)
    layer.forward(bottom, top)
    return [host(t.data) for t in top]


def test_accuracy_top1_and_ties(xp):
    scores = [[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.7, 0.1, 0.2]]
    # item 1: tie between the true class 1 and class 0 counts as an error (Caffe's >=)
    (acc,) = accuracy(xp, scores, [1, 1, 2, 1])
    assert float(acc) == pytest.approx(2 / 4)
    (acc,) = accuracy(xp, scores, [1, 1, 2, 1], "top_k: 2")
    assert float(acc) == pytest.approx(3 / 4)  # the tie is inside the top 2; item 3 is not


def test_accuracy_top_k(xp):
    scores = np.array([[4.0, 3.0, 2.0, 1.0]] * 4)
    for k, expected in [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]:
        (acc,) = accuracy(xp, scores, [0, 1, 2, 3], f"top_k: {k}")
        assert float(acc) == pytest.approx(expected)


def test_accuracy_ignore_label_and_per_class(xp):
    scores = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]
    acc, per_class = accuracy(xp, scores, [0, 0, -1, 1], "ignore_label: -1", tops=2)
    assert float(acc) == pytest.approx(2 / 3)
    np.testing.assert_allclose(per_class, [0.5, 1.0])
    acc, per_class = accuracy(xp, scores, [-1, -1, -1, -1], "ignore_label: -1", tops=2)
    assert float(acc) == 0.0 and not np.any(per_class)


def test_accuracy_spatial_axis(xp):
    scores = np.random.default_rng(3).normal(size=(2, 3, 4))
    labels = np.random.default_rng(4).integers(0, 3, size=(2, 4))
    (acc,) = accuracy(xp, scores, labels)
    assert float(acc) == pytest.approx(np.mean(scores.argmax(axis=1) == labels))
    scores_last = np.moveaxis(scores, 1, 2)
    (acc_last,) = accuracy(xp, scores_last, labels, "axis: -1")
    assert float(acc_last) == pytest.approx(float(acc))


def test_accuracy_errors(xp):
    with pytest.raises(LayerError, match="top_k"):
        accuracy(xp, np.zeros((2, 3)), [0, 1], "top_k: 4")
    with pytest.raises(LayerError, match="number of labels"):
        accuracy(xp, np.zeros((2, 3, 2)), [0, 1])
    with pytest.raises(LayerError, match=r"\[0, 3\)"):
        accuracy(xp, np.zeros((2, 3)), [0, 3])
    layer = make_layer('type: "Accuracy"')
    bottom = with_labels(xp, [(2, 3), (2,)], [0, 1])
    top = setup_layer(layer, bottom)
    assert not layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="back-propagate"):
        layer.backward(top, [True, False], bottom)


@pytest.mark.parametrize("kind", ["HingeLoss", "MultinomialLogisticLoss"])
def test_label_count_and_label_gradient_are_refused_in_one_line(kind):
    layer = make_layer(f'name: "l" type: "{kind}"')
    scores, labels = make_blobs([(4, 3), (4, 2)])
    with pytest.raises(LayerError, match=r"one label per item: 4 items, got 8 labels") as err:
        setup_layer(layer, [scores, labels])
    assert "\n" not in str(err.value) and "'l'" in str(err.value)
    scores, labels = make_blobs([(4, 3), (4,)])
    labels.data[...] = [0, 1, 2, 0]
    top = setup_layer(layer, [scores, labels])
    layer.forward([scores, labels], top)
    with pytest.raises(LayerError, match=r"cannot back-propagate to the labels \(bottom 1\)"):
        layer.backward(top, [True, True], [scores, labels])
