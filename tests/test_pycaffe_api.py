"""pycaffe's surface beyond Net's basics: the Net() argument orders, blob 4-D accessors,
caffe.Layer / NetSpec / layers / params / to_proto, Python layers as the user's object,
share_with, the list-shaped views, forward_backward_all, backward's checks, caffe.io and
caffe.Classifier."""
from __future__ import annotations

import numpy as np
import pytest

import netengine as caffe
from netengine.errors import NetEngineError
from netengine.layers.python_layer import PythonLayerBase

DEPLOY = """name: "tiny"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 }
                              bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "extra" type: "ReLU" bottom: "ip" top: "extra" include { stage: "deploy" } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

LOSS_NET = """force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 2 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""

IP_NET = """force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "gaussian" std: 0.5 } } }
"""


@pytest.fixture
def deploy(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY)
    caffe.set_random_seed(1)
    net = caffe.Net(str(path), caffe.TEST)
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    return path, weights, net


# -- Net() ------------------------------------------------------------------------------------
def test_net_argument_orders(deploy):
    path, weights, saved = deploy
    expected = saved.params["ip"][0].data
    forms = [caffe.Net(str(path), caffe.TEST, weights=str(weights)),
             caffe.Net(str(path), caffe.TEST, 0, None, str(weights)),  # pycaffe's order
             caffe.Net(str(path), str(weights), caffe.TEST),           # pycaffe's old order
             caffe.Net(str(path), caffe.TEST, str(weights))]
    for net in forms:
        np.testing.assert_array_equal(net.params["ip"][0].data, expected)
        assert "extra" not in net.blobs
    staged = caffe.Net(str(path), caffe.TEST, 0, ["deploy"])
    assert "extra" in staged.blobs
    assert "extra" in caffe.Net(str(path), caffe.TEST, stages=["deploy"]).blobs


@pytest.mark.parametrize("args, match", [((caffe.TEST,), None), ((5,), "phase must be"),
                                         ((caffe.TEST, 0, None, None), None)])
def test_net_checks_phase(deploy, args, match):
    if match is None:
        assert caffe.Net(str(deploy[0]), *args).phase == caffe.TEST
    else:
        with pytest.raises(NetEngineError, match=match):
            caffe.Net(str(deploy[0]), *args)


def test_net_refuses_a_non_path():
    with pytest.raises(NetEngineError, match="prototxt path or a NetParameter, got NoneType"):
        caffe.Net(None, caffe.TEST)


# -- blobs and views ----------------------------------------------------------------------------
def test_blob_legacy_accessors(deploy):
    net = deploy[2]
    data, ip = net.blobs["data"], net.blobs["ip"]
    assert (data.num, data.channels, data.height, data.width) == (2, 3, 4, 4)
    assert (ip.num, ip.channels, ip.height, ip.width) == (2, 5, 1, 1)
    data.reshape(1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="at most 4 axes"):
        _ = data.num


def test_list_views_and_loss_weights():
    net = caffe.Net(_param(LOSS_NET), caffe.TRAIN)
    assert net._blob_names == list(net.blobs) == ["x", "t", "y", "loss"]
    assert net._inputs == ["x", "t"] and net._outputs == ["loss"]
    assert dict(net.blob_loss_weights) == {"x": 0.0, "t": 0.0, "y": 0.0, "loss": 1.0}
    assert net._blob_loss_weights == [0.0, 0.0, 0.0, 1.0]


def _param(text):
    from google.protobuf import text_format

    from netengine.proto import caffe_pb2

    return text_format.Parse(text, caffe_pb2.NetParameter())


def test_share_with_uses_the_other_nets_storage(deploy):
    path, _, owner = deploy
    follower = caffe.Net(str(path), caffe.TEST)
    follower.share_with(owner)
    owner.params["ip"][0].data[...] = 0.25
    assert np.all(follower.params["ip"][0].data == 0.25)
    other = caffe.Net(_param(DEPLOY.replace("num_output: 5", "num_output: 6")), caffe.TEST)
    with pytest.raises(NetEngineError, match="cannot share param 0 of layer 'ip'"):
        other.share_with(owner)


# -- backward and forward_backward_all ----------------------------------------------------------
def test_backward_checks_its_diffs():
    net = caffe.Net(_param(LOSS_NET), caffe.TRAIN)
    net.forward()
    with pytest.raises(NetEngineError, match="'y' is not an output of this net"):
        net.backward(y=np.ones((2, 4)))
    with pytest.raises(NetEngineError, match=r"diff of shape \(3,\) is not batch sized for "
                                             "blob 'loss'"):
        net.backward(loss=np.ones(3))
    net.backward(loss=np.ones(()))
    ip = caffe.Net(_param(IP_NET), caffe.TRAIN)
    ip.forward()
    ip.backward(y=np.ones((2, 1)))  # broadcast over the rest, as pycaffe's diff[...] = value
    with pytest.raises(NetEngineError, match=r"a diff of shape \(2, 3\) does not fit blob 'y'"):
        ip.backward(y=np.ones((2, 3)))


def test_forward_backward_all_batches_inputs_and_output_diffs():
    # No loss: the output diffs passed in drive backward, so dx = dy · W exactly.
    net = caffe.Net(_param(IP_NET), caffe.TRAIN)
    assert net.inputs == ["x"] and net.outputs == ["y"]
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(5, 3)), rng.normal(size=(5, 4))
    outs, diffs = net.forward_backward_all(x=x, y=dy)
    w = net.params["ip"][0].data.astype(np.float64)
    np.testing.assert_allclose(outs["y"], x @ w.T + net.params["ip"][1].data, rtol=1e-5)
    np.testing.assert_allclose(diffs["x"], dy @ w, rtol=1e-5, atol=1e-6)
    assert outs["y"].shape == (5, 4) and diffs["x"].shape == (5, 3)


# -- net_spec names and Python layers -----------------------------------------------------------
def test_net_spec_names_at_the_top_level():
    from netengine import layers as L  # noqa: N812 - pycaffe's spelling
    from netengine import params as P  # noqa: N812

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 6, 6]))
    n.conv = L.Convolution(n.data, num_output=3, kernel_size=3,
                           weight_filler=dict(type="xavier"))
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    net = caffe.Net(n.to_proto(), caffe.TEST)
    assert net.blobs["pool"].shape == (2, 3, 2, 2)
    assert [layer.type for layer in caffe.to_proto(n.pool).layer] == [
        "Input", "Convolution", "Pooling"]
    assert caffe.layers.Convolution is not None and caffe.Layer is PythonLayerBase
    with pytest.raises(AttributeError):
        caffe.layers.not_a_layer  # noqa: B018


PY_MODULE = '''
import netengine as caffe


class Feeder(caffe.Layer):
    def setup(self, bottom, top):
        self.batch_size = int(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(self.batch_size, 2)

    def forward(self, bottom, top):
        top[0].data[...] = self.fill_value()

    def fill_value(self):
        return 7.0
'''


def test_python_layer_is_reached_as_the_users_object(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))  # layer modules come from sys.path (Caffe's rule)
    (tmp_path / "feeder_mod.py").write_text(PY_MODULE)
    path = tmp_path / "py.prototxt"
    path.write_text('layer { name: "feed" type: "Python" top: "out" python_param { '
                    'module: "feeder_mod" layer: "Feeder" param_str: "3" } }')
    net = caffe.Net(str(path), caffe.TRAIN)
    layer = net.layers[0]
    assert layer.batch_size == 3 and layer.fill_value() == 7.0
    assert layer.type == "Python" and isinstance(layer.impl, PythonLayerBase)
    with pytest.raises(AttributeError, match="no_such_thing"):
        layer.no_such_thing  # noqa: B018
    assert np.all(net.forward()["out"] == 7.0)


def test_a_users_seek_attribute_is_not_the_engines(tmp_path, monkeypatch):
    """The solver seeks the engine's data layers on restore; a Python layer's own attribute
    of that name (reachable through the wrapper) is left alone."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "seeker_mod.py").write_text(PY_MODULE + "\n    seek = 0\n")
    net = tmp_path / "py.prototxt"
    net.write_text('layer { name: "feed" type: "Python" top: "out" python_param { '
                   'module: "seeker_mod" layer: "Feeder" param_str: "3" } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "out" top: "ip" '
                   'inner_product_param { num_output: 1 } }\n'
                   'layer { name: "loss" type: "Reduction" bottom: "ip" top: "loss" '
                   'loss_weight: 1 }\n')
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                      f'snapshot_prefix: "{tmp_path / "s"}"\n')
    train = caffe.get_solver(str(solver))
    assert train.net.layers[0].seek == 0
    train.step(2)
    _, state = train.snapshot()
    train.restore(state)  # used to call the user's 0
    assert train.iter == 2


# -- errors name what the user asked for ----------------------------------------------------------
def test_reshape_errors_name_file_line_and_layer(deploy):
    net = caffe.Net(str(deploy[0]), caffe.TEST)
    net.blobs["data"].reshape(2, 3, 5, 4)
    with pytest.raises(NetEngineError, match=r"deploy\.prototxt:\d+: layer 'ip'"):
        net.reshape()


def test_weights_file_errors_name_the_path(deploy, tmp_path):
    net = deploy[2]
    with pytest.raises(NetEngineError, match=f"cannot read {tmp_path}: Is a directory"):
        net.copy_from(str(tmp_path))
    blocker = tmp_path / "plain_file"
    blocker.write_text("")
    target = blocker / "w.caffemodel"
    with pytest.raises(OSError) as info:
        net.save(str(target))
    assert info.value.filename == str(target) and not list(tmp_path.glob("**/*.tmp"))


def test_forward_refusing_new_input_shapes_leaves_the_net_usable(deploy):
    net = caffe.Net(str(deploy[0]), caffe.TEST)
    before = net.forward(data=np.ones((2, 3, 4, 4)))["prob"].copy()
    with pytest.raises(NetEngineError, match="layer 'ip'"):
        net.forward(data=np.ones((3, 3, 5, 4)))
    assert net.blobs["data"].shape == (2, 3, 4, 4) and net.blobs["prob"].shape == (2, 5)
    np.testing.assert_array_equal(net.forward()["prob"], before)
    assert net.forward(data=np.ones((3, 3, 4, 4)))["prob"].shape == (3, 5)  # a new batch is fine
