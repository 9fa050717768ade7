"""Trained caffemodels from ../shared/acceptance/weights: loading (V1 and V2, legacy 4-D blob
shapes, extra layers ignored by name), classification of real samples, save/reload round trip.

Images are PNG files; they are decoded here with zlib and NumPy only (no imaging library).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ACCEPTANCE, SHARED

from netengine.errors import LayerError
from netengine.formats.prototxt import read_binary_proto
from netengine.net import Net, blob_from_proto
from netengine.proto import caffe_pb2

W = ACCEPTANCE / "weights"
LENET_DEPLOY = ACCEPTANCE / "nets/bvlc_caffe/examples/mnist/lenet.prototxt"
MTCNN = W / "kpzhang93_MTCNN_face_detection_alignment/code/codes/MTCNNv2/model"
IKKI = W / "ikkiChung_Prediction-Example-With-Caffe/examples"

# (caffemodel, the prototxt it ships with) for every caffemodel in the weights folder
PAIRS = [
    ("ethereon_caffe-tensorflow/examples/mnist/lenet_iter_10000.caffemodel",
     "ethereon_caffe-tensorflow/examples/mnist/lenet.prototxt"),
    ("ahmdtaha_mnist_deploy/lenet_iter_10000.caffemodel", "ahmdtaha_mnist_deploy/mnist_deploy.prototxt"),
    ("everpeace_caffe/examples/mnist/lenet_iter_10000.caffemodel",
     "everpeace_caffe/examples/mnist/lenet.prototxt"),
    ("everpeace_caffe/examples/cifar10/cifar10_quick_iter_4000.caffemodel",
     "everpeace_caffe/examples/cifar10/cifar10_quick.prototxt"),
    ("everpeace_caffe/examples/cifar10/cifar10_quick_iter_5000.caffemodel",
     "everpeace_caffe/examples/cifar10/cifar10_quick.prototxt"),
    ("everpeace_caffe/examples/cifar10/cifar10_full_iter_70000.caffemodel",
     "everpeace_caffe/examples/cifar10/cifar10_full.prototxt"),
    ("ikkiChung_Prediction-Example-With-Caffe/examples/cifar10/cifar10_quick_iter_5000.caffemodel",
     "ikkiChung_Prediction-Example-With-Caffe/examples/prediction_example/"
     "prediction_example.prototxt"),
] + [(f"{MTCNN.relative_to(W)}/det{i}.caffemodel", f"{MTCNN.relative_to(W)}/det{i}.prototxt")
     for i in range(1, 5)]
# stand-in shapes where the prototxt's data layer reads an absent source
STAND_INS = {"prediction_example.prototxt": {"data": (3, 3, 32, 32)}}
LENETS = [pair for pair in PAIRS if "mnist" in pair[0]]


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared material not available)")
    return path


def load(model: str, proto: str, **kwargs) -> Net:
    need(W / model)
    shapes = STAND_INS.get(Path(proto).name)
    return Net(str(W / proto), caffe_pb2.TEST, weights=str(W / model), input_shapes=shapes,
               **kwargs)


def stored_blobs(model: str) -> dict[str, list[np.ndarray]]:
    param = read_binary_proto(W / model, caffe_pb2.NetParameter())
    return {layer.name: [blob_from_proto(b) for b in layer.blobs]
            for layer in list(param.layer) or list(param.layers) if layer.blobs}


# -- PNG ------------------------------------------------------------------------------------------
def read_png(path: Path) -> np.ndarray:
    """8-bit, non-interlaced PNG → uint8 array (H, W) or (H, W, channels)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    if depth != 8 or interlace:
        pytest.skip(f"{path}: PNG with bit depth {depth}/interlace {interlace} not decoded here")
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8)
    stride = width * channels
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int32)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        up = out[y - 1] if y else np.zeros(stride, np.int32)
        if kind == 0:
            out[y] = line
        elif kind == 2:
            out[y] = (line + up) & 255
        else:  # Sub, Average, Paeth depend on the pixel to the left: byte by byte
            row = out[y]
            for x in range(stride):
                left = row[x - channels] if x >= channels else 0
                corner = up[x - channels] if x >= channels else 0
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up[x]) // 2
                else:
                    p = left + up[x] - corner
                    pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else (up[x] if pb <= pc else corner)
                row[x] = (line[x] + pred) & 255
    image = out.astype(np.uint8).reshape(height, width, channels)
    return image[:, :, 0] if channels == 1 else image


def mnist_samples() -> tuple[np.ndarray, list[int]]:
    folder = need(W / "ahmdtaha_mnist_deploy/samples")
    files = sorted(folder.glob("img_*.png"))
    assert len(files) == 10
    images = np.stack([read_png(f) for f in files]).astype(np.float32)
    labels = [int(f.stem.split("_")[1]) for f in files]
    return images[:, None] * 0.00390625, labels


# -- loading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,proto", PAIRS, ids=[Path(m).name + ":" + Path(p).name
                                                      for m, p in PAIRS])
def test_every_caffemodel_loads_with_its_prototxt(model, proto):
    net = load(model, proto)
    stored = stored_blobs(model)
    ignored = set(net.ignored_layers)
    assert set(stored) - ignored <= set(net.params)
    for name, blobs in net.params.items():
        assert name in stored, f"layer {name} got no weights"
        for blob, values in zip(blobs, stored[name]):
            assert np.array_equal(blob.data, values.reshape(blob.shape)), name
    if "MTCNN" in model:  # saved from training nets: data, loss, split layers are extra
        assert {"loss1", "accuracy1"} <= ignored or "loss1" in ignored


def test_extra_layers_are_ignored_by_name():
    net = load(*[p for p in PAIRS if p[0].endswith("det1.caffemodel")][0])
    assert {"data12", "slicer_label", "loss1", "loss2", "accuracy1", "silence"} <= set(
        net.ignored_layers)
    assert "conv1" not in net.ignored_layers


def test_v1_weights_with_legacy_shapes_load_into_the_current_lenet():
    model = "everpeace_caffe/examples/mnist/lenet_iter_10000.caffemodel"
    param = read_binary_proto(need(W / model), caffe_pb2.NetParameter())
    ip1 = [layer for layer in param.layers if layer.name == "ip1"][0]
    assert not ip1.blobs[0].HasField("shape") and ip1.blobs[0].num == 1  # legacy 1x1x500x800
    net = Net(str(need(LENET_DEPLOY)), caffe_pb2.TEST, weights=str(W / model))
    assert net.params["ip1"][0].shape == (500, 800) and net.params["ip1"][1].shape == (500,)
    np.testing.assert_array_equal(net.params["ip1"][0].data,
                                  blob_from_proto(ip1.blobs[0]).reshape(500, 800))


def test_mismatched_weights_are_refused_in_one_line():
    net = Net(str(need(W / "everpeace_caffe/examples/cifar10/cifar10_quick.prototxt")))
    with pytest.raises(LayerError) as err:
        net.copy_from(str(W / "everpeace_caffe/examples/cifar10/cifar10_full_iter_70000"
                                  ".caffemodel"))
    text = str(err.value)
    assert "\n" not in text and "ip1" in text and "shape mismatch" in text


# -- classification -------------------------------------------------------------------------------
@pytest.mark.parametrize("model,proto", LENETS, ids=[m.split("/")[0] for m, _ in LENETS])
def test_lenets_classify_the_ten_sample_digits(model, proto):
    images, labels = mnist_samples()
    net = load(model, proto)
    data = net.inputs[0]
    net.blobs[data].reshape(images.shape)
    net.reshape()
    out = net.forward(**{data: images})
    scores = out[net.outputs[0]]
    assert scores.shape == (10, 10)
    assert list(scores.argmax(axis=1)) == labels


def _mnist_10k():
    from netengine.data.idx import read_idx

    folder = SHARED / "data/mnist-npm10k"
    images = read_idx(need(folder / "images-idx3-ubyte.gz"))
    labels = read_idx(folder / "labels-idx1-ubyte.gz")
    return images.astype(np.float32)[:, None] * 0.00390625, labels.astype(np.int64)


def _predict(net: Net, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    data = net.inputs[0]
    net.blobs[data].reshape((batch,) + images.shape[1:])
    net.reshape()
    last = net.outputs[0]
    out = []
    for start in range(0, len(images), batch):
        net.forward(**{data: images[start:start + batch]})
        out.append(np.asarray(net.blobs[last].data).argmax(axis=1))
    return np.concatenate(out)


def test_lenets_on_ten_thousand_digits():
    """Each LeNet through its own deploy net: >= 98 % right; the V1 model gives the same
    predictions through its V1 prototxt and through BVLC's current lenet.prototxt."""
    images, labels = _mnist_10k()
    predictions = {}
    for model, proto in LENETS:
        predictions[model] = _predict(load(model, proto), images)
        accuracy = float(np.mean(predictions[model] == labels))
        assert accuracy >= 0.98, (model, accuracy)
    v1_model = "everpeace_caffe/examples/mnist/lenet_iter_10000.caffemodel"
    modern = Net(str(need(LENET_DEPLOY)), caffe_pb2.TEST, weights=str(W / v1_model))
    np.testing.assert_array_equal(_predict(modern, images[:1000]), predictions[v1_model][:1000])
    # the two BVLC-trained V2 models agree on nearly every digit
    first, second = (predictions[m] for m, _ in LENETS[:2])
    assert np.mean(first == second) >= 0.98


def test_cifar10_quick_classifies_dog_and_truck():
    """ikkiChung's V1 prediction_example net (ImageData replaced by a stand-in input), with
    OpenCV-style BGR pixels minus the approximate CIFAR-10 channel means the MANIFEST gives."""
    names = ["dog10", "cat10", "truck10"]
    images = np.stack([read_png(need(IKKI / "images" / f"{n}.png"))[:, :, :3] for n in names])
    bgr = images[:, :, :, ::-1].astype(np.float32) - np.array([113.9, 123.0, 125.3], np.float32)
    net = load(*PAIRS[6])
    net.forward(data=bgr.transpose(0, 3, 1, 2))
    probs = np.asarray(net.blobs["prob"].data)
    assert probs.shape == (3, 10)
    assert probs[0].argmax() == 5 and probs[2].argmax() == 9  # dog, truck
    top5 = np.asarray(net.blobs["argmaxout"].data) if "argmaxout" in net.blobs else None
    if top5 is not None:
        assert int(top5.reshape(3, -1)[0, 0]) == 5


@pytest.mark.parametrize("index,outputs", [
    (1, {"prob1": (1, 2, 1, 1), "conv4-2": (1, 4, 1, 1)}),
    (2, {"prob1": (1, 2), "conv5-2": (1, 4)}),
    (3, {"prob1": (1, 2), "conv6-2": (1, 4), "conv6-3": (1, 10)}),
    (4, {"fc5_1": (1, 2), "fc5_5": (1, 2)}),
])
def test_mtcnn_nets_run(index, outputs):
    net = load(f"{MTCNN.relative_to(W)}/det{index}.caffemodel",
               f"{MTCNN.relative_to(W)}/det{index}.prototxt")
    rng = np.random.default_rng(index)
    for name in net.inputs:  # MTCNN's preprocessing: (pixel - 127.5) * 0.0078125
        blob = net.blobs[name]
        blob.data[...] = (rng.integers(0, 256, blob.shape) - 127.5) * 0.0078125
    net.forward()
    for name, shape in outputs.items():
        assert net.blobs[name].shape == shape, name
        assert np.all(np.isfinite(net.blobs[name].data))
    if "prob1" in outputs:
        np.testing.assert_allclose(np.asarray(net.blobs["prob1"].data).sum(axis=1), 1, rtol=1e-5)
    if index == 1:  # P-Net is fully convolutional: a bigger image gives a map
        image = rng.normal(size=(1, 3, 40, 60)).astype(np.float32)
        net.blobs["data"].reshape(image.shape)
        net.reshape()
        net.forward(data=image)
        assert net.blobs["prob1"].shape == (1, 2, 15, 25)


# -- save and reload ------------------------------------------------------------------------------
@pytest.mark.parametrize("model,proto", [PAIRS[2], PAIRS[5], PAIRS[9]],
                         ids=["lenet-v1", "cifar10-full-v1", "mtcnn-det3"])
def test_saved_caffemodel_reloads_bit_identical(model, proto, tmp_path):
    net = load(model, proto)
    out = tmp_path / "saved.caffemodel"
    net.save(str(out))
    saved = read_binary_proto(out, caffe_pb2.NetParameter())
    assert len(saved.layer) and not len(saved.layers)  # current format, loadable by Caffe
    for layer in saved.layer:
        assert layer.name and layer.type
        for blob in layer.blobs:
            assert blob.HasField("shape") and not blob.HasField("num")
    again = load(model, proto)
    for blobs in again.params.values():
        for blob in blobs:
            blob.data[...] = 0
    again.copy_from(str(out))
    stored = stored_blobs(model)
    for name, blobs in net.params.items():
        for a, b, original in zip(blobs, again.params[name], stored[name]):
            assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes()
            assert np.asarray(b.data).tobytes() == original.astype(np.float32).tobytes()
