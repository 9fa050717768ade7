"""tools/view and netengine.html.net_view: the self-contained net viewer page (without a browser;
tests/test_html_browser.py opens the pages in Chromium)."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ACCEPTANCE, REPO

from netengine import summary
from netengine.cli import view as view_cli
from netengine.html import net_view

NETS = {"lenet": "nets/mnist_train_test.prototxt", "bn": "nets/mnist_bn_train_test.prototxt",
        "inception": "nets/mnist_inception_train_test.prototxt"}
GOOGLENET = ACCEPTANCE / "nets/bvlc_caffe/models/bvlc_googlenet/deploy.prototxt"
HAVE_DOT = shutil.which("dot") is not None


def build(key: str, phase: str = "TEST"):
    return summary.build(REPO / NETS[key], summary.PHASES[phase])


def boxes_in(page: str) -> dict[str, str]:
    """data-layer name → the text of its box (tags stripped), for either layout."""
    found = {}
    starts = [(m.start(), m.group(1), html.unescape(m.group(2)))
              for m in re.finditer(r'<(g|div) [^>]*data-layer="([^"]*)"', page)]
    for k, (start, tag, name) in enumerate(starts):
        if tag == "g":  # an SVG node group holds no other group
            end = page.index("</g>", start)
        else:  # a list box: up to the next box (or the end of the layout)
            end = starts[k + 1][0] if k + 1 < len(starts) else page.index("</main>")
        found[name] = html.unescape(re.sub(r"<[^>]+>", " ", page[start:end]))
    return found


def test_describe_hides_splits_and_resolves_edges_through_them():
    net = build("inception")
    view = net_view.describe(net)
    names = [box.name for box in view.boxes]
    assert not any(layer.type == "Split" for layer in net.layers if layer.name in names)
    assert any(layer.type == "Split" for layer in net.layers)  # there were splits to hide
    rows = {row.name: row for row in summary.summarize(net).rows}
    assert names == list(rows)
    by_name = {box.name: box for box in view.boxes}
    for box in view.boxes:
        assert box.params == rows[box.name].params and box.macs == rows[box.name].macs
        for source, blob in box.sources:  # every edge names a blob its source really writes
            assert blob in [t for t, _ in view.boxes[source].tops]
        assert not any("_split_" in b for b in box.bottoms)
    # the concat reads all its branches: one edge per bottom, none to a split
    concat = next(b for b in view.boxes if b.type == "Concat")
    assert len(concat.sources) == len(concat.bottoms) >= 2
    assert by_name[concat.name].tops[0][1].count("×") == 3
    assert view.total_params == summary.summarize(net).total_params


def test_inplace_layers_and_param_fields():
    view = net_view.describe(build("bn", "TRAIN"))
    by_name = {box.name: box for box in view.boxes}
    assert by_name["bn1"].inplace and by_name["relu_c1"].inplace
    assert not by_name["conv1"].inplace and not by_name["pool1"].inplace
    assert by_name["conv1"].tops == [("conv1", "64×20×24×24")]
    assert "convolution_param {" in by_name["conv1"].fields
    assert "num_output: 20" in by_name["conv1"].fields
    assert "batch_norm_param" not in by_name["relu_c1"].fields
    # the in-place chain is drawn as a chain: scale1 reads what bn1 wrote
    assert by_name["scale1"].sources == [(by_name["bn1"].index, "conv1")]


@pytest.mark.parametrize("use_dot", [pytest.param(True, marks=pytest.mark.skipif(
    not HAVE_DOT, reason="Graphviz dot is not installed")), False])
def test_page_has_every_layer_box_with_its_shapes(use_dot):
    net = build("lenet")
    page = net_view.build_page(net, use_dot=use_dot)
    boxes = boxes_in(page)
    rows = summary.summarize(net).rows
    assert sorted(boxes) == sorted(row.name for row in rows)
    for row in rows:
        assert row.type in boxes[row.name]
        for _, shape in row.tops:
            assert net_view.shape_text(shape) in boxes[row.name]
    assert "100×20×24×24" in boxes["conv1"]  # TEST batch 100
    assert ("<svg" in page) is use_dot and ('class="levels"' in page) is not use_dot
    data = json.loads(re.search(r'id="layer-data">(.*?)</script>', page, re.S).group(1))
    assert [d["name"] for d in data] == [row.name for row in rows]
    assert "431,080 (431K)" in page  # the header's parameter total


def test_without_dot_the_fallback_is_used(monkeypatch):
    monkeypatch.setattr(net_view.shutil, "which", lambda name: None)
    page = net_view.build_page(build("lenet"))
    assert 'class="levels"' in page and "<svg" not in page
    depth = {d: int(k) for k, d in re.findall(r'data-depth="(\d+)">.*?data-layer="(\w+)"', page)}
    assert depth["mnist"] == 0


def test_input_fields_are_drawn_as_the_input_layer_caffe_makes_of_them(tmp_path):
    fields = tmp_path / "fields.prototxt"
    fields.write_text('name: "f"\ninput: "data"\ninput_shape { dim: 2 dim: 3 dim: 8 dim: 8 }\n'
                      'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
                      '  convolution_param { num_output: 4 kernel_size: 3 } }\n')
    view = net_view.describe(summary.build(fields))
    assert [(b.name, b.type, b.tops) for b in view.boxes][0] == (
        "input", "Input", [("data", "2×3×8×8")])
    dot = net_view.to_dot(view)
    assert 'L0 -> L1 [label="data"];' in dot and "ellipse" not in dot


def test_page_is_self_contained():
    page = net_view.build_page(build("bn"), use_dot=HAVE_DOT)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//)""", page)
    assert "@import" not in page and "url(" not in page
    assert "<!DOCTYPE svg" not in page


def test_view_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "lenet.html"
    assert view_cli.main([NETS["lenet"], "--phase", "TRAIN", "-o", str(out)]) == 0
    assert "64×20×24×24" in boxes_in(out.read_text())["conv1"]
    assert f"to {out}" in capsys.readouterr().out


def test_view_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer { name: "act" type: "Relu" top: "a" }\n')
    assert view_cli.main([str(bad), "-o", str(tmp_path / "x.html")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and err[0].startswith("error: ") and f"{bad}:2" in err[0]
    assert "unknown layer type 'Relu'" in err[0] and not (tmp_path / "x.html").exists()
    data = ACCEPTANCE / "nets/bvlc_caffe/examples/mnist/lenet_train_test.prototxt"
    if data.exists():  # a missing data source: the hint names --input-shape
        assert view_cli.main([str(data), "-o", str(tmp_path / "y.html")]) == 1
        assert "--input-shape" in capsys.readouterr().err
        assert view_cli.main([str(data), "-o", str(tmp_path / "y.html"),
                              "--input-shape", "data=2,1,28,28", "--input-shape",
                              "label=2"]) == 0
        assert "2×20×24×24" in boxes_in((tmp_path / "y.html").read_text())["conv1"]


def test_googlenet_under_two_seconds(tmp_path, capsys):
    if not GOOGLENET.exists():
        pytest.skip(f"{GOOGLENET} is absent (shared material not available)")
    out = tmp_path / "googlenet.html"
    start = time.perf_counter()
    assert view_cli.main([str(GOOGLENET), "-o", str(out)]) == 0
    seconds = time.perf_counter() - start  # build, lay out and write (the interpreter is up)
    boxes = boxes_in(out.read_text())
    assert len(boxes) == len(summary.summarize(summary.build(GOOGLENET)).rows) > 140
    assert "10×1024×7×7" in boxes["inception_5b/output"]
    assert seconds < 2.0, seconds


def test_tool_wrapper_runs(tmp_path):
    out = tmp_path / "lenet.html"
    done = subprocess.run([sys.executable, str(REPO / "tools/view"),
                           str(REPO / NETS["lenet"]), "-o", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "conv1" in boxes_in(out.read_text())
