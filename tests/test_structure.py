"""Structural layers: Split, Flatten, Reshape, Silence, Slice, Concat, Eltwise, Crop, Tile,
BatchReindex, Filter, Parameter."""
from __future__ import annotations

import numpy as np
import pytest

from netengine.backend import to_host
from netengine.blob import Blob
from netengine.errors import LayerError
from netengine.testing import check_gradient, make_blobs, make_layer, setup_layer


def host(a) -> np.ndarray:
    return np.asarray(to_host(a))


def forward(text, shapes, xp, num_tops=1):
    layer = make_layer(text)
    bottom = make_blobs(shapes, xp=xp)
    top = setup_layer(layer, bottom, num_tops)
    layer.forward(bottom, top)
    return layer, bottom, top


def expect_error(text, shapes, expect, num_tops=1, forward_too=False):
    layer = make_layer(text)
    with pytest.raises(LayerError, match=expect) as err:
        bottom = make_blobs(shapes)
        top = setup_layer(layer, bottom, num_tops)
        if forward_too:
            layer.forward(bottom, top)
    assert f"'{layer.name}'" in str(err.value)
    return str(err.value)


# -- Split -------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tops", [1, 2, 3])
def test_split_shares_data_and_sums_diffs(xp, num_tops):
    layer, bottom, top = forward('type: "Split"', [(2, 3, 4)], xp, num_tops)
    for blob in top:
        np.testing.assert_array_equal(host(blob.data), host(bottom[0].data))
    bottom[0].data[...] = 7.0
    assert all(np.all(host(blob.data) == 7.0) for blob in top)  # shared, not copied
    for i, blob in enumerate(top):
        blob.diff[...] = float(i + 1)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(host(bottom[0].diff),
                                  np.full((2, 3, 4), num_tops * (num_tops + 1) / 2))


def test_split_gradient_and_propagate_down(xp):
    layer, bottom, top = forward('type: "Split"', [(2, 3)], xp, 2)
    check_gradient(layer, bottom, top)
    bottom[0].diff[...] = 5.0
    layer.backward(top, [False], bottom)
    assert np.all(host(bottom[0].diff) == 5.0)


def test_split_refuses_in_place():
    layer = make_layer('type: "Split"')
    bottom = make_blobs([(2, 3)])
    with pytest.raises(LayerError, match="in-place"):
        layer.setup(bottom, [Blob(()), bottom[0]])


# -- Flatten -----------------------------------------------------------------------------------
@pytest.mark.parametrize("params, shape", [
    ("", (2, 60)),
    ("axis: 2", (2, 3, 20)),
    ("end_axis: -2", (2, 12, 5)),
    ("axis: 0", (120,)),
    ("axis: -2 end_axis: -1", (2, 3, 20)),
    ("axis: 1 end_axis: 1", (2, 3, 4, 5)),
])
def test_flatten_shapes(xp, params, shape):
    layer, bottom, top = forward(f'type: "Flatten" flatten_param {{ {params} }}', [(2, 3, 4, 5)],
                                 xp)
    assert top[0].shape == shape
    np.testing.assert_array_equal(host(top[0].data).reshape(-1), host(bottom[0].data).reshape(-1))
    top[0].diff[...] = xp.arange(120, dtype=np.float64).reshape(shape)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(host(bottom[0].diff).reshape(-1), np.arange(120))


def test_flatten_errors():
    expect_error('type: "Flatten" flatten_param { axis: 4 }', [(2, 3, 4, 5)], "out of range")
    expect_error('type: "Flatten" flatten_param { axis: 2 end_axis: 0 }', [(2, 3, 4, 5)],
                 "must not come before")
    layer = make_layer('type: "Flatten"')
    bottom = make_blobs([(2, 3)])
    with pytest.raises(LayerError, match="in-place"):
        layer.setup(bottom, bottom)


# -- Reshape -----------------------------------------------------------------------------------
@pytest.mark.parametrize("params, shape", [
    ("shape { dim: 0 dim: -1 }", (2, 60)),
    ("shape { dim: -1 }", (120,)),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", (2, 3, 4, 5)),
    ("shape { dim: 6 dim: -1 dim: 0 }", (6, 5, 4)),
    ("shape { dim: 0 dim: 2 dim: -1 }", (2, 2, 30)),
    ("axis: 1 num_axes: 0 shape { dim: 1 }", (2, 1, 3, 4, 5)),
    ("axis: 0 num_axes: 0 shape { dim: 1 dim: 1 }", (1, 1, 2, 3, 4, 5)),
    ("axis: -1 num_axes: 0 shape { dim: 1 }", (2, 3, 4, 5, 1)),
    ("axis: 1 num_axes: 2 shape { dim: 12 }", (2, 12, 5)),
    ("axis: 1 num_axes: 2 shape { dim: -1 }", (2, 12, 5)),
    ("axis: 1 shape { dim: 0 dim: 2 dim: -1 }", (2, 3, 2, 10)),
    ("axis: -3 shape { dim: 20 }", (2, 3, 20)),
    ("axis: -2 shape { dim: 5 dim: 1 }", (2, 3, 4, 5, 1)),
    ("axis: 2 shape { dim: 0 dim: 1 dim: 5 }", (2, 3, 4, 1, 5)),
])
def test_reshape_shapes(xp, params, shape):
    layer, bottom, top = forward(f'type: "Reshape" reshape_param {{ {params} }}',
                                 [(2, 3, 4, 5)], xp)
    assert top[0].shape == shape
    np.testing.assert_array_equal(host(top[0].data).reshape(-1), host(bottom[0].data).reshape(-1))
    bottom[0].data[...] = 3.0
    assert np.all(host(top[0].data) == 3.0)  # shared memory
    top[0].diff[...] = 2.0
    layer.backward(top, [True], bottom)
    assert np.all(host(bottom[0].diff) == 2.0)


def test_reshape_follows_bottom_reshape(xp):
    layer, bottom, top = forward('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }',
                                 [(2, 3, 4)], xp)
    bottom[0].reshape((5, 2, 2))
    layer.forward(bottom, top)
    assert top[0].shape == (5, 4)


@pytest.mark.parametrize("params, expect", [
    ("shape { dim: -1 dim: -1 }", "at most one"),
    ("shape { dim: 7 dim: -1 }", "not divisible"),
    ("shape { dim: 2 dim: 7 }", "has 14 elements"),
    ("axis: 3 shape { dim: 0 dim: 0 }", "no axis 4"),
    ("axis: 6 shape { dim: 1 }", "out of range"),
    ("axis: 2 num_axes: 3 shape { dim: 1 }", "out of range"),
    ("shape { dim: -2 dim: 60 }", ">= -1"),
])
def test_reshape_errors(params, expect):
    expect_error(f'type: "Reshape" reshape_param {{ {params} }}', [(2, 3, 4, 5)], expect)


# -- Silence -----------------------------------------------------------------------------------
def test_silence_has_no_tops_and_zero_gradient(xp):
    layer = make_layer('type: "Silence"')
    bottom = make_blobs([(2, 3), (4,)], xp=xp)
    layer.setup(bottom, [])
    layer.forward(bottom, [])
    for blob in bottom:
        blob.diff[...] = 1.0
    layer.backward([], [True, False], bottom)
    assert not np.any(host(bottom[0].diff)) and np.all(host(bottom[1].diff) == 1.0)


# -- Slice -------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, shape, num_tops, bounds, axis", [
    ("axis: 1 slice_point: 1 slice_point: 3", (2, 5, 3), 3, [0, 1, 3, 5], 1),
    ("axis: 0", (4, 3, 2), 2, [0, 2, 4], 0),
    ("axis: -1 slice_point: 2", (2, 3, 5), 2, [0, 2, 5], 2),
    ("slice_dim: 2", (2, 3, 6), 3, [0, 2, 4, 6], 2),
    ("", (2, 3, 2), 1, [0, 3], 1),
])
def test_slice_forward_backward(xp, params, shape, num_tops, bounds, axis):
    layer, bottom, top = forward(f'type: "Slice" slice_param {{ {params} }}', [shape], xp,
                                 num_tops)
    x = host(bottom[0].data)
    parts = np.split(x, bounds[1:-1], axis=axis)
    for blob, part in zip(top, parts):
        np.testing.assert_array_equal(host(blob.data), part)
    for i, blob in enumerate(top):
        blob.diff[...] = float(i + 1)
    layer.backward(top, [True], bottom)
    want = np.concatenate([np.full(p.shape, i + 1.0) for i, p in enumerate(parts)], axis=axis)
    np.testing.assert_array_equal(host(bottom[0].diff), want)


def test_slice_gradient(xp):
    layer, bottom, top = forward('type: "Slice" slice_param { axis: 1 slice_point: 1 }',
                                 [(2, 3, 2)], xp, 2)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("params, num_tops, expect", [
    ("slice_point: 1", 3, "1 point.s. for 3 top"),
    ("slice_point: 3 slice_point: 2", 3, "strictly increasing"),
    ("slice_point: 0", 2, "strictly increasing"),
    ("slice_point: 2 slice_point: 6", 3, r"in \(0, 5\]"),
    ("", 2, "do not evenly divide axis 1 of size 5"),
    ("axis: 1 slice_dim: 1", 2, "not both"),
    ("slice_dim: 3", 2, "out of range"),
    ("axis: -4", 2, "out of range"),
])
def test_slice_errors(params, num_tops, expect):
    expect_error(f'type: "Slice" slice_param {{ {params} }}', [(2, 5, 3)], expect, num_tops)


# -- Concat ------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, shapes, axis", [
    ("", [(2, 2, 3), (2, 3, 3), (2, 1, 3)], 1),
    ("axis: 0", [(1, 3, 2), (2, 3, 2)], 0),
    ("axis: -1", [(2, 3, 1), (2, 3, 2)], 2),
    ("concat_dim: 2", [(2, 3, 1), (2, 3, 2)], 2),
    ("", [(2, 3)], 1),
])
def test_concat_forward_backward(xp, params, shapes, axis):
    layer, bottom, top = forward(f'type: "Concat" concat_param {{ {params} }}', shapes, xp)
    want = np.concatenate([host(b.data) for b in bottom], axis=axis)
    np.testing.assert_array_equal(host(top[0].data), want)
    top[0].diff[...] = xp.asarray(np.arange(want.size, dtype=np.float64).reshape(want.shape))
    layer.backward(top, [True] * len(bottom), bottom)
    parts = np.split(np.arange(want.size).reshape(want.shape),
                     np.cumsum([s[axis] for s in shapes])[:-1], axis=axis)
    for blob, part in zip(bottom, parts):
        np.testing.assert_array_equal(host(blob.diff), part)


def test_concat_gradient(xp):
    layer, bottom, top = forward('type: "Concat"', [(2, 1, 2), (2, 2, 2)], xp)
    check_gradient(layer, bottom, top)


def test_concat_mismatch_names_the_bottom():
    message = expect_error('type: "Concat"', [(2, 2, 3), (2, 3, 3), (2, 1, 4)], "bottom 2")
    assert "(2, 1, 4)" in message and "(2, 2, 3)" in message
    expect_error('type: "Concat"', [(2, 2, 3), (2, 2)], "bottom 1")
    expect_error('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(2, 2)], "not both")
    expect_error('type: "Concat" concat_param { axis: 3 }', [(2, 2)], "out of range")


# -- Eltwise -----------------------------------------------------------------------------------
SHAPE3 = [(2, 3, 2)] * 3


@pytest.mark.parametrize("params, reference", [
    ("", lambda a, b, c: a + b + c),
    ("coeff: 1 coeff: -0.5 coeff: 2", lambda a, b, c: a - 0.5 * b + 2 * c),
    ("operation: PROD", lambda a, b, c: a * b * c),
    ("operation: MAX", lambda a, b, c: np.maximum(np.maximum(a, b), c)),
])
def test_eltwise_forward(xp, params, reference):
    layer, bottom, top = forward(f'type: "Eltwise" eltwise_param {{ {params} }}', SHAPE3, xp)
    want = reference(*(host(b.data) for b in bottom))
    np.testing.assert_allclose(host(top[0].data), want, rtol=1e-12)


@pytest.mark.parametrize("params", ["", "coeff: 1.5 coeff: -0.5 coeff: 2", "operation: PROD",
                                    "operation: PROD stable_prod_grad: false",
                                    "operation: MAX", "operation: MAX coeff: 2 coeff: 3 coeff: 4"])
def test_eltwise_gradient(xp, params):
    layer, bottom, top = forward(f'type: "Eltwise" eltwise_param {{ {params} }}', SHAPE3, xp)
    check_gradient(layer, bottom, top)


def test_eltwise_two_bottoms_prod_gradient(xp):
    layer, bottom, top = forward('type: "Eltwise" eltwise_param { operation: PROD }',
                                 [(3, 4)] * 2, xp)
    check_gradient(layer, bottom, top)


def test_eltwise_max_ties(xp):
    layer = make_layer('type: "Eltwise" eltwise_param { operation: MAX }')
    bottom = [Blob((3,), dtype=np.float64, xp=xp) for _ in range(3)]
    bottom[0].data[...] = xp.asarray([1.0, 2.0, 0.0])
    bottom[1].data[...] = xp.asarray([1.0, 1.0, 0.0])   # tie 0/1 -> bottom 1
    bottom[2].data[...] = xp.asarray([0.0, 2.0, 0.0])   # ties with the max -> not bottom 2
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = 1.0
    layer.backward(top, [True] * 3, bottom)
    np.testing.assert_array_equal(host(top[0].data), [1.0, 2.0, 0.0])
    np.testing.assert_array_equal(host(bottom[0].diff), [0, 1, 0])
    np.testing.assert_array_equal(host(bottom[1].diff), [1, 0, 1])
    np.testing.assert_array_equal(host(bottom[2].diff), [0, 0, 0])


def test_eltwise_unstable_prod_gradient_divides(xp):
    layer, bottom, top = forward(
        'type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }',
        [(4,)] * 2, xp)
    top[0].diff[...] = 1.0
    layer.backward(top, [True, True], bottom)
    np.testing.assert_allclose(host(bottom[0].diff), host(bottom[1].data))


@pytest.mark.parametrize("params", ["", "coeff: 2 coeff: -1", "operation: PROD",
                                    "operation: PROD stable_prod_grad: false", "operation: MAX"])
def test_eltwise_in_place(xp, params):
    results = []
    for inplace in (False, True):
        layer = make_layer(f'type: "Eltwise" eltwise_param {{ {params} }}')
        bottom = make_blobs([(2, 3)] * 2, xp=xp)
        top = [bottom[0]] if inplace else [Blob((), dtype=np.float64, xp=xp)]
        layer.setup(bottom, top)
        layer.forward(bottom, top)
        out = host(top[0].data).copy()
        top[0].diff[...] = xp.asarray(np.linspace(-1, 1, 6).reshape(2, 3))
        layer.backward(top, [True, True], bottom)
        results.append([out] + [host(b.diff).copy() for b in bottom])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_eltwise_errors():
    message = expect_error('type: "Eltwise"', [(2, 3), (2, 3), (3, 2)], "bottom 2")
    assert "(3, 2)" in message
    expect_error('type: "Eltwise" eltwise_param { coeff: 1 }', [(2, 3)] * 2,
                 "one coefficient per bottom.*1 for 2")
    expect_error('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }',
                 [(2, 3)] * 2, "only allowed for operation SUM")
    expect_error('type: "Eltwise"', [(2, 3)], "at least 2 bottom")


# -- Crop --------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, like, index", [
    ("", (2, 3, 4, 4), np.s_[:, :, 0:4, 0:4]),
    ("offset: 1", (1, 3, 4, 5), np.s_[:, :, 1:5, 1:6]),
    ("offset: 2 offset: 1", (2, 3, 3, 3), np.s_[:, :, 2:5, 1:4]),
    ("axis: 1 offset: 1 offset: 2 offset: 0", (1, 1, 3, 3), np.s_[:, 1:2, 2:5, 0:3]),
    ("axis: -1 offset: 3", (1, 1, 1, 4), np.s_[:, :, :, 3:7]),
])
def test_crop_forward_backward(xp, params, like, index):
    layer, bottom, top = forward(f'type: "Crop" crop_param {{ {params} }}',
                                 [(2, 3, 6, 7), like], xp)
    x = host(bottom[0].data)
    np.testing.assert_array_equal(host(top[0].data), x[index])
    top[0].diff[...] = 1.0
    layer.backward(top, [True, False], bottom)
    want = np.zeros_like(x)
    want[index] = 1.0
    np.testing.assert_array_equal(host(bottom[0].diff), want)
    assert not layer.allow_force_backward(1)


def test_crop_gradient(xp):
    layer, bottom, top = forward('type: "Crop" crop_param { offset: 1 }',
                                 [(1, 2, 4, 3), (1, 1, 2, 2)], xp)
    check_gradient(layer, bottom, top, check_bottom=[0])


def test_crop_errors():
    expect_error('type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }',
                 [(2, 3, 6, 7), (2, 3, 4, 4)], "once per cropped axis")
    expect_error('type: "Crop" crop_param { offset: 3 }', [(2, 3, 6, 7), (2, 3, 4, 4)],
                 "axis 2 is out of bounds")
    expect_error('type: "Crop" crop_param { axis: 4 }', [(2, 3, 6, 7), (2, 3, 4, 4)],
                 "out of range")


# -- Tile --------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, reps", [
    ("tiles: 3", (1, 3, 1)),
    ("axis: 0 tiles: 2", (2, 1, 1)),
    ("axis: -1 tiles: 2", (1, 1, 2)),
])
def test_tile_forward(xp, params, reps):
    layer, bottom, top = forward(f'type: "Tile" tile_param {{ {params} }}', [(2, 3, 2)], xp)
    np.testing.assert_array_equal(host(top[0].data), np.tile(host(bottom[0].data), reps))


@pytest.mark.parametrize("params", ["tiles: 3", "axis: 0 tiles: 2", "axis: 2 tiles: 2"])
def test_tile_gradient(xp, params):
    layer, bottom, top = forward(f'type: "Tile" tile_param {{ {params} }}', [(2, 2, 2)], xp)
    check_gradient(layer, bottom, top)


def test_tile_errors():
    expect_error('type: "Tile"', [(2, 3)], "tiles must be given")
    expect_error('type: "Tile" tile_param { tiles: 0 }', [(2, 3)], "positive, got 0")
    expect_error('type: "Tile" tile_param { tiles: 2 axis: 2 }', [(2, 3)], "out of range")


# -- BatchReindex ------------------------------------------------------------------------------
def reindex_blobs(xp, index):
    data = make_blobs([(3, 2, 2)], xp=xp)[0]
    idx = Blob((len(index),), dtype=np.float64, xp=xp)
    idx.data[...] = xp.asarray(np.array(index, dtype=np.float64))
    return [data, idx]


def test_batch_reindex_forward_backward(xp):
    layer = make_layer('type: "BatchReindex"')
    bottom = reindex_blobs(xp, [2, 0, 2, 1.7])
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    x = host(bottom[0].data)
    np.testing.assert_array_equal(host(top[0].data), x[[2, 0, 2, 1]])
    top[0].diff[...] = xp.asarray(np.arange(1.0, 5.0).reshape(4, 1, 1) * np.ones((4, 2, 2)))
    layer.backward(top, [True, False], bottom)
    want = np.array([2.0, 4.0, 4.0]).reshape(3, 1, 1) * np.ones((3, 2, 2))
    np.testing.assert_array_equal(host(bottom[0].diff), want)
    assert not layer.allow_force_backward(1)


def test_batch_reindex_gradient(xp):
    layer = make_layer('type: "BatchReindex"')
    bottom = reindex_blobs(xp, [1, 1, 0])
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, check_bottom=[0])


def test_batch_reindex_errors(xp):
    layer = make_layer('type: "BatchReindex"')
    bottom = reindex_blobs(xp, [0, 3])
    top = setup_layer(layer, bottom)
    with pytest.raises(LayerError, match=r"\[0, 3\)"):
        layer.forward(bottom, top)
    expect_error('type: "BatchReindex"', [(3, 2), (2, 1)], "must be 1-D")


# -- Filter ------------------------------------------------------------------------------------
def filter_blobs(xp, selector):
    bottom = make_blobs([(4, 2), (4, 3, 2)], xp=xp)
    sel = Blob((4, 1), dtype=np.float64, xp=xp)
    sel.data[...] = xp.asarray(np.array(selector, dtype=np.float64).reshape(4, 1))
    return bottom + [sel]


def test_filter_forward_backward(xp):
    layer = make_layer('type: "Filter"')
    bottom = filter_blobs(xp, [1, 0, 0.5, 0])
    top = setup_layer(layer, bottom, 2)
    assert [t.shape for t in top] == [(4, 2), (4, 3, 2)]  # full batch at setup, as Caffe
    layer.forward(bottom, top)
    assert [t.shape for t in top] == [(2, 2), (2, 3, 2)]
    for t, b in zip(top, bottom):
        np.testing.assert_array_equal(host(t.data), host(b.data)[[0, 2]])
        t.diff[...] = 1.0
    layer.backward(top, [True, True, False], bottom)
    np.testing.assert_array_equal(host(bottom[0].diff), [[1, 1], [0, 0], [1, 1], [0, 0]])
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(0)


def test_filter_gradient(xp):
    layer = make_layer('type: "Filter"')
    bottom = filter_blobs(xp, [0, 1, 1, 0])
    top = setup_layer(layer, bottom, 2)
    check_gradient(layer, bottom, top, check_bottom=[0, 1])


def test_filter_errors():
    expect_error('type: "Filter"', [(4, 2), (4, 2)], "selector.*shape", 1)
    expect_error('type: "Filter"', [(3, 2), (4, 1)], "bottom 0", 1)
    expect_error('type: "Filter"', [(4, 2), (4,)], "one top per data bottom", 2)


# -- Parameter ---------------------------------------------------------------------------------
def test_parameter_exposes_its_blob(xp):
    layer = make_layer('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }')
    top = [Blob((), dtype=np.float64, xp=xp)]
    layer.setup([], top)
    assert layer.blobs[0].shape == (2, 3) == top[0].shape
    layer.blobs[0].data[...] = 4.0
    layer.forward([], top)
    assert np.all(host(top[0].data) == 4.0)
    top[0].diff[...] = 1.5
    layer.backward(top, [], [])
    assert np.all(host(layer.blobs[0].diff) == 1.5)
