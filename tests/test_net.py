"""Net construction and passes: Caffe's phase rules, splits, in-place, sharing, loss weights,
backward needs, reshape on forward, errors that name file, line and layer."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import need_shared
from google.protobuf import text_format

import netengine
from netengine import net as net_module
from netengine.errors import NetEngineError
from netengine.layers import REGISTRY, layer_type_list
from netengine.net import Net, blob_to_proto, insert_splits, layer_included, state_meets_rule
from netengine.proto import caffe_pb2


def needs(*types: str) -> None:
    layer_type_list()
    missing = [t for t in types if t not in REGISTRY]
    if missing:
        pytest.skip(f"layer types not implemented yet: {missing}")


def net_from_text(text: str, phase=netengine.TRAIN, tmp_path=None, **kw) -> Net:
    if tmp_path is not None:
        path = tmp_path / "net.prototxt"
        path.write_text(text)
        return Net(str(path), phase, **kw)
    param = caffe_pb2.NetParameter()
    text_format.Merge(text, param)
    return Net(param, phase, **kw)


def rule(text: str):
    return text_format.Parse(text, caffe_pb2.NetStateRule())


def state(text: str):
    return text_format.Parse(text, caffe_pb2.NetState())


# -- NetState rules ------------------------------------------------------------------------------
def test_state_meets_rule_phase_level_stages():
    s = state('phase: TRAIN level: 2 stage: "a" stage: "b"')
    assert state_meets_rule(s, rule("phase: TRAIN"))
    assert not state_meets_rule(s, rule("phase: TEST"))
    assert state_meets_rule(s, rule("min_level: 2 max_level: 2"))
    assert not state_meets_rule(s, rule("min_level: 3"))
    assert not state_meets_rule(s, rule("max_level: 1"))
    assert state_meets_rule(s, rule('stage: "a" stage: "b"'))
    assert not state_meets_rule(s, rule('stage: "c"'))
    assert not state_meets_rule(s, rule('not_stage: "b"'))
    assert state_meets_rule(s, rule('not_stage: "c"'))


def test_include_and_exclude_rules():
    s = state("phase: TEST")
    layer = caffe_pb2.LayerParameter()
    assert layer_included(layer, s)
    layer.include.add().phase = caffe_pb2.TRAIN
    assert not layer_included(layer, s)
    layer.include.add().phase = caffe_pb2.TEST
    assert layer_included(layer, s)
    excl = caffe_pb2.LayerParameter()
    excl.exclude.add().phase = caffe_pb2.TEST
    assert not layer_included(excl, s)


NET_PHASES = """
name: "phases"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "train_only" type: "Flatten" bottom: "x" top: "a" include { phase: TRAIN } }
layer { name: "test_only" type: "Flatten" bottom: "x" top: "b" include { phase: TEST } }
layer { name: "staged" type: "Flatten" bottom: "x" top: "c" include { stage: "deploy" } }
layer { name: "leveled" type: "Flatten" bottom: "x" top: "d" include { min_level: 1 } }
"""


def test_phase_level_and_stage_filtering():
    names = lambda net: [layer.name for layer in net.layers if layer.type != "Split"]  # noqa: E731
    assert names(net_from_text(NET_PHASES, netengine.TRAIN)) == ["in", "train_only"]
    assert names(net_from_text(NET_PHASES, netengine.TEST)) == ["in", "test_only"]
    assert "staged" in names(net_from_text(NET_PHASES, netengine.TEST, stages=["deploy"]))
    assert "leveled" in names(net_from_text(NET_PHASES, netengine.TEST, level=1))
    for layer in net_from_text(NET_PHASES, netengine.TRAIN).layers:
        assert layer.phase == netengine.TRAIN


# -- splits ----------------------------------------------------------------------------------------
def test_split_insertion_names_and_loss_weight():
    param = text_format.Parse("""
      layer { name: "in" type: "Input" top: "x" }
      layer { name: "a" type: "Flatten" bottom: "x" top: "y" loss_weight: 2 }
      layer { name: "b" type: "Flatten" bottom: "y" top: "z" }
      layer { name: "c" type: "Flatten" bottom: "x" top: "w" }
    """, caffe_pb2.NetParameter())
    layers, lines = insert_splits(list(param.layer), [None] * 4)
    by_name = {layer.name: layer for layer in layers}
    assert [layer.name for layer in layers] == ["in", "x_in_0_split", "a", "y_a_0_split", "b", "c"]
    assert list(by_name["x_in_0_split"].top) == ["x_in_0_split_0", "x_in_0_split_1"]
    assert list(by_name["a"].bottom) == ["x_in_0_split_0"]
    assert list(by_name["c"].bottom) == ["x_in_0_split_1"]
    # the loss use of y counts as a consumer and takes the split's first top
    assert list(by_name["y_a_0_split"].loss_weight) == [2.0, 0.0]
    assert list(by_name["a"].loss_weight) == []
    assert list(by_name["b"].bottom) == ["y_a_0_split_1"]


def _lenet_with_inputs(path, batch: int):
    """Caffe's lenet_train_test.prototxt with its Data layers replaced by Input layers."""
    param = caffe_pb2.NetParameter()
    text_format.Merge(path.read_text(), param)
    for layer in param.layer:
        if layer.type == "Data":
            layer.type = "Input"
            layer.ClearField("data_param")
            layer.ClearField("transform_param")
            layer.input_param.shape.add().dim.extend([batch, 1, 28, 28])
            layer.input_param.shape.add().dim.extend([batch])
    return param


def test_lenet_train_test_shapes_and_split_names():
    needs("Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss", "Accuracy")
    path = need_shared("acceptance", "nets", "bvlc_caffe", "examples", "mnist",
                       "lenet_train_test.prototxt")
    train = Net(_lenet_with_inputs(path, 64), netengine.TRAIN)
    test = Net(_lenet_with_inputs(path, 100), netengine.TEST)
    assert [layer for layer in train.layers if layer.type == "Split"] == []
    assert [layer.name for layer in test.layers if layer.type == "Split"] == [
        "label_mnist_1_split", "ip2_ip2_0_split"]
    expected = {"data": (64, 1, 28, 28), "conv1": (64, 20, 24, 24), "pool1": (64, 20, 12, 12),
                "conv2": (64, 50, 8, 8), "pool2": (64, 50, 4, 4), "ip1": (64, 500),
                "ip2": (64, 10), "loss": ()}
    assert {k: train.blobs[k].shape for k in expected} == expected
    assert sum(b.count for blobs in train.params.values() for b in blobs) == 431080
    assert test.outputs == ["accuracy", "loss"]
    # pycaffe lists every blob, 0 for those that are not losses
    assert list(train.blob_loss_weights) == list(train.blobs)
    assert {k: w for k, w in train.blob_loss_weights.items() if w} == {"loss": 1.0}


# -- in-place, reshape, backward needs, sharing -----------------------------------------------------
IP_NET = """
name: "ip"
force_backward: %s
layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h" %s
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y" %s
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" %s }
"""


def ip_net(force="false", p1="", p2="", loss="", phase=netengine.TRAIN) -> Net:
    needs("InnerProduct", "ReLU", "EuclideanLoss")
    netengine.set_random_seed(3)
    net = net_from_text(IP_NET % (force, p1, p2, loss), phase)
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.normal(size=(4, 3))
    net.blobs["t"].data[...] = rng.normal(size=(4, 2))
    return net


def test_in_place_layer_shares_the_blob():
    net = ip_net()
    assert net.top_vecs[2][0] is net.bottom_vecs[2][0] is net.blobs["h"]
    assert "h" in net.blobs and list(net.blobs) == ["x", "t", "h", "y", "loss"]


def test_backward_needs_and_force_backward():
    net = ip_net()
    assert net.layer_need_backward == [False, True, True, True, True]
    assert net.bottom_need_backward[1] == [False]  # x is an input: no gradient asked for
    assert net.bottom_need_backward[4] == [True, False]  # labels/targets of a loss
    forced = ip_net(force="true")
    assert forced.bottom_need_backward[1] == [True]
    assert forced.bottom_need_backward[4] == [True, True]  # EuclideanLoss allows both


def test_lr_mult_zero_stops_backward_below():
    net = ip_net(p1="param { lr_mult: 0 } param { lr_mult: 0 }")
    assert net.layer_need_backward[1] is False
    assert net.layers[1].param_propagate_down == [False, False]
    assert net.params_lr[:2] == [0.0, 0.0]


def test_propagate_down_false_skips_a_bottom():
    net = ip_net(p2="propagate_down: false")
    assert net.bottom_need_backward[3] == [False]
    # nothing below ip2 reaches the loss any more, so ip1 needs no backward
    assert net.layer_need_backward[1] is False


def test_layers_that_reach_no_loss_are_pruned():
    net = net_from_text(NET_PHASES, netengine.TRAIN)
    assert not any(net.layer_need_backward)


def test_param_diffs_accumulate_bottom_diffs_overwrite():
    net = ip_net(force="true")
    net.forward()
    net.clear_param_diffs()
    net.backward()
    once_w = net.params["ip1"][0].diff.copy()
    once_x = net.blobs["x"].diff.copy()
    net.backward()
    np.testing.assert_allclose(net.params["ip1"][0].diff, 2 * once_w, rtol=1e-6)
    np.testing.assert_allclose(net.blobs["x"].diff, once_x, rtol=1e-6)


def test_loss_weight_scales_gradient_not_value():
    net1 = ip_net()
    net2 = ip_net(loss="loss_weight: 2.5")
    l1, l2 = net1.forward()["loss"], net2.forward()["loss"]
    np.testing.assert_allclose(l1, l2)
    net1.clear_param_diffs()
    net2.clear_param_diffs()
    net1.backward()
    net2.backward()
    np.testing.assert_allclose(net2.params["ip2"][0].diff, 2.5 * net1.params["ip2"][0].diff,
                               rtol=1e-5)
    assert net2.blobs["loss"].diff == pytest.approx(2.5)


def test_forward_reshapes_after_input_resize():
    net = ip_net()
    net.blobs["x"].reshape(7, 3)
    net.blobs["t"].reshape(7, 2)
    out = net.forward()
    assert net.blobs["y"].shape == (7, 2)
    assert np.isfinite(out["loss"])


def test_forward_with_inputs_and_start_end():
    net = ip_net()
    x = np.ones((4, 3), np.float32)
    out = net.forward(end="ip1", x=x)
    assert list(out) == ["h"]
    assert net.blobs["x"].data[0, 0] == 1


def test_param_sharing_by_name():
    needs("InnerProduct", "EuclideanLoss")
    text = """
    layer { name: "in" type: "Input" top: "a" top: "b" top: "t"
            input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } shape { dim: 2 dim: 4 } } }
    layer { name: "ipa" type: "InnerProduct" bottom: "a" top: "ya" param { name: "w" } param { name: "bias" }
            inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
    layer { name: "ipb" type: "InnerProduct" bottom: "b" top: "yb" param { name: "w" } param { name: "bias" }
            inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
    layer { name: "sum" type: "EuclideanLoss" bottom: "ya" bottom: "yb" top: "loss" }
    """
    net = net_from_text(text)
    wa, wb = net.params["ipa"][0], net.params["ipb"][0]
    np.testing.assert_array_equal(wa.data, wb.data)
    wa.data[0, 0] = 42.0
    assert wb.data[0, 0] == 42.0
    assert len(net.learnable_params) == 2
    assert net.param_owners == [-1, -1, 0, 1]


def test_param_sharing_shape_mismatch_is_refused():
    needs("InnerProduct")
    text = """
    layer { name: "in" type: "Input" top: "a" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ipa" type: "InnerProduct" bottom: "a" top: "ya" param { name: "w" }
            inner_product_param { num_output: 4 bias_term: false } }
    layer { name: "ipb" type: "InnerProduct" bottom: "a" top: "yb" param { name: "w" }
            inner_product_param { num_output: 5 bias_term: false } }
    """
    with pytest.raises(NetEngineError, match="cannot share param 'w'.*ipb|ipb.*cannot share"):
        net_from_text(text)


# -- weights --------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".caffemodel", ".caffemodel.h5"])
def test_save_and_copy_from_round_trip(tmp_path, suffix):
    if suffix.endswith(".h5"):
        pytest.importorskip("h5py")
    net = ip_net()
    path = tmp_path / f"w{suffix}"
    net.save(str(path))
    other = ip_net()
    for blobs in other.params.values():
        for blob in blobs:
            blob.data[...] = 0
    ignored = other.copy_from(str(path))
    assert ignored == []
    for name, blobs in net.params.items():
        for a, b in zip(blobs, other.params[name]):
            np.testing.assert_array_equal(a.data, b.data)


def test_weights_format_is_told_by_content_not_name(tmp_path):
    pytest.importorskip("h5py")
    net = ip_net()
    binary, hdf5 = tmp_path / "binary.caffemodel.h5", tmp_path / "hdf5.caffemodel"
    net.save(binary)
    net.save_hdf5(hdf5)
    for path in (binary, hdf5):
        other = ip_net()
        other.params["ip2"][0].data[...] = 0
        assert other.copy_from(str(path)) == []
        np.testing.assert_array_equal(other.params["ip2"][0].data, net.params["ip2"][0].data)


def test_solver_state_given_as_weights_is_named(tmp_path):
    state = caffe_pb2.SolverState(iter=5)
    state.history.add().data.extend([1.0, 2.0])
    path = tmp_path / "x.solverstate"
    path.write_bytes(state.SerializeToString())
    with pytest.raises(NetEngineError, match=r"x\.solverstate is a solver state, not weights"):
        ip_net().copy_from(str(path))


def test_copy_from_legacy_4d_shapes_and_ignored_layers():
    net = ip_net()
    source = caffe_pb2.NetParameter()
    layer = source.layer.add(name="ip2")
    w = layer.blobs.add(num=1, channels=1, height=2, width=5)
    w.data.extend(np.arange(10, dtype=np.float32))
    b = layer.blobs.add(num=1, channels=1, height=1, width=2)
    b.data.extend([7.0, 8.0])
    source.layer.add(name="not_in_net")
    ignored = net.copy_from(source)
    assert ignored == ["not_in_net"]
    np.testing.assert_array_equal(net.params["ip2"][0].data, np.arange(10).reshape(2, 5))
    np.testing.assert_array_equal(net.params["ip2"][1].data, [7.0, 8.0])


def test_copy_from_matching_no_layer_warns(monkeypatch):
    warnings = []
    monkeypatch.setattr(net_module.log, "warning", lambda msg, *a: warnings.append(msg % a))
    net = ip_net()
    source = caffe_pb2.NetParameter()
    source.layer.add(name="other").blobs.add().data.extend([1.0])
    assert net.copy_from(source) == ["other"]
    assert len(warnings) == 1 and "no layer of this net gets weights from this file" in warnings[0]
    layer = source.layer.add(name="ip2")
    layer.blobs.add().CopyFrom(blob_to_proto(net.params["ip2"][0]))
    layer.blobs.add().CopyFrom(blob_to_proto(net.params["ip2"][1]))
    net.copy_from(source)
    assert len(warnings) == 1


def test_copy_from_shape_mismatch_names_layer():
    net = ip_net()
    source = caffe_pb2.NetParameter()
    blob = source.layer.add(name="ip2").blobs.add()
    blob.shape.dim.extend([3, 5])
    blob.data.extend([0.0] * 15)
    source.layer[0].blobs.add().shape.dim.append(2)
    source.layer[0].blobs[1].data.extend([0.0, 0.0])
    with pytest.raises(NetEngineError, match="ip2.*shape mismatch"):
        net.copy_from(source)


# -- errors: one line with file, line and layer -----------------------------------------------------
def one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_syntax_error_reports_file_line_column(tmp_path):
    bad = 'name: "x"\nlayer {\n  name: "in"\n  type: "Input"\n  top: "x"\n  bogus_field: 3\n}\n'
    path = tmp_path / "bad.prototxt"
    path.write_text(bad)
    with pytest.raises(NetEngineError) as info:
        Net(str(path), netengine.TEST)
    text = one_line(info.value)
    assert f"{path}:6:" in text and "bogus_field" in text and "'in'" in text


def test_malformed_text_reports_position(tmp_path):
    path = tmp_path / "broken.prototxt"
    path.write_text('layer {\n  name: "in"\n  type: "Input"\n  top: "x"\n')
    with pytest.raises(NetEngineError) as info:
        Net(str(path), netengine.TEST)
    assert str(path) in one_line(info.value)
    assert info.value.line is not None


def test_unknown_type_names_layer_line_and_closest_match(tmp_path):
    text = ('name: "x"\nlayer { name: "in" type: "Input" top: "x" '
            'input_param { shape { dim: 1 } } }\n\nlayer {\n  name: "act"\n  type: "Relu"\n'
            '  bottom: "x"\n  top: "y"\n}\n')
    with pytest.raises(NetEngineError) as info:
        net_from_text(text, tmp_path=tmp_path)
    msg = one_line(info.value)
    assert "net.prototxt:4:" in msg and "'act'" in msg and "Relu" in msg
    assert "did you mean 'ReLU'" in msg and "netengine summarize --layers" in msg
    assert "docs/layers.md" in msg and len(msg) < 300, (len(msg), msg)


def test_unknown_type_far_from_any_names_no_guess_but_the_list(tmp_path):
    text = 'layer { name: "q" type: "Quux9000" top: "x" }\n'
    with pytest.raises(NetEngineError) as info:
        net_from_text(text, tmp_path=tmp_path)
    msg = one_line(info.value)
    assert "did you mean" not in msg and "summarize --layers" in msg and len(msg) < 300


def test_fork_layer_type_is_named_as_such(tmp_path):
    text = 'layer { name: "in" type: "Input" top: "x" }\nlayer { name: "bn" type: "BN" bottom: "x" top: "x" }\n'
    with pytest.raises(NetEngineError, match=r"net\.prototxt:2:.*'bn'.*BVLC Caffe has no layer type 'BN'"):
        net_from_text(text, tmp_path=tmp_path)


def test_unknown_bottom_names_layer_and_line(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
            'layer { name: "f" type: "Flatten" bottom: "nope" top: "y" }\n')
    with pytest.raises(NetEngineError) as info:
        net_from_text(text, tmp_path=tmp_path)
    msg = one_line(info.value)
    assert "net.prototxt:2:" in msg and "'f'" in msg and "unknown bottom blob 'nope'" in msg


def test_duplicate_top_is_refused(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 2 } } }\n'
            'layer { name: "f" type: "Flatten" bottom: "x" top: "y" }\n'
            'layer { name: "g" type: "Flatten" bottom: "x" top: "y" }\n')
    with pytest.raises(NetEngineError, match=r":3:.*'g'.*top blob 'y' is produced by more than one"):
        net_from_text(text, tmp_path=tmp_path)


def test_top_listed_twice_in_one_layer(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" top: "x" '
            'input_param { shape { dim: 2 } shape { dim: 2 } } }\n')
    with pytest.raises(NetEngineError, match=r":1:.*'in'.*lists top 'x' twice"):
        net_from_text(text, tmp_path=tmp_path)


def test_wrong_number_of_bottoms(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 2 } } }\n'
            'layer { name: "f" type: "Flatten" bottom: "x" bottom: "x" top: "y" }\n')
    with pytest.raises(NetEngineError, match=r":2:.*'f' \(Flatten\).*exactly 1 bottom"):
        net_from_text(text, tmp_path=tmp_path)


def test_bad_parameter_value_is_one_line(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 6 } } }\n'
            'layer { name: "r" type: "Reshape" bottom: "x" top: "y"\n'
            '  reshape_param { shape { dim: 5 dim: -1 } } }\n')
    with pytest.raises(NetEngineError) as info:
        net_from_text(text, tmp_path=tmp_path)
    msg = one_line(info.value)
    assert ":2:" in msg and "'r' (Reshape)" in msg and "divisible" in msg


def test_in_place_refused_for_flatten(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 2 } } }\n'
            'layer { name: "f" type: "Flatten" bottom: "x" top: "x" }\n')
    with pytest.raises(NetEngineError, match="in-place"):
        net_from_text(text, tmp_path=tmp_path)


def test_missing_file_is_one_line():
    with pytest.raises(NetEngineError, match="file not found"):
        Net("/nonexistent/net.prototxt", netengine.TEST)


def test_forward_all_batches_and_trims():
    needs("InnerProduct")
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    """
    net = net_from_text(text, netengine.TEST)
    x = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    out = net.forward_all(x=x)["y"]
    w = net.params["ip"][0].data
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-5, atol=1e-6)
    assert out.shape == (10, 2)


def test_outputs_sorted_by_name_and_automatic_tops_are_not_outputs(tmp_path):
    text = ('layer { name: "x" type: "Input" top: "x" top: "t" input_param { shape { dim: 4 '
            'dim: 3 } shape { dim: 4 } } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
            'inner_product_param { num_output: 3 } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "t" top: "loss" }\n'
            'layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "t" top: "accuracy" }\n'
            'layer { name: "anon" type: "SoftmaxWithLoss" bottom: "ip" bottom: "t" }\n')
    net = net_from_text(text, tmp_path=tmp_path)
    assert net.outputs == ["accuracy", "loss"]  # Caffe's std::set order, not layer order
    out = net.forward(t=np.zeros(4))
    assert list(out) == ["accuracy", "loss"]
    assert net.last_loss == pytest.approx(2 * float(out["loss"]))  # the anonymous loss counts


def test_construction_logs_caffes_setup_lines(monkeypatch):
    lines = []
    monkeypatch.setattr(net_module.log, "info", lambda msg, *a, **k: lines.append(msg % a))
    ip_net(loss="loss_weight: 2")
    assert "Creating Layer ip1" in lines and "ip1 <- x" in lines and "ip1 -> h" in lines
    assert "Top shape: 4 3 (12)" in lines and "    with loss weight 2" in lines
    assert lines[-2:] == ["This network produces output loss", "Network initialization done."]
