"""pycaffe's ``caffe.io`` (images, Transformer, oversample, proto conversions) and
``caffe.Classifier``, reached the pycaffe way: ``import netengine as caffe``."""
from __future__ import annotations

import numpy as np
import pytest

import netengine as caffe
from netengine.errors import NetEngineError
from netengine.proto import caffe_pb2


# -- Transformer --------------------------------------------------------------------------------
def _transformer():
    t = caffe.io.Transformer({"data": (1, 3, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    return t


def test_transformer_preprocess_order_and_deprocess_inverse():
    image = np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 12  # H, W, RGB
    out = _transformer().preprocess("data", image)
    # transpose to CHW, RGB -> BGR, x255, minus the per-channel mean, x0.5
    expected = (image.transpose(2, 0, 1)[::-1] * 255.0 - np.array([10, 20, 30])[:, None, None]) * 0.5
    assert out.dtype == np.float32 and out.shape == (3, 2, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(_transformer().deprocess("data", out), image, atol=1e-6)


def test_transformer_resizes_to_the_input_and_takes_a_full_mean():
    t = caffe.io.Transformer({"data": (1, 1, 4, 4)})
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", np.full((1, 4, 4), 0.25))
    out = t.preprocess("data", np.ones((2, 2, 1)))
    assert out.shape == (1, 4, 4)
    np.testing.assert_allclose(out, 0.75)


@pytest.mark.parametrize("call, match", [
    (lambda t: t.preprocess("nope", np.zeros((2, 2, 3))), "'nope' is not one of the net inputs"),
    (lambda t: t.set_mean("data", np.zeros(2)), "2 channel means given, the input has 3"),
    (lambda t: t.set_mean("data", np.zeros((3, 5, 5))), r"mean shape \(3, 5, 5\)"),
    (lambda t: t.set_channel_swap("data", (1, 0)), "2 channels given"),
    (lambda t: t.set_transpose("data", (1, 0)), "2 axes given"),
])
def test_transformer_errors_are_one_line(call, match):
    with pytest.raises(NetEngineError, match=match) as info:
        call(caffe.io.Transformer({"data": (1, 3, 2, 2)}))
    assert "\n" not in str(info.value)


# -- resize and oversample ----------------------------------------------------------------------
def test_resize_bilinear_aligns_pixel_centres():
    image = np.array([[0.0, 1.0]], dtype=np.float32)[:, :, None]  # 1 x 2
    out = caffe.io.resize_image(image, (1, 4))[0, :, 0]
    # output centres map to x = -0.25, 0.25, 0.75, 1.25 (clamped at the edges)
    np.testing.assert_allclose(out, [0.0, 0.25, 0.75, 1.0])
    nearest = caffe.io.resize_image(image, (1, 4), interp_order=0)[0, :, 0]
    np.testing.assert_array_equal(nearest, [0.0, 0.0, 1.0, 1.0])
    same = caffe.io.resize_image(image, (1, 2))
    assert same is not image and np.array_equal(same, image)
    with pytest.raises(NetEngineError, match="interp_order 3"):
        caffe.io.resize_image(image, (2, 2), interp_order=3)


def test_oversample_corners_centre_and_mirrors():
    image = np.arange(5 * 6, dtype=np.float32).reshape(5, 6, 1)
    crops = caffe.io.oversample([image, image + 100], (3, 4))
    assert crops.shape == (20, 3, 4, 1)
    starts = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]  # centre: int(2.5 - 1.5), int(3 - 2)
    for k, (top, left) in enumerate(starts):
        window = image[top:top + 3, left:left + 4]
        np.testing.assert_array_equal(crops[k], window)
        np.testing.assert_array_equal(crops[5 + k], window[:, ::-1])
        np.testing.assert_array_equal(crops[10 + k], window + 100)


# -- protos -----------------------------------------------------------------------------------
def test_blobproto_round_trips_and_legacy_shape():
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    proto = caffe.io.array_to_blobproto(arr, diff=-arr)
    assert list(proto.shape.dim) == [2, 3, 4]
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(proto), arr)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(proto, return_diff=True), -arr)
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=3, width=4, data=range(24))
    assert caffe.io.blobproto_to_array(legacy).shape == (1, 2, 3, 4)
    blobs = caffe.io.blobprotovector_str_to_arraylist(
        caffe.io.arraylist_to_blobprotovector_str([arr, arr[0]]))
    assert [b.shape for b in blobs] == [(2, 3, 4), (3, 4)]
    np.testing.assert_array_equal(blobs[1], arr[0])


def test_datum_round_trips():
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    datum = caffe.io.array_to_datum(pixels, label=7)
    assert datum.data == pixels.tobytes() and datum.label == 7 and not datum.float_data
    back = caffe.io.datum_to_array(datum)
    assert back.dtype == np.uint8 and np.array_equal(back, pixels)
    back -= 1  # a writable copy, as pycaffe's
    floats = caffe.io.array_to_datum(pixels.astype(np.float32) / 2)
    assert not floats.data and not floats.HasField("label")
    np.testing.assert_array_equal(caffe.io.datum_to_array(floats), pixels / 2)
    with pytest.raises(NetEngineError, match=r"\(C, H, W\) array, got shape \(4,\)"):
        caffe.io.array_to_datum(np.zeros(4))


# -- load_image -------------------------------------------------------------------------------
def test_load_image_rgb_and_gray(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    rgb[1, 2] = (0, 0, 51)
    path = tmp_path / "im.png"
    image_module.fromarray(rgb).save(path)
    loaded = caffe.io.load_image(str(path))
    assert loaded.dtype == np.float32 and loaded.shape == (2, 3, 3)
    np.testing.assert_allclose(loaded[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(loaded[1, 2], [0.0, 0.0, 0.2])
    gray = caffe.io.load_image(str(path), color=False)
    assert gray.shape == (2, 3, 1) and 0.29 < gray[0, 0, 0] < 0.31  # 601 luma of red
    with pytest.raises(NetEngineError, match="image file not found"):
        caffe.io.load_image(str(tmp_path / "missing.png"))


def test_load_image_16_bit_keeps_its_range(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    ramp = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    path = tmp_path / "deep.png"
    image_module.fromarray(ramp).save(path)
    gray = caffe.io.load_image(str(path), color=False)
    np.testing.assert_allclose(gray[:, :, 0], ramp / 65535.0, rtol=1e-6)
    rgb = caffe.io.load_image(str(path))
    assert rgb.shape == (3, 4, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    np.testing.assert_allclose(rgb[..., 1], ramp / 65535.0, rtol=1e-6)


# -- Classifier -------------------------------------------------------------------------------
DEPLOY = """layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 3 dim: 3 dim: 4 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def test_classifier_centre_crop_and_ten_crop_average(tmp_path):
    model = tmp_path / "deploy.prototxt"
    model.write_text(DEPLOY)
    caffe.set_random_seed(2)
    weights = tmp_path / "w.caffemodel"
    caffe.Net(str(model), caffe.TEST).save(str(weights))
    clf = caffe.Classifier(str(model), str(weights), image_dims=(6, 6),
                           mean=np.array([0.1, 0.2, 0.3]), raw_scale=2.0,
                           channel_swap=(2, 1, 0))
    rng = np.random.default_rng(0)
    images = [rng.random((7, 5, 3)).astype(np.float32) for _ in range(2)]

    def scores(crops):  # each (4, 4, 3) crop by hand: CHW, BGR, x2, minus mean
        batch = np.stack([c.transpose(2, 0, 1)[::-1] * 2.0
                          - np.array([0.1, 0.2, 0.3])[:, None, None] for c in crops])
        return clf.forward_all(data=batch)["prob"]

    resized = np.stack([caffe.io.resize_image(im, (6, 6)) for im in images])
    centre = clf.predict(images, oversample=False)
    np.testing.assert_allclose(centre, scores(resized[:, 1:5, 1:5]), rtol=1e-5)
    ten = clf.predict(images)
    expected = scores(caffe.io.oversample(resized, (4, 4))).reshape(2, 10, 5).mean(axis=1)
    np.testing.assert_allclose(ten, expected, rtol=1e-5)
    assert ten.shape == (2, 5) and np.allclose(ten.sum(axis=1), 1.0, atol=1e-5)
