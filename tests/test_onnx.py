"""ONNX export: onnxruntime reproduces netengine's forward on real caffemodels and on a net that
uses every exported layer type (needs the optional onnx and onnxruntime packages)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import need_shared
from google.protobuf import text_format

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from netengine.cli import export_onnx  # noqa: E402
from netengine.errors import NetEngineError  # noqa: E402
from netengine.formats import onnx as onnx_export  # noqa: E402
from netengine.net import TEST, TRAIN, Net  # noqa: E402
from netengine.proto import caffe_pb2  # noqa: E402

WEIGHTS = ("acceptance", "weights")
MTCNN = "kpzhang93_MTCNN_face_detection_alignment/code/codes/MTCNNv2/model"
REAL = [
    ("everpeace_caffe/examples/mnist/lenet.prototxt",
     "everpeace_caffe/examples/mnist/lenet_iter_10000.caffemodel"),
    ("everpeace_caffe/examples/cifar10/cifar10_quick.prototxt",
     "everpeace_caffe/examples/cifar10/cifar10_quick_iter_5000.caffemodel"),
    ("everpeace_caffe/examples/cifar10/cifar10_full.prototxt",
     "everpeace_caffe/examples/cifar10/cifar10_full_iter_70000.caffemodel"),
] + [(f"{MTCNN}/det{i}.prototxt", f"{MTCNN}/det{i}.caffemodel") for i in (1, 2, 3, 4)]


def _run(model, feeds: dict) -> list:
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _compare(net: Net, model, seed: int = 0, rtol: float = 1e-5) -> None:
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal(net.blobs[name].shape).astype(np.float32)
             for name in net.inputs}
    ours = net.forward(**feeds)
    theirs = _run(model, feeds)
    assert len(theirs) == len(net.outputs)
    for name, value in zip(net.outputs, theirs):
        expected = np.asarray(ours[name], dtype=np.float64)
        assert value.shape == expected.shape, name
        scale = max(float(np.abs(expected).max()), 1e-6)
        assert np.abs(value - expected).max() <= rtol * scale, name


@pytest.mark.parametrize("model_file, weights_file", REAL,
                         ids=[m.rsplit("/", 1)[-1] for m, _ in REAL])
def test_real_caffemodels(model_file, weights_file):
    net = Net(str(need_shared(*WEIGHTS, model_file)), TEST,
              weights=str(need_shared(*WEIGHTS, weights_file)))
    model = onnx_export.to_onnx(net)
    _compare(net, model)
    assert onnx_export.verify(net, model) <= 1e-5


def test_cifar10_quick_keeps_caffes_ceil_pooling():
    net = Net(str(need_shared(*WEIGHTS, REAL[1][0])), TEST,
              weights=str(need_shared(*WEIGHTS, REAL[1][1])))
    model = onnx_export.to_onnx(net)
    pools = [n for n in model.graph.node if n.op_type in ("MaxPool", "AveragePool")]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pools[0].attribute}
    # 32x32, kernel 3, stride 2: Caffe rounds up to 16 windows; floor would give 15
    assert net.blobs["pool1"].shape[2:] == (16, 16)
    assert attrs["pads"] == [0, 0, 1, 1] and attrs.get("ceil_mode", 0) == 0
    labels = np.argmax(_run(model, {"data": np.ones((1, 3, 32, 32), np.float32)})[0], axis=1)
    assert labels.tolist() == np.argmax(net.forward(data=np.ones((1, 3, 32, 32)))["prob"],
                                        axis=1).tolist()


EVERY_TYPE = """
name: "every_type"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { eps: 0.001 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 }
                bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "pool_max" type: "Pooling" bottom: "conv1" top: "pool_max"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "pool_ave" type: "Pooling" bottom: "conv1" top: "pool_ave"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_ceil" type: "Pooling" bottom: "conv1" top: "pool_ceil"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "cat" type: "Concat" bottom: "pool_max" bottom: "pool_ave" bottom: "pool_ceil" top: "cat" }
layer { name: "lrn" type: "LRN" bottom: "cat" top: "lrn"
  lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 k: 2 } }
layer { name: "slice" type: "Slice" bottom: "lrn" top: "s1" top: "s2" top: "s3"
  slice_param { axis: 1 slice_point: 6 slice_point: 12 } }
layer { name: "sum" type: "Eltwise" bottom: "s1" bottom: "s2" bottom: "s3" top: "e1"
  eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 } }
layer { name: "prod" type: "Eltwise" bottom: "s1" bottom: "s2" bottom: "s3" top: "e2"
  eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "s2" bottom: "s3" top: "e3"
  eltwise_param { operation: MAX } }
layer { name: "prelu" type: "PReLU" bottom: "e1" top: "e1"
  prelu_param { filler { type: "uniform" min: 0 max: 0.5 } } }
layer { name: "prelu_shared" type: "PReLU" bottom: "e2" top: "e2"
  prelu_param { channel_shared: true } }
layer { name: "deconv" type: "Deconvolution" bottom: "e3" top: "deconv"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "crop" type: "Crop" bottom: "deconv" bottom: "e1" top: "crop"
  crop_param { axis: 2 offset: 1 } }
layer { name: "bias" type: "Bias" bottom: "crop" top: "crop"
  bias_param { filler { type: "gaussian" std: 0.5 } } }
layer { name: "lrn2" type: "LRN" bottom: "crop" top: "lrn2"
  lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.5 beta: 0.6 } }
layer { name: "gap" type: "Pooling" bottom: "e2" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "gap" top: "flat" }
layer { name: "scale2" type: "Scale" bottom: "e1" bottom: "flat" top: "scale2" scale_param { axis: 0 } }
layer { name: "gmax" type: "Pooling" bottom: "scale2" top: "gmax" pooling_param { pool: MAX global_pooling: true } }
layer { name: "sig" type: "Sigmoid" bottom: "scale2" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "scale2" top: "tanh" }
layer { name: "bnll" type: "BNLL" bottom: "scale2" top: "bnll" }
layer { name: "elu" type: "ELU" bottom: "scale2" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "abs" type: "AbsVal" bottom: "scale2" top: "abs" }
layer { name: "pow" type: "Power" bottom: "abs" top: "pow" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "log" type: "Log" bottom: "pow" top: "log" log_param { base: 2 shift: 1 } }
layer { name: "exp" type: "Exp" bottom: "log" top: "exp" exp_param { base: 3 scale: 0.5 shift: 0.2 } }
layer { name: "ip" type: "InnerProduct" bottom: "exp" top: "ip"
  inner_product_param { num_output: 5 axis: 2 transpose: true
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob2" type: "Softmax" bottom: "ip" top: "prob2" softmax_param { axis: 2 } }
layer { name: "reshape" type: "Reshape" bottom: "ip" top: "reshaped" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "reshaped" top: "ip2"
  inner_product_param { num_output: 7 bias_term: false weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "drop" type: "Dropout" bottom: "ip2" top: "ip2" }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""


def _every_type_net(phase=TEST) -> Net:
    net = Net(text_format.Parse(EVERY_TYPE, caffe_pb2.NetParameter()), phase)
    rng = np.random.default_rng(3)
    bn = net.layer_dict["bn1"]
    bn.blobs[0].data[...] = rng.normal(size=6) * 4
    bn.blobs[1].data[...] = rng.uniform(0.5, 2.0, size=6) * 4
    bn.blobs[2].data[...] = 4.0
    return net


def test_every_exported_layer_type():
    net = _every_type_net()
    # the pooling cases: Caffe drops the window starting in the far pad; floor; rounded up
    assert net.blobs["pool_max"].shape == (2, 6, 3, 3)
    assert net.blobs["pool_ave"].shape == (2, 6, 3, 3)
    assert net.blobs["pool_ceil"].shape == (2, 6, 3, 3)
    model = onnx_export.to_onnx(net)
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "ConvTranspose", "BatchNormalization", "LeakyRelu", "MaxPool", "AveragePool",
            "LRN", "Split", "Sum", "Max", "PRelu", "Slice", "Gemm", "Softmax", "Softplus", "Elu",
            "GlobalMaxPool", "GlobalAveragePool", "Identity", "Reshape"} <= ops
    exported = {layer.type for layer in net.layers} - {"Input"}
    assert exported <= set(onnx_export.CONVERTERS)
    _compare(net, model, rtol=2e-5)
    _compare(net, model, seed=1, rtol=2e-5)


def test_resnet50_with_random_weights():
    path = need_shared("acceptance", "nets", "kaiminghe_deep-residual-networks", "prototxt",
                       "ResNet-50-deploy.prototxt")
    net = Net(str(path), TEST)
    rng = np.random.default_rng(0)
    for layer in net.layers:
        for blob in layer.blobs:
            fan_in = int(np.prod(blob.shape[1:])) if len(blob.shape) > 1 else 1
            blob.data[...] = rng.normal(size=blob.shape) / np.sqrt(fan_in)
        if layer.type == "BatchNorm":
            layer.blobs[1].data[...] = rng.uniform(0.5, 2.0, size=layer.blobs[1].shape)
            layer.blobs[2].data[...] = 1.0
    model = onnx_export.to_onnx(net)
    assert onnx_export.output_names(model) == ["prob"]
    _compare(net, model, rtol=1e-4)


@pytest.mark.parametrize("text, phase, expected", [
    ('layer { name: "am" type: "ArgMax" bottom: "data" top: "am" }', TEST,
     "layer 'am' (ArgMax): cannot export to ONNX: ArgMax has no exact ONNX equivalent"),
    ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
     'pooling_param { pool: STOCHASTIC kernel_size: 2 } }', TEST,
     "layer 'p' (Pooling): cannot export to ONNX: STOCHASTIC pooling"),
    ('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }', TRAIN,
     "use_global_stats false"),
])
def test_refusals_are_one_line(text, phase, expected):
    param = text_format.Parse(
        'layer { name: "data" type: "Input" top: "data" '
        'input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }' + text,
        caffe_pb2.NetParameter())
    with pytest.raises(NetEngineError) as info:
        onnx_export.to_onnx(Net(param, phase))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_cli(tmp_path, capsys):
    model_file, weights_file = REAL[0]
    out = tmp_path / "lenet.onnx"
    args = ["--model", str(need_shared(*WEIGHTS, model_file)),
            "--weights", str(need_shared(*WEIGHTS, weights_file)), "-o", str(out)]
    assert export_onnx.main(args + ["--verify"]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote {out}: " in printed and "inputs data(64, 1, 28, 28), outputs prob" in printed
    assert "largest relative difference" in printed
    assert onnx.load(str(out)).graph.output[0].name == "prob"


def test_cli_input_shape_googlenet(tmp_path, capsys):
    path = need_shared("acceptance", "nets", "bvlc_caffe", "models", "bvlc_googlenet",
                       "deploy.prototxt")
    out = tmp_path / "googlenet.onnx"
    assert export_onnx.main(["--model", str(path), "-o", str(out), "--input-shape",
                             "data=1,3,224,224"]) == 0
    assert "inputs data(1, 3, 224, 224), outputs prob" in capsys.readouterr().out
    model = onnx.load(str(out))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 224, 224]  # the prototxt says 10, 3, 224, 224
    assert sum(n.op_type == "Concat" for n in model.graph.node) == 9  # the inception blocks


def test_cli_errors(tmp_path, capsys, monkeypatch):
    assert export_onnx.main(["--model", str(tmp_path / "none.prototxt"),
                             "-o", str(tmp_path / "x.onnx")]) == 1
    assert capsys.readouterr().err.startswith("export_onnx: error: file not found")
    model_file = need_shared(*WEIGHTS, REAL[0][0])
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert export_onnx.main(["--model", str(model_file), "-o", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any upgrade notice
    assert err == ("export_onnx: error: ONNX export needs the onnx package, which is not "
                   "installed (pip install onnx)")
