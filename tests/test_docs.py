"""docs/layers.md is generated from the registry and the schema, and must be up to date."""
from __future__ import annotations

import difflib

import pytest

from netengine import docgen
from netengine.cli import gen_layer_docs
from netengine.layers import REGISTRY
from netengine.layers.base import Layer


@pytest.fixture(scope="module")
def generated() -> str:
    return docgen.generate()


def test_layers_md_is_up_to_date(generated):
    path = docgen.DOC_PATH
    assert path.exists(), f"{path} is missing; create it with: {docgen.REGENERATE}"
    current = path.read_text(encoding="utf-8")
    if current != generated:
        diff = list(difflib.unified_diff(current.splitlines(), generated.splitlines(),
                                         "docs/layers.md", "generated", n=0, lineterm=""))
        shown = "\n".join(diff[2:14])
        pytest.fail(f"docs/layers.md is out of date (a layer, its docstring or proto/caffe.proto "
                    f"changed); regenerate it with: {docgen.REGENERATE}\nfirst differences:\n"
                    f"{shown}", pytrace=False)


def test_every_registered_type_has_a_section(generated):
    shipped = docgen.shipped_types()
    assert "ReLU" in shipped and "Convolution" in shipped
    for name in shipped:
        assert f"\n## {name}\n" in generated
        assert f"| [{name}](#{name.lower()}) |" in generated
    assert generated.count("\n## ") == len(shipped) + 3  # + common, shared, forks


def test_types_registered_outside_the_package_are_not_documented(monkeypatch):
    class TestOnly(Layer):
        type = "DocgenTestOnlyLayer"

    monkeypatch.setitem(REGISTRY, TestOnly.type, TestOnly)
    assert "DocgenTestOnlyLayer" not in docgen.shipped_types()
    assert "DocgenTestOnlyLayer" not in docgen.generate()


def test_counts_params_defaults_and_comments(generated):
    relu = REGISTRY["ReLU"]
    assert docgen.counts(relu, "bottom") == "exactly 1"
    assert docgen.layer_params("SoftmaxWithLoss", REGISTRY["SoftmaxWithLoss"])[:2] == [
        "softmax_param", "loss_param"]
    assert docgen.layer_params("Deconvolution", REGISTRY["Deconvolution"]) == [
        "convolution_param"]
    assert "| `negative_slope` | float | `0` |" in generated
    assert "| `group` | uint32 | `1` |" in generated
    assert "| `kernel_size` | repeated uint32 | — |" in generated
    assert "| `num_output` | uint32 | unset (`0`) |" in generated
    # enum values, their schema comments, shared messages
    assert "`BATCH_SIZE`: The batch size." in generated
    assert "### FillerParameter" in generated and "### ParamSpec" in generated
    assert "| `sparse` | int32 | `-1` | Gaussian only" in generated
    # docstrings carry the formulas
    assert (REGISTRY["ReLU"].__doc__.strip().splitlines()[0]) in generated
    assert "| BN | caffe-segnet |" in generated


def test_proto_comments_parser(tmp_path):
    proto = tmp_path / "x.proto"
    proto.write_text("""
// -----
message A {
  // Above a.
  // Second line.
  optional int32 a = 1 [default = 2];  // trailing
  optional int32 b = 2;

  enum E {
    // first value
    X = 0;
    Y = 1;  // second
  }
  message Inner {
    repeated float c = 1;  // inner c
  }
}
""")
    comments = docgen.proto_comments(proto)
    assert comments == {("A", "a"): "Above a. Second line. trailing",
                        ("A.E", "X"): "first value", ("A.E", "Y"): "second",
                        ("A.Inner", "c"): "inner c"}
    assert docgen.proto_comments(tmp_path / "missing.proto") == {}


def test_cli_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "layers.md"
    assert gen_layer_docs.main(["--check", "--out", str(out)]) == 1
    assert "out of date; run python tools/gen_layer_docs" in capsys.readouterr().err
    assert gen_layer_docs.main(["--out", str(out)]) == 0
    assert f"({len(docgen.shipped_types())} layer types)" in capsys.readouterr().out
    assert gen_layer_docs.main(["--check", "--out", str(out)]) == 0


def test_regenerate_command_in_the_message_works():
    import subprocess
    import sys

    command = docgen.REGENERATE.split()
    assert command[:2] == ["python", "tools/gen_layer_docs"]
    done = subprocess.run([sys.executable, command[1], "--check", "--out", "/dev/null"],
                          cwd=docgen.REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "out of date" in done.stderr
