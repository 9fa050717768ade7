"""The umbrella ``netengine <command>``: --help lists every command, Caffe's command lines run
with only the program name changed, unknown commands and usage errors exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO
from test_cli import _solver

from netengine import backend
from netengine.cli import main as umbrella

ISSUE_COMMANDS = ["train", "test", "time", "device_query", "summarize", "draw_net", "parse_log",
                  "plot_log", "upgrade_net", "upgrade_solver", "convert_mnist", "get_mnist",
                  "export_onnx"]


@pytest.fixture(autouse=True)
def _cpu_mode():
    yield
    backend.set_mode_cpu()


def test_help_lists_each_command_on_one_line(capsys):
    assert umbrella.main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ISSUE_COMMANDS:
        rows = [line for line in lines if line.split()[:1] == [name]]
        assert len(rows) == 1 and len(rows[0].split()) > 2, name


@pytest.mark.parametrize("name", ISSUE_COMMANDS)
def test_each_command_has_help_under_its_umbrella_name(name, capsys):
    with pytest.raises(SystemExit) as info:
        umbrella.main([name, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: netengine {name}")


def test_unknown_command_suggests_and_exits_2(capsys):
    assert umbrella.main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err
    assert umbrella.main([]) == 2


def test_caffe_train_line_runs_with_the_program_name_changed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _solver(tmp_path)
    assert umbrella.main("train -solver solver.prototxt -max_iter 2".split()) == 0
    assert (tmp_path / "snaps" / "tiny_iter_2.caffemodel").exists()
    capsys.readouterr()
    line = "test -model tiny_net.prototxt -weights snaps/tiny_iter_2.caffemodel -iterations 2"
    assert umbrella.main(line.split()) == 0
    assert "Batch 1, loss = " in capsys.readouterr().err
    assert umbrella.main("time -model=tiny_net.prototxt -iterations=1".split()) == 0
    assert "Average Forward pass" in capsys.readouterr().err


def test_usage_error_is_2_and_file_error_is_1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        umbrella.main(["train"])
    assert info.value.code == 2
    assert umbrella.main(["train", "--solver", "missing.prototxt"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: file not found: missing.prototxt")


def test_device_query_without_a_gpu_is_one_line(capsys):
    if backend.cupy_available():
        pytest.skip("a GPU is present")
    assert umbrella.main(["device_query"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "CPU" in last


def test_python_dash_m_and_the_tools_wrapper():
    result = subprocess.run([sys.executable, "-m", "netengine", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "device_query" in result.stdout
    result = subprocess.run([sys.executable, str(REPO / "tools" / "device_query"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: device_query" in result.stdout


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'netengine = "netengine.cli.main:main"' in text


def test_summarize_layers_lists_every_type_once(capsys):
    from netengine.layers import layer_type_list

    assert umbrella.main(["summarize", "--layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == layer_type_list()
    assert all(len(line.split()) > 1 for line in lines)


FILE_ERRORS = ["summarize --model nope.prototxt", "draw_net nope.prototxt out.png",
               "parse_log nope.log .", "plot_log 0 out.png nope.log",
               "upgrade_net nope.prototxt out.prototxt",
               "upgrade_solver nope.prototxt out.prototxt", "convert_mnist nope1 nope2 db",
               "export_onnx --model nope.prototxt -o x.onnx",
               "test --model nope.prototxt --weights nope", "time --model nope.prototxt",
               "train --solver nope.prototxt"]


@pytest.mark.parametrize("line", FILE_ERRORS)
def test_file_errors_exit_1_with_one_line(line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert umbrella.main(line.split()) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nope" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ISSUE_COMMANDS)
def test_unknown_flag_is_a_usage_error(name, capsys):
    with pytest.raises(SystemExit) as info:
        umbrella.main([name, "--no-such-flag"])
    assert info.value.code == 2
    err = capsys.readouterr().err  # argparse names missing arguments first, where any
    assert f"netengine {name}: error: " in err and "Traceback" not in err
