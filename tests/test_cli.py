"""tools/train, tools/test, tools/time: --help, a tiny training run through main(argv), scoring
and timing a tiny model, glog-format logs Caffe's parse_log reads, one-line errors."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_solver import write_tiny

from netengine import backend
from netengine.cli import test as test_cli
from netengine.cli import time as time_cli
from netengine.cli import train as train_cli

GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")
TOOLS = {"train": train_cli, "test": test_cli, "time": time_cli}


@pytest.fixture(autouse=True)
def _cpu_mode():
    yield
    backend.set_mode_cpu()


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        TOOLS[name].main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name}")
    for flag in {"train": ["--solver", "--weights", "--snapshot", "--gpu", "--level", "--stage",
                           "--sigint_effect", "--sighup_effect"],
                 "test": ["--model", "--weights", "--iterations", "--gpu"],
                 "time": ["--model", "--iterations", "--gpu"]}[name]:
        assert flag in out


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tool_wrappers_run(name):
    result = subprocess.run([sys.executable, str(REPO / "tools" / name), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def _solver(tmp_path: Path, extra: str = "") -> Path:
    write_tiny(tmp_path)
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "tiny_net.prototxt"\ntest_iter: 2\ntest_interval: 4\nbase_lr: 0.1\n'
                    'momentum: 0.9\nlr_policy: "inv"\ngamma: 0.01\npower: 0.75\ndisplay: 2\n'
                    'max_iter: 8\nsnapshot: 4\nsnapshot_prefix: "snaps/tiny"\nrandom_seed: 3\n'
                    + extra)
    return path


def _parse_like_caffe(log: str) -> tuple[list, list]:
    """What Caffe's tools/extra/parse_log.py extracts: iteration, lr and outputs per line,
    skipping nothing that carries the glog prefix."""
    iteration, train, test, lr = -1, [], [], None
    for line in log.splitlines():
        found = re.search(r"Iteration (\d+)", line)
        if found:
            iteration = int(found.group(1))
        if iteration == -1:
            continue
        parts = line.strip().split()
        int(parts[0][1:3]), int(parts[0][3:5])  # month, day: parse_log's datetime fields
        stamp = parts[1]
        [int(x) for x in stamp[:stamp.rfind(".")].split(":")]
        found = re.search(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)", line)
        if found:
            lr = float(found.group(1))
        found = re.search(r"Train net output #(\d+): (\S+) = ([.\deE+-]+)", line)
        if found:
            train.append((iteration, found.group(2), float(found.group(3)), lr))
        found = re.search(r"Test net output #(\d+): (\S+) = ([.\deE+-]+)", line)
        if found:
            test.append((iteration, found.group(2), float(found.group(3))))
    return train, test


def test_train_run_through_main(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _solver(tmp_path)
    assert train_cli.main(["--solver", "solver.prototxt"]) == 0
    log = capsys.readouterr().err
    lines = [line for line in log.splitlines() if line]
    assert all(GLOG.match(line) for line in lines), [x for x in lines if not GLOG.match(x)][:3]
    for phrase in ("Solving tiny", "Learning Rate Policy: inv", "Iteration 0, Testing net (#0)",
                   "    Test net output #0: loss = ", "Iteration 2 (", " iter/s, ",
                   "s/2 iters), loss = ", "    Train net output #0: loss = ",
                   "Iteration 2, lr = ", "Snapshotting to binary proto file snaps/tiny_iter_4"
                   ".caffemodel", "Snapshotting solver state to binary proto file "
                   "snaps/tiny_iter_8.solverstate", "Optimization Done."):
        assert phrase in log, phrase
    train, test = _parse_like_caffe(log)
    assert [row[0] for row in train] == [0, 2, 4, 6]  # at 8 only "Iteration 8, loss = L"
    assert "Iteration 8, loss = " in log
    # as in Caffe, "lr = " follows the outputs, so a row carries the previous display's lr
    assert train[2][3] == pytest.approx(0.1 * (1 + 0.01 * 2) ** -0.75, rel=1e-5)
    assert [row[0] for row in test] == [0, 4, 8]
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == [
        "tiny_iter_4.caffemodel", "tiny_iter_4.solverstate", "tiny_iter_8.caffemodel",
        "tiny_iter_8.solverstate"]
    # resume from the first snapshot and fine-tune from the weights
    assert train_cli.main(["--solver", "solver.prototxt", "--snapshot",
                           "snaps/tiny_iter_4.solverstate", "--max_iter", "6"]) == 0
    log = capsys.readouterr().err
    assert "Restoring previous solver status from snaps/tiny_iter_4.solverstate" in log
    assert "Resuming from snaps/tiny_iter_4.solverstate" in log
    assert "Iteration 4, Testing net (#0)" in log and (tmp_path / "snaps/tiny_iter_6.caffemodel"
                                                       ).exists()
    assert train_cli.main(["--solver", "solver.prototxt", "--weights",
                           "snaps/tiny_iter_4.caffemodel", "--max_iter", "1"]) == 0
    assert "Finetuning from snaps/tiny_iter_4.caffemodel" in capsys.readouterr().err


def test_train_stage_and_level_reach_the_train_net(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _solver(tmp_path)
    net = tmp_path / "tiny_net.prototxt"
    net.write_text(net.read_text() + 'layer { name: "gate" type: "Silence" bottom: "loss" '
                   'include { stage: "extra" min_level: 2 } }\n')
    assert train_cli.main(["--solver", str(path), "--stage", "extra", "--level", "2",
                           "--max_iter", "0"]) == 0
    assert "Solving tiny" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--solver", "missing.prototxt"], "error: file not found: missing.prototxt"),
    (["--solver", "solver.prototxt", "--gpu", "0,1"], "error: --gpu 0,1: "),
    (["--solver", "solver.prototxt", "--snapshot", "nope.solverstate"],
     "error: solver state not found: nope.solverstate"),
])
def test_train_errors_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _solver(tmp_path)
    assert train_cli.main(argv) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(message), err
    assert "Traceback" not in err


@pytest.mark.parametrize("tool,argv,message", [
    ("train", [], "train: error: need a solver definition to train: give --solver"),
    ("train", ["--solver", "s", "--weights", "a.caffemodel", "--snapshot", "b.solverstate"],
     "train: error: give a snapshot to resume training"),
    ("train", ["--solver", "s", "--gpu", "0,x"], "train: error: --gpu takes device ids separated"),
    ("test", ["--model", "m", "--weights", "w", "--gpu", "0,1"], "test: error: --gpu takes one"),
    ("train", ["--solver", "s", "--max_iter", "-5"], "train: error: --max_iter must be >= 0, got -5"),
    ("test", ["--model", "m", "--weights", "w", "--gpu", "x"], "test: error: --gpu takes one"),
    ("test", ["--model", "m.prototxt"], "test: error: need model weights to score: give --weights"),
    ("test", ["--weights", "w"], "test: error: need a model definition to score: give --model"),
    ("time", [], "time: error: need a model definition to time: give --model"),
    ("time", ["--model", "m", "--iterations", "0"], "time: error: --iterations must be >= 1"),
])
def test_usage_errors_exit_2(tool, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        TOOLS[tool].main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)


def test_both_spellings_of_multi_word_flags():
    args = train_cli.parse_args(["--solver", "s", "--max-iter", "3", "-sigint-effect=none",
                                 "--sighup_effect", "stop"])
    assert (args.max_iter, args.sigint_effect, args.sighup_effect) == (3, "none", "stop")
    from netengine.cli import summarize
    args = summarize.parse_args(["-model", "m", "--input_shape", "data=1,2", "--show_splits"])
    assert (args.model, args.input_shape, args.show_splits) == ("m", ["data=1,2"], True)


def test_gpu_help_of_test_and_time_does_not_mention_a_solver(capsys):
    for tool in ("test", "time"):
        with pytest.raises(SystemExit):
            TOOLS[tool].main(["--help"])
        assert "solver" not in capsys.readouterr().out.lower()


def test_caffe_spelling_of_flags_and_repeated_stages():
    args = train_cli.parse_args(["-solver", "s.prototxt", "-max_iter=3", "--stage", "a,b",
                                 "-stage", "c", "--level", "-1"])
    assert (args.solver, args.max_iter, args.level) == ("s.prototxt", 3, -1)
    assert train_cli.stages(args.stage) == ["a", "b", "c"]
    args = test_cli.parse_args(["-model", "m", "-weights", "w", "-iterations", "2"])
    assert (args.model, args.weights, args.iterations) == ("m", "w", 2)
    with pytest.raises(SystemExit):
        time_cli.parse_args(["-nosuchflag", "1"])


def test_gpu_flag_without_a_gpu(tmp_path, monkeypatch, capsys):
    if backend.cupy_available():
        pytest.skip("a GPU is present")
    monkeypatch.chdir(tmp_path)
    _solver(tmp_path)
    assert train_cli.main(["--solver", "solver.prototxt", "--gpu", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: GPU mode") and "Traceback" not in "".join(err)


def test_solver_mode_gpu_falls_back_to_cpu(tmp_path, monkeypatch, capsys):
    if backend.cupy_available():
        pytest.skip("a GPU is present")
    monkeypatch.chdir(tmp_path)
    _solver(tmp_path, "solver_mode: GPU\n")
    assert train_cli.main(["--solver", "solver.prototxt", "--max_iter", "1"]) == 0
    err = capsys.readouterr().err
    assert "solver_mode: GPU, but CuPy or a CUDA GPU is not available: training on CPU" in err


def test_test_tool_reports_means(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _solver(tmp_path)
    assert train_cli.main(["--solver", "solver.prototxt", "--max_iter", "2"]) == 0
    capsys.readouterr()
    assert test_cli.main(["--model", "tiny_net.prototxt", "--weights",
                          "snaps/tiny_iter_2.caffemodel", "--iterations", "3"]) == 0
    log = capsys.readouterr().err
    assert "Running for 3 iterations." in log
    batches = re.findall(r"Batch (\d+), loss = (\S+)", log)
    assert [int(b) for b, _ in batches] == [0, 1, 2]
    mean = np.mean([float(v) for _, v in batches])
    found = re.search(r"\] loss = (\S+) \(\* 1 = (\S+) loss\)", log)
    assert found and float(found.group(1)) == pytest.approx(mean, rel=1e-5)
    assert re.search(r"\] Loss: \S+", log)


def test_time_tool_prints_layer_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_tiny(tmp_path)
    assert time_cli.main(["--model", "tiny_net.prototxt", "--iterations", "3"]) == 0
    log = capsys.readouterr().err
    assert len(re.findall(r"Iteration: \d+ forward-backward time: \S+ ms\.", log)) == 3
    for layer in ("x", "y", "ip", "loss"):
        assert re.search(rf"\] +{layer}\tforward: \S+ ms\.", log)
        assert re.search(rf"\] +{layer}\tbackward: \S+ ms\.", log)
    for phrase in ("Average Forward pass:", "Average Backward pass:",
                   "Average Forward-Backward:", "Total Time:", "*** Benchmark ends ***"):
        assert phrase in log
    assert time_cli.main(["--model", "nope.prototxt"]) == 1
    assert capsys.readouterr().err.strip().endswith("error: file not found: nope.prototxt")


def test_train_and_time_with_gpu_flag_on_fake_cupy(tmp_path, monkeypatch, capsys):
    """--gpu 0 runs the whole tool on the GPU path (tests/fake_cupy.py stands in for CuPy)."""
    fake_cupy = pytest.importorskip("fake_cupy").cupy
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake_cupy)
    monkeypatch.chdir(tmp_path)
    _solver(tmp_path)
    assert train_cli.main(["--solver", "solver.prototxt", "--gpu", "0", "--max_iter", "4"]) == 0
    log = capsys.readouterr().err
    assert "Use GPU with device ID 0" in log and "Optimization Done." in log
    assert time_cli.main(["--model", "tiny_net.prototxt", "--gpu", "0", "--iterations",
                          "2"]) == 0
    assert test_cli.main(["--model", "tiny_net.prototxt", "--gpu", "0", "--weights",
                          "snaps/tiny_iter_4.caffemodel", "--iterations", "2"]) == 0
    assert "Total Time:" in capsys.readouterr().err


def test_train_level_flag_always_replaces_the_solvers(tmp_path, monkeypatch, capsys):
    """caffe train sets train_state.level from --level (default 0) whatever the file says."""
    monkeypatch.chdir(tmp_path)
    path = _solver(tmp_path, "train_state { level: 2 }\n")
    net = tmp_path / "tiny_net.prototxt"  # a broken layer that only levels <= 1 include
    net.write_text(net.read_text() + 'layer { name: "low" type: "Silence" bottom: "nowhere" '
                   'include { phase: TRAIN max_level: 1 } }\n')
    assert train_cli.main(["--solver", str(path), "--max_iter", "0"]) == 1
    assert "layer 'low'" in capsys.readouterr().err  # level 0 from the flag, not 2
    assert train_cli.main(["--solver", str(path), "--max_iter", "0", "-level", "2"]) == 0


ONE_LINE_TOOLS = ["convert_mnist", "draw_net", "export_onnx", "gen_layer_docs", "get_mnist",
                  "parse_log", "plot_log", "summarize", "upgrade_net", "upgrade_solver"]


@pytest.mark.parametrize("tool", ONE_LINE_TOOLS)
def test_an_unforeseen_failure_in_any_tool_is_one_line(tool, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(f"netengine.cli.{tool}")

    def broken(*args, **kwargs):
        raise RuntimeError("a failure no check foresaw")

    # the first thing each main calls: its parse_args, or parse_caffe_args directly
    monkeypatch.setattr(module, "parse_args" if hasattr(module, "parse_args")
                        else "parse_caffe_args", broken)
    monkeypatch.delenv("NETENGINE_DEBUG", raising=False)
    assert module.main([]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: internal error: RuntimeError: "
                                                   "a failure no check foresaw"), err
    monkeypatch.setenv("NETENGINE_DEBUG", "1")
    assert module.main([]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("tool, args", [
    ("convert_mnist", ["none-images", "none-labels", "{tmp}/db"]),
    ("draw_net", ["none.prototxt", "{tmp}/net.png"]),
    ("export_onnx", ["--model", "none.prototxt", "-o", "{tmp}/net.onnx"]),
    ("parse_log", ["none.log", "{tmp}"]),
    ("plot_log", ["0", "{tmp}/chart.png", "none.log"]),
    ("summarize", ["--model", "none.prototxt"]),
    ("upgrade_net", ["none.prototxt", "{tmp}/new.prototxt"]),
    ("upgrade_solver", ["none.prototxt", "{tmp}/new.prototxt"]),
])
def test_every_tool_names_itself_then_error(tool, args, tmp_path, monkeypatch, capsys):
    """A missing input: one line, '<tool>: error: ...' naming the file, exit status 1."""
    import importlib

    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"netengine.cli.{tool}")
    assert module.main([a.format(tmp=tmp_path) for a in args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: ") and "none" in lines[0], \
        lines
