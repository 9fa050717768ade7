"""NetSpec: nets written in Python equal their prototxt, kwargs routed like pycaffe's net_spec."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO, need_shared
from google.protobuf import text_format

from netengine import net_spec
from netengine.formats.prototxt import read_text_proto
from netengine.proto import caffe_pb2

L, P = net_spec.layers, net_spec.params


CAFFE_SOURCES = ("examples/mnist/mnist_train_lmdb", "examples/mnist/mnist_test_lmdb")
OUR_SOURCES = ("data/mnist/train-images-idx3-ubyte.gz", "data/mnist/t10k-images-idx3-ubyte.gz")


def lenet(sources=CAFFE_SOURCES, backend=P.Data.LMDB) -> net_spec.NetSpec:
    """Caffe's examples/mnist/lenet_train_test.prototxt (LMDB sources), written in Python;
    with ``OUR_SOURCES`` and no backend it is netengine's flagship nets/mnist_train_test."""
    n = net_spec.NetSpec(name="LeNet")
    db = {} if backend is None else {"backend": backend}
    for phase, source, batch in zip((net_spec.TRAIN, net_spec.TEST), sources, (64, 100)):
        n.data, n.label = L.Data(name="mnist", include=dict(phase=phase), ntop=2,
                                 transform_param=dict(scale=0.00390625),
                                 source=source, batch_size=batch, **db)
    lr = [dict(lr_mult=1), dict(lr_mult=2)]
    fill = dict(weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    n.conv1 = L.Convolution(n.data, param=lr, num_output=20, kernel_size=5, stride=1, **fill)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, param=lr, num_output=50, kernel_size=5, stride=1, **fill)
    n.pool2 = L.Pooling(n.conv2, pool="MAX", kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, param=lr, num_output=500, **fill)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.ip1, param=lr, num_output=10, **fill)
    n.accuracy = L.Accuracy(n.ip2, n.label, include=dict(phase=net_spec.TEST))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n


def _read(path) -> caffe_pb2.NetParameter:
    return read_text_proto(path, caffe_pb2.NetParameter())[0]


def test_lenet_equals_caffe_example():
    path = need_shared("acceptance", "nets", "bvlc_caffe", "examples", "mnist",
                       "lenet_train_test.prototxt")
    assert lenet().to_proto() == _read(path)


def test_lenet_equals_flagship_net():
    path = REPO / "nets" / "mnist_train_test.prototxt"
    if not path.exists():
        pytest.skip("nets/mnist_train_test.prototxt is not written yet")
    ours, theirs = lenet(OUR_SOURCES, backend=None).to_proto(), _read(path)
    assert [(lp.name, lp.type) for lp in ours.layer] == [(lp.name, lp.type) for lp in theirs.layer]
    assert ours == theirs


def test_prototxt_round_trip(tmp_path):
    n = lenet()
    text = str(n)
    assert text.startswith('name: "LeNet"') and 'type: "SoftmaxWithLoss"' in text
    assert text_format.Parse(text, caffe_pb2.NetParameter()) == n.to_proto()
    n.save(tmp_path / "lenet.prototxt")
    assert _read(tmp_path / "lenet.prototxt") == n.to_proto()


def test_routing_to_param_messages_and_layer_fields():
    n = net_spec.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    n.label = L.Input(shape=[dict(dim=[2])])
    n.up = L.Deconvolution(n.data, num_output=3, kernel_size=4, stride=2, bias_term=False,
                           weight_filler=dict(type="bilinear"), param=dict(lr_mult=0))
    n.loss = L.SoftmaxWithLoss(n.up, n.label, axis=1, ignore_label=255,
                               normalization="VALID", loss_weight=[0.5],
                               propagate_down=[True, False])
    net = n.to_proto()
    data, label, up, loss = net.layer
    assert list(data.input_param.shape[0].dim) == [2, 3, 8, 8]
    assert list(label.input_param.shape[0].dim) == [2]
    assert up.convolution_param.num_output == 3 and list(up.convolution_param.kernel_size) == [4]
    assert up.convolution_param.bias_term is False
    assert up.convolution_param.weight_filler.type == "bilinear"
    assert up.param[0].lr_mult == 0
    assert loss.softmax_param.axis == 1 and loss.loss_param.ignore_label == 255
    assert loss.loss_param.normalization == caffe_pb2.LossParameter.VALID
    assert list(loss.loss_weight) == [0.5] and list(loss.propagate_down) == [True, False]
    assert list(loss.bottom) == ["up", "label"] and list(loss.top) == ["loss"]


def test_explicit_param_messages_and_messages_as_values():
    filler = caffe_pb2.FillerParameter(type="gaussian", std=0.01)
    top = L.Convolution(L.Input(shape=dict(dim=[1, 1, 4, 4])),
                        convolution_param=dict(num_output=2, kernel_size=[3]),
                        weight_filler=filler, exclude=dict(phase=net_spec.TRAIN, stage=["x"]))
    conv = top.to_proto().layer[1]
    assert conv.convolution_param.num_output == 2
    assert conv.convolution_param.weight_filler == filler
    assert conv.exclude[0].phase == caffe_pb2.TRAIN and list(conv.exclude[0].stage) == ["x"]


def test_auto_names_and_in_place():
    data = L.Input(shape=dict(dim=[1, 4]))
    ip = L.InnerProduct(data, num_output=3)
    relu = L.ReLU(ip, in_place=True)
    net = L.Softmax(relu).to_proto()
    assert [(lp.name, list(lp.bottom), list(lp.top)) for lp in net.layer] == [
        ("Input1", [], ["Input1"]),
        ("InnerProduct1", ["Input1"], ["InnerProduct1"]),
        ("ReLU1", ["InnerProduct1"], ["InnerProduct1"]),
        ("Softmax1", ["InnerProduct1"], ["Softmax1"]),
    ]


def test_multiple_tops_ntop_zero_and_partly_named_tops():
    n = net_spec.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6]))
    n.a, n.b, _ = L.Slice(n.data, axis=1, slice_point=[2, 4], ntop=3)
    n.silence = L.Silence(n.b, ntop=0)
    net = n.to_proto()
    assert list(net.layer[1].top) == ["a", "b", "Slice1"]
    assert list(net.layer[1].slice_param.slice_point) == [2, 4]
    assert net.layer[1].name == "a"
    assert net.layer[2].name == "silence" and list(net.layer[2].top) == []
    assert "a" in n and n["b"] is n.b and list(n.tops) == ["data", "a", "b", "silence"]


def test_netspec_builds_a_working_net():
    from netengine.net import Net

    n = net_spec.NetSpec(name="tiny")
    n.data = L.Input(shape=dict(dim=[2, 5]))
    n.ip = L.InnerProduct(n.data, num_output=3, weight_filler=dict(type="gaussian", std=0.1))
    n.prob = L.Softmax(n.ip)
    net = Net(n.to_proto())
    out = net.forward(data=np.ones((2, 5), np.float32))
    assert out["prob"].shape == (2, 3)
    np.testing.assert_allclose(out["prob"].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("call, expected", [
    (lambda d: L.Convolution(d, kernal_size=3), "no parameter 'kernal_size' in convolution_param"
                                                " or LayerParameter (did you mean 'kernel_size'"),
    (lambda d: L.Pooling(d, pool="MAXIMUM"), "'MAXIMUM' is not a value of PoolMethod (MAX, AVE"),
    (lambda d: L.Convolution(d, weight_filler=3), "expected a dict or a FillerParameter"),
    (lambda d: L.Convolution(d, weight_filler=dict(tpye="x")), "FillerParameter has no field "
                                                              "'tpye' (did you mean 'type'"),
    (lambda d: L.InnerProduct(d, num_output="ten"), "num_output: cannot take 'ten'"),
    (lambda d: L.ReLU("data"), "bottom 0 must be a top of an earlier layer"),
    (lambda d: L.ReLU(d, top="x"), "name tops by assigning"),
    (lambda d: L.ReLU(d, d, in_place=True), "in_place needs as many tops as bottoms"),
])
def test_errors_are_one_line_and_name_the_field(call, expected):
    data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    with pytest.raises(net_spec.NetSpecError) as info:
        call(data)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_assigning_a_non_top_is_refused():
    n = net_spec.NetSpec()
    with pytest.raises(net_spec.NetSpecError, match="must be a layer's top"):
        n.x = 3
    with pytest.raises(AttributeError, match="no top 'y'"):
        n.y  # noqa: B018


def test_param_name_dict_is_derived_from_the_descriptor():
    names = net_spec.param_name_dict()
    assert names["Convolution"] == "convolution_param"
    assert names["InnerProduct"] == "inner_product_param"
    assert names["HDF5Data"] == "hdf5_data_param"
    assert names["ReLU"] == "relu_param"
    assert "SoftmaxWithLoss" not in names
    assert net_spec.param_fields("SoftmaxWithLoss") == ["softmax_param", "loss_param"]
    assert net_spec.param_fields("Deconvolution") == ["convolution_param"]
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
