"""Parse errors that point at the fix: an unclosed block names the line where it opened, a
misspelt or misplaced field gets a suggestion, the solver file gets the same help."""
from __future__ import annotations

import pytest
from conftest import REPO

from netengine.errors import NetEngineError
from netengine.formats.prototxt import open_blocks
from netengine.net import TEST, Net
from netengine.solvers import read_solver_param

DEPLOY = (REPO / "nets" / "mnist_deploy.prototxt").read_text()


def _error(tmp_path, text: str, load=lambda p: Net(p, TEST)) -> str:
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    with pytest.raises(NetEngineError) as info:
        load(str(path))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _layer_lines(text: str) -> list[int]:
    return [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith("layer {")]


def test_last_closing_brace_missing_names_where_the_block_opened(tmp_path):
    lines = DEPLOY.rstrip("\n").splitlines()
    assert lines[-1] == "}"
    message = _error(tmp_path, "\n".join(lines[:-1]) + "\n")
    opened = _layer_lines(DEPLOY)[-1]
    assert message == (f"{tmp_path / 'net.prototxt'}:{opened}: 'layer {{' opened here is never "
                       "closed (a '}' is missing before the end of the file)")


def test_middle_closing_brace_missing_names_that_layer(tmp_path):
    lines = DEPLOY.splitlines()
    starts = _layer_lines(DEPLOY)
    close = starts[2] - 2  # 0-based index of the line before layer 3: the '}' of layer 2
    while lines[close].strip() != "}":
        close -= 1
    message = _error(tmp_path, "\n".join(lines[:close] + lines[close + 1:]) + "\n")
    assert f"net.prototxt:{starts[1]}: 'layer {{' opened here is never closed" in message
    assert f"before line {starts[2] - 1}" in message


def test_misspelt_field_suggests_the_nearest_field(tmp_path):
    message = _error(tmp_path, DEPLOY.replace("num_output", "num_ouput", 1))
    assert "ConvolutionParameter has no field 'num_ouput'" in message
    assert message.endswith("did you mean 'num_output'?")
    assert "layer 'conv1' (Convolution)" in message


def test_misplaced_field_names_the_message_that_holds_it(tmp_path):
    text = 'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" num_output: 3 }\n'
    message = _error(tmp_path, text)
    assert "LayerParameter has no field 'num_output'" in message
    assert "did you mean convolution_param { num_output }" in message
    assert "inner_product_param { num_output }" in message


def test_solver_field_typo_suggests_too(tmp_path):
    text = 'net: "n.prototxt"\nbase_lr: 0.01\nmax_itr: 100\n'
    message = _error(tmp_path, text, load=read_solver_param)
    assert "SolverParameter has no field 'max_itr'" in message
    assert "did you mean 'max_iter'?" in message


def test_nonsense_field_gets_no_guess(tmp_path):
    message = _error(tmp_path, 'layer { name: "a" zzqqxx: 1 }\n')
    assert "has no field 'zzqqxx'" in message and "did you mean" not in message


def test_open_blocks_skips_strings_and_comments():
    text = 'layer {\n  name: "{"  # }\n  param {\n    lr_mult: 1\n  }\n'
    assert open_blocks(text) == [("layer", 1)]
    assert open_blocks(text, text.index("lr_mult")) == [("layer", 1), ("param", 3)]


def test_unknown_enum_value_lists_the_values(tmp_path):
    text = DEPLOY.replace("pool: MAX", "pool: MAXX", 1)
    message = _error(tmp_path, text)
    assert "PoolingParameter.PoolMethod has no value 'MAXX'; did you mean 'MAX'?" in message
    assert message.endswith("the values are MAX, AVE, STOCHASTIC")


def test_one_closing_brace_too_many(tmp_path):
    lines = DEPLOY.splitlines()
    at = _layer_lines(DEPLOY)[1] - 1  # insert a stray '}' before the second layer
    message = _error(tmp_path, "\n".join(lines[:at] + ["}"] + lines[at:]) + "\n")
    assert f"net.prototxt:{at + 1}:1: this '}}' closes no block" in message


def test_protobufs_copy_of_the_line_is_dropped(tmp_path):
    message = _error(tmp_path, DEPLOY.replace("num_output: 20", "num_output: twenty", 1))
    assert message.endswith("layer 'conv1' (Convolution): Couldn't parse integer: twenty")
