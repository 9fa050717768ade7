"""Legacy upgrades (Caffe's upgrade_proto): V0, V1, net inputs, data transform, BatchNorm, solvers.

Golden pairs from ../shared/acceptance: the 23 V1 files of BVLC commit 11a4c165 against their
V2 twins written by Caffe's own upgrade_net_proto_text (e6c80dac), the 6 legacy-solver files
against BVLC HEAD, and the V0 (v0.9) LeNet against the V1 LeNet.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import ACCEPTANCE
from google.protobuf import text_format

from netengine.cli import upgrade_net as upgrade_net_cli
from netengine.cli import upgrade_solver as upgrade_solver_cli
from netengine.errors import NetEngineError
from netengine.formats import upgrade
from netengine.formats.prototxt import read_binary_proto, read_text_proto
from netengine.net import Net
from netengine.proto import caffe_pb2

NETS = ACCEPTANCE / "nets"
V1_DIR = NETS / "bvlc_caffe_v1format_pre_upgrade"
V2_DIR = NETS / "bvlc_caffe_v2_upgraded_e6c80dac"
SOLVER_DIR = NETS / "bvlc_caffe_legacy_solver_type"
V0_DIR = NETS / "bvlc_caffe_v0format_v0.9"


def _rel(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.prototxt"))


def net_text(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def read_net(path) -> tuple[caffe_pb2.NetParameter, list]:
    param, source = read_text_proto(path, caffe_pb2.NetParameter())
    return param, source.lines("layers" if len(param.layers) else "layer")


def upgraded(path) -> caffe_pb2.NetParameter:
    param, lines = read_net(path)
    upgrade.upgrade_net(param, lines, str(path), notify=lambda _: None)
    return param


def quiet(param, lines=None):
    return upgrade.upgrade_net(param, lines or [], None, notify=lambda _: None)


# -- golden pairs ---------------------------------------------------------------------------------
def test_golden_folders_hold_the_expected_files():
    if not NETS.exists():
        pytest.skip("../shared/acceptance is absent")
    assert len(_rel(V1_DIR)) == 23 and _rel(V1_DIR) == _rel(V2_DIR)
    assert len(_rel(SOLVER_DIR)) == 6


@pytest.mark.parametrize("rel", _rel(V1_DIR))
def test_v1_file_upgrades_to_caffes_own_v2_output(rel):
    ours = upgraded(V1_DIR / rel)
    caffes_raw, _ = read_net(V2_DIR / rel)
    assert not len(ours.layers) and len(ours.layer) > 0
    # e6c80dac predates the Input layer: its files keep net-level inputs, which we turn into a
    # leading Input layer; the layers after it must equal Caffe's output exactly.
    offset = 1 if len(caffes_raw.input) else 0
    assert list(ours.layer)[offset:] == list(caffes_raw.layer)
    assert ours.name == caffes_raw.name
    # and both files reach the same current-format message
    assert ours == upgraded(V2_DIR / rel)


@pytest.mark.parametrize("rel", _rel(SOLVER_DIR))
def test_legacy_solver_type_upgrades_to_bvlc_head(rel):
    legacy, _ = read_text_proto(SOLVER_DIR / rel, caffe_pb2.SolverParameter())
    modern, _ = read_text_proto(NETS / "bvlc_caffe" / rel, caffe_pb2.SolverParameter())
    assert legacy.HasField("solver_type") and not legacy.HasField("type")
    upgrade.upgrade_solver(legacy, rel, notify=lambda _: None)
    assert not legacy.HasField("solver_type")
    assert legacy == modern


def test_v0_lenet_upgrades_to_the_v1_lenet():
    if not V0_DIR.exists():
        pytest.skip("../shared/acceptance is absent")
    assert upgraded(V0_DIR / "examples/lenet/lenet.prototxt") == upgraded(
        V1_DIR / "examples/mnist/lenet.prototxt")


def test_v0_padding_layers_fold_into_the_next_conv():
    if not V0_DIR.exists():
        pytest.skip("../shared/acceptance is absent")
    path = V0_DIR / "examples/imagenet/imagenet_train.prototxt"
    param, lines = read_net(path)
    pads = [c.layer.name for c in param.layers if c.layer.type == "padding"]
    assert len(pads) == 4
    param, out_lines = quiet(param, lines)
    assert len(param.layer) == len(lines) - len(pads) == len(out_lines)
    assert all(layer.type != "padding" for layer in param.layer)
    by_name = {layer.name: layer for layer in param.layer}
    assert list(by_name["conv2"].convolution_param.pad) == [2]
    assert list(by_name["conv2"].bottom) == ["norm1"]
    assert list(by_name["conv3"].convolution_param.pad) == [1]
    data = by_name["data"]
    assert data.transform_param.crop_size == 227 and data.transform_param.mirror
    assert data.data_param.batch_size == 256 and not data.data_param.HasField("crop_size")
    # the layers match BVLC's V1 CaffeNet train_val except for sources and phase rules
    v1 = {layer.name: layer
          for layer in upgraded(V1_DIR / "models/bvlc_reference_caffenet/train_val.prototxt")
          .layer}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "norm2", "fc6", "drop7",
                 "fc8"):
        assert by_name[name] == v1[name], name
    # each layer keeps the line of its own 'layers' block
    kept = [line for c, line in zip(read_net(path)[0].layers, lines)
            if c.layer.type != "padding"]
    assert out_lines == kept


def test_v0_field_names_and_types_table():
    param = net_text("""
        layers { layer { name: "c" type: "conv" num_output: 8 kernelsize: 3 stride: 2 pad: 1
                         group: 2 biasterm: false blobs_lr: 1 blobs_lr: 2 weight_decay: 0 }
                 bottom: "x" top: "c" }
        layers { layer { name: "p" type: "pool" pool: AVE kernelsize: 2 stride: 2 }
                 bottom: "c" top: "p" }
        layers { layer { name: "l" type: "lrn" local_size: 3 alpha: 0.5 beta: 0.2 k: 2 }
                 bottom: "p" top: "l" }
        layers { layer { name: "d" type: "dropout" dropout_ratio: 0.3 } bottom: "l" top: "l" }
        layers { layer { name: "i" type: "images" source: "list.txt" batchsize: 4
                         new_height: 8 new_width: 9 shuffle_images: true cropsize: 5 scale: 2
                         mirror: true meanfile: "m" rand_skip: 3 } top: "img" top: "lab" }
        layers { layer { name: "w" type: "window_data" det_fg_threshold: 0.6
                         det_context_pad: 16 det_crop_mode: "square" } top: "w" }
        layers { layer { name: "cat" type: "concat" concat_dim: 0 }
                 bottom: "a" bottom: "b" top: "cat" }
        input: "x" input: "a" input: "b" """)
    param, _ = quiet(param)
    layers = {layer.name: layer for layer in param.layer}
    # inputs without shapes are dropped (Caffe's rule for old caffemodels)
    assert [layer.type for layer in param.layer] == [
        "Convolution", "Pooling", "LRN", "Dropout", "ImageData", "WindowData", "Concat"]
    conv = layers["c"]
    assert conv.convolution_param.num_output == 8 and not conv.convolution_param.bias_term
    assert list(conv.convolution_param.kernel_size) == [3]
    assert list(conv.convolution_param.stride) == [2] and list(conv.convolution_param.pad) == [1]
    assert conv.convolution_param.group == 2
    assert [(p.lr_mult, p.decay_mult, p.HasField("decay_mult")) for p in conv.param] == [
        (1, 0, True), (2, 1, False)]
    pool = layers["p"].pooling_param
    assert pool.pool == caffe_pb2.PoolingParameter.AVE and pool.kernel_size == 2
    lrn = layers["l"].lrn_param
    assert (lrn.local_size, lrn.k) == (3, 2) and abs(lrn.alpha - 0.5) < 1e-7
    assert abs(layers["d"].dropout_param.dropout_ratio - 0.3) < 1e-7
    img = layers["i"]
    assert (img.image_data_param.source, img.image_data_param.batch_size) == ("list.txt", 4)
    assert (img.image_data_param.new_height, img.image_data_param.new_width) == (8, 9)
    assert img.image_data_param.shuffle and img.image_data_param.rand_skip == 3
    assert (img.transform_param.crop_size, img.transform_param.scale) == (5, 2)
    assert img.transform_param.mirror and img.transform_param.mean_file == "m"
    win = layers["w"].window_data_param
    assert abs(win.fg_threshold - 0.6) < 1e-7 and win.context_pad == 16
    assert win.crop_mode == "square"
    assert layers["cat"].concat_param.concat_dim == 0


def test_v0_unknown_type_and_misplaced_padding_are_refused():
    with pytest.raises(NetEngineError, match="unknown V0 layer type 'convolution'"):
        quiet(net_text('layers { layer { name: "c" type: "convolution" } top: "c" }'))
    bad = net_text("""
        input: "x"
        layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "x" top: "xp" }
        layers { layer { name: "r" type: "relu" } bottom: "xp" top: "r" }""")
    with pytest.raises(NetEngineError, match="only conv and pool layers can absorb padding"):
        quiet(bad)


def test_v0_field_without_meaning_is_reported_in_the_notice():
    notes = []
    param = net_text('layers { layer { name: "r" type: "relu" num_output: 3 } bottom: "x" '
                     'top: "x" } input: "x" input_dim: 1 input_dim: 1 input_dim: 1 '
                     'input_dim: 1')
    upgrade.upgrade_net(param, [], "f.prototxt", notify=notes.append)
    assert len(notes) == 1 and "num_output" in notes[0] and "dropped" in notes[0]


# -- V1 -------------------------------------------------------------------------------------------
def test_v1_param_specs_sharing_and_every_param_message():
    param = net_text("""
        layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y"
                 blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
                 param: "w" param: "b" blob_share_mode: PERMISSIVE
                 inner_product_param { num_output: 3 }
                 include: { phase: TEST } loss_weight: 0.5 }
        layers { name: "loss" type: SOFTMAX_LOSS bottom: "y" bottom: "l" top: "loss"
                 loss_param { ignore_label: 2 } }
        layers { name: "t" type: TANH bottom: "y" top: "y" }
        layers { name: "a" type: ARGMAX bottom: "y" top: "am" argmax_param { top_k: 2 } }""")
    param, _ = quiet(param)
    ip, loss, tanh, argmax = param.layer
    assert ip.type == "InnerProduct" and ip.inner_product_param.num_output == 3
    assert [(p.name, p.lr_mult, p.decay_mult) for p in ip.param] == [("w", 1, 1), ("b", 2, 0)]
    assert ip.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert not ip.param[1].HasField("share_mode")
    assert ip.include[0].phase == caffe_pb2.TEST and list(ip.loss_weight) == [0.5]
    assert loss.type == "SoftmaxWithLoss" and loss.loss_param.ignore_label == 2
    assert tanh.type == "TanH" and argmax.type == "ArgMax" and argmax.argmax_param.top_k == 2


def test_every_v1_enum_has_a_v2_type():
    names = set(caffe_pb2.V1LayerParameter.LayerType.keys())
    assert names == set(upgrade.V1_LAYER_TYPES)
    from netengine.layers import layer_type_list

    known = set(layer_type_list())
    # the V1 types netengine does not implement are all data/IO types or Im2col
    missing = {t for t in upgrade.V1_LAYER_TYPES.values() if t and t not in known}
    assert missing <= {"Im2col", "ImageData", "WindowData", "HDF5Output", "HDF5Data",
                       "Deconvolution", "Eltwise", "Slice", "Concat", "InfogainLoss"}


def test_mixed_layer_and_layers_is_refused_in_one_line(tmp_path):
    path = tmp_path / "mixed.prototxt"
    path.write_text('name: "m"\ninput: "x"\ninput_shape { dim: 1 dim: 2 }\n'
                    'layer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n\n'
                    'layers { name: "b" type: RELU bottom: "y" top: "z" }\n')
    with pytest.raises(NetEngineError) as err:
        Net(str(path))
    text = str(err.value)
    assert "\n" not in text and "mixes" in text and "mixed.prototxt:6" in text
    assert "line 4" in text and "BVLC Caffe refuses" in text


def test_v1_data_layer_transform_fields_move_to_transform_param():
    param = net_text('layers { name: "d" type: DATA top: "d" data_param { source: "s" '
                     'scale: 0.5 mean_file: "m" crop_size: 3 mirror: true batch_size: 2 } }')
    param, _ = quiet(param)
    layer = param.layer[0]
    assert layer.type == "Data"
    assert (layer.transform_param.scale, layer.transform_param.mean_file) == (0.5, "m")
    assert (layer.transform_param.crop_size, layer.transform_param.mirror) == (3, True)
    for field in upgrade.TRANSFORM_FIELDS:
        assert not layer.data_param.HasField(field)
    assert layer.data_param.batch_size == 2


def test_v2_image_data_deprecated_fields_also_move():
    param = net_text('layer { name: "d" type: "ImageData" top: "d" top: "l" '
                     'image_data_param { source: "s" crop_size: 4 scale: 3 } '
                     'transform_param { scale: 0.5 } }')
    param, _ = quiet(param)
    assert param.layer[0].transform_param.crop_size == 4
    assert param.layer[0].transform_param.scale == 0.5  # the current field wins
    assert not param.layer[0].image_data_param.HasField("crop_size")
    assert not param.layer[0].image_data_param.HasField("scale")


# -- net input, BatchNorm -------------------------------------------------------------------------
def test_input_dim_and_input_shape_become_an_input_layer_in_front():
    param = net_text('input: "a" input: "b" input_dim: 1 input_dim: 2 input_dim: 3 '
                     'input_dim: 4 input_dim: 5 input_dim: 6 input_dim: 7 input_dim: 8 '
                     'layer { name: "r" type: "ReLU" bottom: "a" top: "r" }')
    param, lines = quiet(param, [7])
    assert lines == [None, 7]
    first = param.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["a", "b"])
    assert [list(s.dim) for s in first.input_param.shape] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert not param.input and not param.input_dim
    shaped = net_text('input: "a" input_shape { dim: 2 dim: 3 }')
    quiet(shaped)
    assert [list(s.dim) for s in shaped.layer[0].input_param.shape] == [[2, 3]]


def test_input_without_shape_is_dropped_and_bad_counts_refused():
    param = net_text('input: "a"')
    quiet(param)
    assert not param.layer and not param.input
    with pytest.raises(NetEngineError, match="4 values per input"):
        quiet(net_text('input: "a" input_dim: 1 input_dim: 2'))
    with pytest.raises(NetEngineError, match="once per input"):
        quiet(net_text('input: "a" input: "b" input: "c" input_shape { dim: 1 } '
                       'input_shape { dim: 2 }'))


def test_batch_norm_with_three_param_blocks_gets_zero_multipliers():
    param = net_text('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" '
                     'param { lr_mult: 1 } param { lr_mult: 1 decay_mult: 5 } param { } } '
                     'layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "x" '
                     'param { lr_mult: 1 } }')
    notes = []
    upgrade.upgrade_net(param, [], None, notify=notes.append)
    assert [(p.lr_mult, p.decay_mult) for p in param.layer[0].param] == [(0, 0)] * 3
    assert param.layer[1].param[0].lr_mult == 1  # only the 3-block form is upgraded
    assert len(notes) == 1 and "BatchNorm" in notes[0]
    notes.clear()
    upgrade.upgrade_net(param, [], None, notify=notes.append)  # now current: no notice
    assert notes == []


def test_cifar_bn_file_is_upgraded_on_load():
    path = NETS / "bvlc_caffe/examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt"
    if not path.exists():
        pytest.skip("../shared/acceptance is absent")
    param = upgraded(path)
    for layer in param.layer:
        if layer.type == "BatchNorm":
            assert len(layer.param) == 3
            assert all(p.lr_mult == 0 and p.decay_mult == 0 for p in layer.param)


# -- solvers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", sorted(upgrade.SOLVER_TYPES.items()))
def test_solver_type_enum_table(name, expected):
    param = caffe_pb2.SolverParameter(
        solver_type=caffe_pb2.SolverParameter.SolverType.Value(name))
    upgrade.upgrade_solver(param, notify=lambda _: None)
    assert param.type == expected and not param.HasField("solver_type")


def test_solver_with_both_type_fields_is_refused_and_inline_nets_upgraded():
    both = text_format.Parse('solver_type: ADAM type: "Adam"', caffe_pb2.SolverParameter())
    with pytest.raises(NetEngineError, match="both"):
        upgrade.upgrade_solver(both, notify=lambda _: None)
    inline = text_format.Parse('net_param { layers { name: "r" type: RELU bottom: "x" '
                               'top: "x" } }', caffe_pb2.SolverParameter())
    notes = []
    upgrade.upgrade_solver(inline, notify=notes.append)
    assert inline.net_param.layer[0].type == "ReLU" and len(notes) == 1
    current = caffe_pb2.SolverParameter(type="SGD")
    upgrade.upgrade_solver(current, notify=notes.append)
    assert len(notes) == 1  # nothing to do, nothing said


# -- loading, tools -------------------------------------------------------------------------------
V1_NET = """name: "v1"
input: "x"
input_dim: 2 input_dim: 3 input_dim: 1 input_dim: 1
layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y" blobs_lr: 1 blobs_lr: 2
         inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
layers { name: "relu" type: RELU bottom: "y" top: "y" }
"""


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_net_load_upgrades_with_one_log_line(tmp_path):
    path = tmp_path / "v1.prototxt"
    path.write_text(V1_NET)
    logger, handler = logging.getLogger("netengine"), _Records()
    logger.addHandler(handler)  # on the logger itself: tools may turn propagation off
    try:
        net = Net(str(path))
    finally:
        logger.removeHandler(handler)
    notices = [r for r in handler.records if "upgraded" in r.getMessage()]
    assert notices[0].levelno == logging.WARNING
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert str(path) in notices[0].getMessage() and "V1" in notices[0].getMessage()
    assert [layer.type for layer in net.layers] == ["Input", "InnerProduct", "ReLU"]
    assert net.layer_line("ip") == 4 and net.layer_line("relu") == 6
    assert net.params_lr == [1.0, 2.0]
    out = net.forward(x=np.ones((2, 3, 1, 1)))
    assert out["y"].shape == (2, 4)


def test_upgrade_net_tool_writes_current_text(tmp_path, capsys):
    src = tmp_path / "v1.prototxt"
    src.write_text(V1_NET)
    out = tmp_path / "v2.prototxt"
    assert upgrade_net_cli.main([str(src), str(out)]) == 0
    written = text_format.Parse(out.read_text(), caffe_pb2.NetParameter())
    assert not written.layers and not written.input
    assert [layer.type for layer in written.layer] == ["Input", "InnerProduct", "ReLU"]
    again = tmp_path / "v2b.prototxt"
    assert upgrade_net_cli.main([str(out), str(again)]) == 0
    assert "already up to date" in capsys.readouterr().err
    assert text_format.Parse(again.read_text(), caffe_pb2.NetParameter()) == written


def test_upgrade_net_tool_on_a_v1_caffemodel_keeps_the_weights(tmp_path):
    model = ACCEPTANCE / "weights/everpeace_caffe/examples/mnist/lenet_iter_10000.caffemodel"
    if not model.exists():
        pytest.skip("../shared/acceptance is absent")
    out = tmp_path / "lenet_v2.caffemodel"
    assert upgrade_net_cli.main([str(model), str(out)]) == 0
    old = read_binary_proto(model, caffe_pb2.NetParameter())
    new = read_binary_proto(out, caffe_pb2.NetParameter())
    assert len(old.layers) and not len(new.layers)
    old_blobs = {layer.name: list(layer.blobs) for layer in old.layers}
    for layer in new.layer:
        assert list(layer.blobs) == old_blobs[layer.name]
    assert {layer.type for layer in new.layer} >= {"Convolution", "InnerProduct", "Pooling"}


def test_upgrade_tools_refuse_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.prototxt"
    bad.write_text("layers { type: NOT_A_TYPE }")
    assert upgrade_net_cli.main([str(bad), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.prototxt:1" in err
    assert upgrade_solver_cli.main([str(tmp_path / "missing"), str(tmp_path / "o")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_upgrade_solver_tool(tmp_path):
    rel = "examples/mnist/lenet_solver_adam.prototxt"
    if not (SOLVER_DIR / rel).exists():
        pytest.skip("../shared/acceptance is absent")
    out = tmp_path / "solver.prototxt"
    assert upgrade_solver_cli.main([str(SOLVER_DIR / rel), str(out)]) == 0
    written = text_format.Parse(out.read_text(), caffe_pb2.SolverParameter())
    modern, _ = read_text_proto(NETS / "bvlc_caffe" / rel, caffe_pb2.SolverParameter())
    assert written == modern


def test_net_needs_upgrade():
    assert upgrade.net_needs_upgrade(net_text(V1_NET))
    assert not upgrade.net_needs_upgrade(net_text('layer { name: "a" type: "ReLU" }'))
