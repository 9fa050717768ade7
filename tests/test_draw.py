"""draw_net: DOT text with Caffe's colours, shapes and labels; rendering through Graphviz dot."""
from __future__ import annotations

import shutil

import pytest
from conftest import ACCEPTANCE, need_shared
from google.protobuf import text_format

from netengine import draw
from netengine.cli import draw_net
from netengine.proto import caffe_pb2

NETS = ACCEPTANCE / "nets"
LENET = "bvlc_caffe/examples/mnist/lenet_train_test.prototxt"
GOOGLENET = "bvlc_caffe/models/bvlc_googlenet/deploy.prototxt"
RESNET50 = "kaiminghe_deep-residual-networks/prototxt/ResNet-50-deploy.prototxt"
HAVE_DOT = shutil.which("dot") is not None
need_dot = pytest.mark.skipif(not HAVE_DOT, reason="Graphviz 'dot' is not installed")

SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 4 kernel_h: 3 kernel_w: 1 pad: 1 stride: 2 group: 2 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 7 bias_term: false } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip"
        include { phase: TRAIN } }
layer { name: "a|b" type: "Concat" bottom: "ip" bottom: "pool" top: "cat{1}" }
"""


def _small() -> caffe_pb2.NetParameter:
    return text_format.Parse(SMALL, caffe_pb2.NetParameter())


def _node_line(dot: str, node: str) -> str:
    return next(line for line in dot.splitlines() if line.strip().startswith(f'"{node}" ['))


def test_dot_nodes_colours_and_edge_labels():
    dot = draw.net_to_dot(_small())
    assert dot.startswith('digraph "small" {') and "rankdir=LR;" in dot
    conv = _node_line(dot, "conv_Convolution")
    assert 'fillcolor="#FF5050"' in conv and "shape=record" in conv
    assert r"conv\n(Convolution)\nkernel size: 3x1\nstride: 2\npad: 1\ngroup: 2" in conv
    assert 'fillcolor="#FF9900"' in _node_line(dot, "pool_Pooling")
    assert r"(Pooling AVE)\nkernel size: global" in _node_line(dot, "pool_Pooling")
    assert 'fillcolor="#CC33FF"' in _node_line(dot, "ip_InnerProduct")
    assert 'fillcolor="#6495ED"' in _node_line(dot, "data_Input")
    # in-place neuron layers are drawn in green; blobs are grey octagons
    assert 'fillcolor="#90EE90"' in _node_line(dot, "relu_ReLU")
    assert "shape=octagon" in _node_line(dot, "conv_blob")
    assert '"conv_Convolution" -> "conv_blob" [label="4"];' in dot
    assert '"ip_InnerProduct" -> "ip_blob" [label="7"];' in dot
    assert '"conv_blob" -> "relu_ReLU";' in dot and '"relu_ReLU" -> "conv_blob";' in dot
    # record separators in names are escaped, quotes in DOT ids are safe
    assert r'label="a\|b\n(Concat)"' in _node_line(dot, "a|b_Concat")
    assert r'label="cat{1}"' in _node_line(dot, "cat{1}_blob")


def test_rankdir_phase_and_lr_mults():
    net = _small()
    vertical = draw.net_to_dot(net, rankdir="TB", display_lrm=True)
    assert "rankdir=TB;" in vertical
    assert r'label="conv (Convolution) kernel size: 3x1 stride: 2 pad: 1 group: 2 lr mult: 1, 2"' \
        in vertical
    assert "lr mult: 1\"" in _node_line(vertical, "ip_InnerProduct")  # bias_term: false
    assert "drop_Dropout" in draw.net_to_dot(net, phase=caffe_pb2.TRAIN)
    assert "drop_Dropout" not in draw.net_to_dot(net, phase=caffe_pb2.TEST)
    with pytest.raises(draw.NetEngineError, match="rankdir must be one of"):
        draw.net_to_dot(net, rankdir="XY")


def test_lenet_phases_and_batch_labels():
    net = draw.read_net(need_shared("acceptance", "nets", LENET))
    train = draw.net_to_dot(net, phase=caffe_pb2.TRAIN)
    test = draw.net_to_dot(net, phase=caffe_pb2.TEST)
    assert '[label="Batch 64"]' in train and "Batch 100" not in train
    assert '[label="Batch 100"]' in test and "accuracy_Accuracy" in test
    assert "accuracy_Accuracy" not in train
    both = draw.net_to_dot(net)
    assert "Batch 64" in both and "Batch 100" in both


def test_legacy_v1_net_is_upgraded_before_drawing(tmp_path):
    path = need_shared("acceptance", "nets", "bvlc_caffe_v1format_pre_upgrade", "examples",
                       "mnist", "lenet_train_test.prototxt")
    assert draw_net.main([str(path), str(tmp_path / "v1.dot")]) == 0
    dot = (tmp_path / "v1.dot").read_text()
    assert '"conv1_Convolution"' in dot and 'fillcolor="#FF5050"' in dot


def test_cli_writes_dot_when_dot_program_is_missing(tmp_path, monkeypatch, capsys):
    path = need_shared("acceptance", "nets", LENET)
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    assert draw_net.main([str(path), str(tmp_path / "lenet.png")]) == 0
    assert not (tmp_path / "lenet.png").exists()
    assert (tmp_path / "lenet.dot").read_text().startswith('digraph "LeNet"')
    err = capsys.readouterr().err.strip()
    assert "dot' is not installed" in err and "lenet.dot" in err and len(err.splitlines()) == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert draw_net.main([str(tmp_path / "missing.prototxt"), str(tmp_path / "x.dot")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("draw_net: error: ") and "missing.prototxt" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        draw_net.main(["a", "b", "--rankdir", "XY"])
    capsys.readouterr()
    net = tmp_path / "n.prototxt"
    net.write_text('layer { name: "d" type: "Input" top: "d" }')
    (tmp_path / "out").mkdir()
    assert draw_net.main([str(net), str(tmp_path / "out")]) == 1  # a folder as the output
    err = capsys.readouterr().err.strip()
    assert err == f"draw_net: error: cannot write {tmp_path / 'out'}: Is a directory"


@need_dot
@pytest.mark.parametrize("net, suffix, options, must_contain", [
    (LENET, ".png", ["--phase", "TEST"], b"\x89PNG"),
    (LENET, ".svg", ["--rankdir", "TB", "--display_lrm"], b"conv1"),
    (GOOGLENET, ".svg", [], b"inception_5b/output"),
    (RESNET50, ".svg", ["--rankdir", "TB"], b"res5c_branch2c"),
])
def test_cli_renders_real_nets(tmp_path, capsys, net, suffix, options, must_contain):
    path = need_shared("acceptance", "nets", net)
    out = tmp_path / f"net{suffix}"
    assert draw_net.main([str(path), str(out), *options]) == 0
    data = out.read_bytes()
    assert len(data) > 10_000 and must_contain in data
    assert f"Drawing net to {out}" in capsys.readouterr().out


@need_dot
def test_dot_failure_is_reported(tmp_path):
    with pytest.raises(draw.NetEngineError, match="Graphviz dot failed"):
        draw.render("digraph { this is not dot", tmp_path / "bad.svg")


def test_pycaffe_draw_net_returns_bytes(monkeypatch):
    param = text_format.Parse('name: "n" layer { name: "d" type: "Input" top: "d" }',
                              caffe_pb2.NetParameter())
    assert draw.draw_net(param, "TB", ext="dot") == draw.net_to_dot(param, "TB").encode()
    if shutil.which("dot"):
        assert b"<svg" in draw.draw_net(param, ext="svg")
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    with pytest.raises(draw.NetEngineError, match="drawing as png needs Graphviz's dot"):
        draw.draw_net(param)


def test_tools_wrapper_runs(tmp_path):
    """tools/draw_net is a thin wrapper that runs from a source checkout."""
    import subprocess
    import sys

    from conftest import REPO

    net = tmp_path / "n.prototxt"
    net.write_text(SMALL)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "draw_net"), str(net),
                           str(tmp_path / "n.dot"), "--phase", "TEST"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "n.dot").read_text().startswith('digraph "small"')
