"""Net setup warns once per chain where an in-place layer overwrites a blob that an earlier
in-place layer reads in backward (ReLU then BatchNorm in place); Caffe's semantics are kept."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from netengine.net import TEST, TRAIN, Net

HEAD = """name: "chain"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 5 dim: 5 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
"""
TAIL = """layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
RELU_BN_SCALE = """layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" }
"""


@pytest.fixture
def warnings():
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno == logging.WARNING:
                records.append(record.getMessage())

    logger = logging.getLogger("netengine")
    handler = Keep()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _net(tmp_path, middle: str, phase=TRAIN) -> Net:
    path = tmp_path / "net.prototxt"
    path.write_text(HEAD + middle + TAIL)
    return Net(str(path), phase)


def test_relu_then_batchnorm_in_place_warns_once(tmp_path, warnings):
    _net(tmp_path, RELU_BN_SCALE)
    assert len(warnings) == 1, warnings
    message = warnings[0]
    assert message.startswith(f"{tmp_path / 'net.prototxt'}:6: layer 'relu1' (ReLU)")
    assert "layer 'bn1' (BatchNorm) then overwrites it in place" in message
    assert message.endswith("give 'relu1' its own top")


@pytest.mark.parametrize("middle", [
    'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "r1" }\n'  # its own top
    'layer { name: "bn1" type: "BatchNorm" bottom: "r1" top: "r1" }\n'
    'layer { name: "scale1" type: "Scale" bottom: "r1" top: "s1" }\n'
    'layer { name: "sum" type: "Eltwise" bottom: "s1" bottom: "conv1" top: "out" }\n',
    'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }\n'
    'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n',
    'layer { name: "p1" type: "PReLU" bottom: "conv1" top: "conv1" }\n'
    'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }\n',
])
def test_safe_orders_do_not_warn(tmp_path, warnings, middle):
    _net(tmp_path, middle)
    assert warnings == []


def test_test_phase_nets_do_not_repeat_the_warning(tmp_path, warnings):
    _net(tmp_path, RELU_BN_SCALE, phase=TEST)
    assert warnings == []


def test_chain_through_dropout_still_warns(tmp_path, warnings):
    _net(tmp_path, 'layer { name: "s1" type: "Sigmoid" bottom: "conv1" top: "conv1" }\n'
                   'layer { name: "d1" type: "Dropout" bottom: "conv1" top: "conv1" }\n'
                   'layer { name: "pw" type: "Power" bottom: "conv1" top: "conv1" '
                   'power_param { shift: 1 } }\n')
    assert len(warnings) == 1 and "'s1' (Sigmoid)" in warnings[0]
    assert "'pw' (Power)" in warnings[0]


def test_caffe_semantics_are_kept(tmp_path):
    """ReLU's backward reads what the blob holds then: BatchNorm's output, as in Caffe."""
    net = _net(tmp_path, RELU_BN_SCALE.split("\n")[0] + "\n" + RELU_BN_SCALE.split("\n")[1]
               + "\n")
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = [0, 1, 0, 1]
    relu = list(net._layer_names).index("relu1")
    seen = {}

    def before(i):
        if i == relu:
            seen["data"] = np.array(net.blobs["conv1"].data)
            seen["diff"] = np.array(net.blobs["conv1"].diff)

    net.before_backward(before)
    net.forward()
    net.backward()
    assert (seen["data"] < 0).any()  # BatchNorm's output, not ReLU's (which is >= 0)
    expected = seen["diff"] * (seen["data"] > 0)
    np.testing.assert_array_equal(net.blobs["conv1"].diff, expected)
