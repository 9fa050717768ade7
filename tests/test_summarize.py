"""tools/summarize and netengine.summary: per-layer shapes, parameters, multiply-adds, verdicts.

The tool's verdict on every acceptance file is asserted by tests/test_acceptance.py, which
builds each file through ``netengine.cli.summarize.run``; here: exact numbers on known nets,
the command line (in-process, and once as a real process through the tools/ wrapper).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ACCEPTANCE, REPO

from netengine import summary
from netengine.cli import summarize as cli
from netengine.errors import NetEngineError

NETS = ACCEPTANCE / "nets"
LENET = ACCEPTANCE / "weights/ahmdtaha_mnist_deploy/mnist_deploy.prototxt"
TINY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 group: 1 } }
layer { name: "gconv" type: "Convolution" bottom: "conv" top: "gconv"
        convolution_param { num_output: 6 kernel_size: 1 group: 2 bias_term: false } }
layer { name: "ip" type: "InnerProduct" bottom: "gconv" top: "ip" param { name: "w" }
        inner_product_param { num_output: 5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "gconv" top: "ip2" param { name: "w" }
        inner_product_param { num_output: 5 } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
"""


def need(path):
    if not path.exists():
        pytest.skip(f"{path} is absent (shared material not available)")
    return path


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(TINY)
    return path


def test_rows_params_and_macs_by_formula(tiny):
    table = summary.summarize(summary.build(tiny))
    rows = {row.name: row for row in table.rows}
    assert list(rows) == ["data", "conv", "gconv", "ip", "ip2", "relu"]
    conv, gconv, ip, ip2 = rows["conv"], rows["gconv"], rows["ip"], rows["ip2"]
    assert conv.tops == [("conv", (2, 4, 6, 6))] and conv.params == 4 * 3 * 9 + 4
    assert conv.macs == 2 * 4 * 6 * 6 * 3 * 9
    assert gconv.params == 6 * 2 and gconv.macs == 2 * 6 * 6 * 6 * 2  # C_in / group = 2
    assert ip.params == 5 * 216 + 5 and ip.macs == 2 * 5 * 216
    # ip2 shares ip's weight by name: counted once in the total
    assert ip2.shared_params == 5 * 216 and ip2.params == 5 * 216 + 5
    assert table.total_params == conv.params + gconv.params + ip.params + 5
    assert table.total_macs == conv.macs + gconv.macs + ip.macs + ip2.macs
    assert rows["relu"].macs == 0 and rows["relu"].tops == [("ip", (2, 5))]
    assert table.inputs == {"data": (2, 3, 8, 8)} and set(table.outputs) == {"ip", "ip2"}


def test_lenet_table_text():
    text = summary.format_table(summary.summarize(summary.build(need(LENET))))
    lines = text.splitlines()
    assert lines[0].startswith("net 'LeNet'") and "phase TEST" in lines[0]
    assert lines[1] == "inputs: data 1x1x28x28"
    conv1 = next(line for line in lines if line.startswith("conv1 "))
    assert conv1.split() == ["conv1", "Convolution", "1x20x24x24", "520", "288,000"]
    assert "relu1  ReLU          ip1: 1x500" in text  # in-place: the blob is named
    assert "parameters: 431,080 (431K); multiply-adds: 2,293,000 (2.29M)" in text
    assert lines[-1] == "outputs: loss"


@pytest.mark.parametrize("rel,params,macs_per_image", [
    ("bvlc_caffe/models/bvlc_alexnet/deploy.prototxt", 60_965_224, 724_406_816),
    ("bvlc_caffe/models/bvlc_googlenet/deploy.prototxt", 6_998_552, 1_582_671_872),
    ("forresti_squeezenet/SqueezeNet_v1.1/deploy.prototxt", 1_235_496, None),
])
def test_well_known_totals(rel, params, macs_per_image):
    net = summary.build(need(NETS / rel), input_shapes={"data": (1, 3, 227, 227)}
                        if "alexnet" in rel else {"data": (1, 3, 224, 224)})
    table = summary.summarize(net)
    assert table.total_params == params
    if macs_per_image:
        assert table.total_macs == macs_per_image


def test_resnet50_learnable_params_match_the_published_count():
    table = summary.summarize(summary.build(need(
        NETS / "kaiminghe_deep-residual-networks/prototxt/ResNet-50-deploy.prototxt")))
    batch_norm = sum(row.params for row in table.rows if row.type == "BatchNorm")
    # 25,557,032 (torchvision) + conv1's 64 biases; BatchNorm statistics are blobs too
    assert table.total_params - batch_norm == 25_557_096
    assert 3.85e9 < table.total_macs < 3.87e9
    assert not any(row.type == "Split" for row in table.rows)  # auto splits hidden
    shown = summary.summarize(summary.build(need(
        NETS / "kaiminghe_deep-residual-networks/prototxt/ResNet-50-deploy.prototxt")),
        show_splits=True)
    assert any(row.type == "Split" for row in shown.rows)


def test_parse_shape_spec():
    assert summary.parse_shape_spec("data=1,3,227,227") == ("data", (1, 3, 227, 227))
    assert summary.parse_shape_spec(" label = 4 ") == ("label", (4,))
    for bad in ("data", "data=", "=1,2", "data=a,b", "data=-1"):
        with pytest.raises(NetEngineError, match="NAME=D1,D2"):
            summary.parse_shape_spec(bad)


def test_human():
    assert [summary.human(n) for n in (12, 1234, 2_293_000, 7.2e9, 3e12)] == [
        "12", "1.23K", "2.29M", "7.2G", "3T"]


# -- command line ---------------------------------------------------------------------------------
def test_cli_builds_and_prints(tiny, capsys):
    assert cli.main(["--model", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "net 'tiny'" in out and "gconv" in out and "(shared)" in out


def test_cli_refuses_with_one_line(capsys):
    path = need(NETS / "shicai_densenet-caffe/DenseNet_121.prototxt")
    assert cli.main(["--model", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("summarize: error: ")
    assert "DenseNet_121.prototxt:54" in err and "pool1" in err and "ceil_mode" in err


def test_cli_stand_in_shapes_for_a_missing_data_source(capsys):
    path = need(NETS / "bvlc_caffe/examples/mnist/lenet_train_test.prototxt")
    assert cli.main(["--model", str(path)]) == 1
    err = capsys.readouterr().err
    assert "source not found" in err and "--input-shape NAME=N,C,H,W" in err
    assert cli.main(["--model", str(path), "--phase", "TRAIN",
                     "--input-shape", "data=64,1,28,28"]) == 0
    out = capsys.readouterr().out
    assert "phase TRAIN" in out and "64x20x24x24" in out and "label: 64" in out
    assert cli.main(["--model", str(path), "--input-shape", "data=1,1"]) == 1
    assert cli.main(["--model", str(path), "--input-shape", "nosuch=1,2"]) == 1
    assert "no data or input layer" in capsys.readouterr().err
    assert cli.main(["--model", str(path), "--input-shape", "data"]) == 2


def test_cli_stage(capsys):
    path = need(NETS / "bvlc_caffe/examples/mnist/mnist_autoencoder.prototxt")
    assert cli.main(["--model", str(path)]) == 1
    assert "unknown bottom blob 'data'" in capsys.readouterr().err  # TEST needs a stage
    assert cli.main(["--model", str(path), "--input-shape", "data=2,1,28,28"]) == 1
    assert "no data or input layer of this net produces" in capsys.readouterr().err
    assert cli.main(["--model", str(path), "--stage", "test-on-test",
                     "--input-shape", "data=2,1,28,28"]) == 0
    for stages in (["--stage", "test-on-test,other"], ["--stage", "other", "--stage",
                                                        "test-on-test"]):
        assert cli.main(["--model", str(path), *stages, "--input-shape", "data=2,1,28,28"]) == 0


def test_cli_run_verdict_object(tiny):
    ok = cli.run(tiny)
    assert ok.status == 0 and ok.net is not None and ok.error is None
    bad = cli.run(tiny.parent / "absent.prototxt")
    assert bad.status == 1 and "file not found" in bad.text and bad.net is None


def test_tools_wrapper_runs_as_a_program(tiny):
    done = subprocess.run([sys.executable, str(REPO / "tools/summarize"), "--model", str(tiny)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "multiply-adds" in done.stdout
    missing = subprocess.run([sys.executable, str(REPO / "tools/summarize"), "--model",
                              str(tiny.parent / "nope.prototxt")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr


def test_build_skips_filling_weights_but_checks_fillers(tmp_path):
    path = tmp_path / "g.prototxt"
    path.write_text(TINY.replace("num_output: 4 kernel_size: 3",
                                 'num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" }'))
    net = summary.build(path)
    assert not net.params["conv"][0].data.any()  # shapes only: nothing drawn
    from netengine.net import Net

    assert Net(str(path)).params["conv"][0].data.any()  # a real build still fills
    path.write_text(TINY.replace("num_output: 4 kernel_size: 3",
                                 'num_output: 4 kernel_size: 3 weight_filler { type: "gausian" }'))
    with pytest.raises(NetEngineError, match="unknown filler type 'gausian'"):
        summary.build(path)
    path.write_text(TINY.replace("inner_product_param { num_output: 5 }",
                                 'inner_product_param { num_output: 5 weight_filler '
                                 '{ type: "bilinear" } }', 1))
    with pytest.raises(NetEngineError, match="bilinear filler needs a 4-D blob"):
        summary.build(path)  # a filler's shape check still runs


def test_recurrent_multiply_adds(tmp_path):
    path = tmp_path / "seq.prototxt"
    path.write_text('layer { name: "in" type: "Input" top: "x" top: "c" top: "s" input_param { '
                    'shape { dim: 5 dim: 2 dim: 4 } shape { dim: 5 dim: 2 } shape { dim: 2 '
                    'dim: 3 } } }\n'
                    'layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "c" bottom: "s" '
                    'top: "h" recurrent_param { num_output: 6 } }\n'
                    'layer { name: "rnn" type: "RNN" bottom: "x" bottom: "c" top: "o" '
                    'recurrent_param { num_output: 6 } }\n')
    rows = {row.name: row for row in summary.summarize(summary.build(path)).rows}
    # T·N = 10 steps × (W_xc 24x4 + W_hc 24x6) + N = 2 × W_xc_static 24x3
    assert rows["lstm"].macs == 10 * (96 + 144) + 2 * 72
    assert rows["rnn"].macs == 10 * (6 * 4 + 6 * 6 + 6 * 6)  # W_xh, W_hh, W_ho
