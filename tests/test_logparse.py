"""parse_log / plot_log: Caffe's and netengine's training logs → CSV tables and charts."""
from __future__ import annotations

import io
import logging
import math
import sys

import pytest
from conftest import need_shared

from netengine.cli import parse_log, plot_log
from netengine.formats import caffe_log

CIFAR_LOG = ("acceptance", "weights", "everpeace_caffe", "examples", "cifar10", "train_log.txt")

SYNTHETIC = """\
Log file created at: 2023/12/31 23:59:00
I1231 23:59:58.000000 1 solver.cpp:60] Test net output #0: accuracy = 0.5
I1231 23:59:59.500000 1 solver.cpp:337] Solving TinyNet
I1231 23:59:59.500000 1 solver.cpp:347] Iteration 0, Testing net (#0)
I1231 23:59:59.750000 1 solver.cpp:414]     Test net output #0: accuracy = 0.1
I1231 23:59:59.750001 1 solver.cpp:414]     Test net output #1: loss = 2.3 (* 1 = 2.3 loss)
I1231 23:59:59.800000 1 solver.cpp:347] Iteration 0, Testing net (#1)
I1231 23:59:59.900000 1 solver.cpp:414]     Test net output #0: accuracy = 0.2
I0101 00:00:00.000000 1 solver.cpp:218] Iteration 0 (0 iter/s, 0.5s/10 iters), loss = 2.4
I0101 00:00:00.000001 1 solver.cpp:237]     Train net output #0: loss = 2.4 (* 1 = 2.4 loss)
I0101 00:00:00.000002 1 solver.cpp:237]     Train net output #1: acc = 0.05
I0101 00:00:00.000003 1 sgd_solver.cpp:105] Iteration 0, lr = 0.01
I0101 00:00:10.250000 1 solver.cpp:218] Iteration 10 (1 iter/s, 10s/10 iters), loss = nan
I0101 00:00:10.250001 1 solver.cpp:237]     Train net output #0: loss = nan (* 1 = nan loss)
I0101 00:00:10.250002 1 solver.cpp:237]     Train net output #1: acc = 1e-05
I0101 00:00:10.250003 1 sgd_solver.cpp:105] Iteration 10, lr = 0.001
I0101 00:00:20.000000 1 solver.cpp:447] Snapshotting to binary proto file tiny_iter_20.caffemodel
I0101 00:00:20.500000 1 solver.cpp:310] Iteration 20, loss = 0.9
I0101 00:00:20.500001 1 solver.cpp:330] Iteration 20, Testing net (#0)
I0101 00:00:21.000000 1 solver.cpp:414]     Test net output #0: accuracy = 0.9
I0101 00:00:21.000001 1 solver.cpp:414]     Test net output #1: loss = 0.25 (* 1 = 0.25 loss)
I0101 00:00:21.000002 1 solver.cpp:315] Optimization Done.
"""


@pytest.fixture
def synthetic_log(tmp_path):
    path = tmp_path / "tiny.log"
    path.write_text(SYNTHETIC)
    return path


def test_caffe_cifar10_log():
    tables = caffe_log.parse_log(need_shared(*CIFAR_LOG))
    assert len(tables.train) == 50 and len(tables.test) == 12
    assert caffe_log.LogTables.columns(tables.train) == ["NumIters", "Seconds", "LearningRate",
                                                        "loss"]
    assert caffe_log.LogTables.columns(tables.test) == ["NumIters", "Seconds", "LearningRate",
                                                       "accuracy", "loss"]
    # Solving at 00:37:55.565062; first test output at 00:38:01.829377
    assert tables.test[0] == {"NumIters": 0, "Seconds": 6.264315, "LearningRate": 0.001,
                              "accuracy": 0.0926, "loss": 2.30268}
    assert tables.train[1] == {"NumIters": 100, "Seconds": 26.843398, "LearningRate": 0.001,
                               "loss": 1.68744}
    # the log holds two runs (4000 iterations at 0.001, then resumed at 0.0001)
    at_4000 = [(r["LearningRate"], r["accuracy"]) for r in tables.test if r["NumIters"] == 4000]
    assert at_4000 == [(0.001, 0.6854), (0.0001, 0.6854)]
    assert [r["LearningRate"] for r in tables.train if r["NumIters"] in (3900, 4000)] == \
        [0.001, 0.0001]
    assert tables.test[-1]["NumIters"] == 5000 and tables.test[-1]["accuracy"] == 0.7491
    seconds = [r["Seconds"] for r in tables.train]
    assert seconds == sorted(seconds)


def test_synthetic_log_rules(synthetic_log):
    tables = caffe_log.parse_log(synthetic_log, end_year=2024)
    # the output before the first "Iteration" line is ignored; two test nets give two rows
    assert [(r["NumIters"], r.get("accuracy"), r.get("loss")) for r in tables.test] == [
        (0, 0.1, 2.3), (0, 0.2, None), (20, 0.9, 0.25)]
    assert [r["Seconds"] for r in tables.test] == [0.25, 0.4, 21.5]  # across the new year
    assert [r["LearningRate"] for r in tables.test] == [0.01, 0.01, 0.001]
    first, second = tables.train
    assert first == {"NumIters": 0, "Seconds": 0.500001, "LearningRate": 0.01, "loss": 2.4,
                     "acc": 0.05}
    assert second["LearningRate"] == 0.001 and second["acc"] == 1e-05
    assert math.isnan(second["loss"])


def _with_year(text: str) -> str:
    """SYNTHETIC as a newer glog writes it: the year inside the prefix (I20231231 ...)."""
    out = []
    for line in text.splitlines(keepends=True):
        if line[:1] in "IWEF" and line[1:5].isdigit() and line[5] == " ":
            year = "2023" if line[1:3] == "12" else "2024"
            line = line[0] + year + line[1:]
        out.append(line)
    return "".join(out)


def test_glog_prefix_with_the_year_gives_the_same_tables(tmp_path):
    """Seconds count from the Solving line with either prefix; the year in the prefix wins
    over the file's modification time (end_year is deliberately wrong here)."""
    path = tmp_path / "new_glog.log"
    path.write_text(_with_year(SYNTHETIC))
    assert "I20240101 00:00:21.000000" in path.read_text()
    old = caffe_log.parse_lines(SYNTHETIC.splitlines(), 2024)
    new = caffe_log.parse_log(path, end_year=1999)
    assert [r["Seconds"] for r in new.test] == [0.25, 0.4, 21.5]
    assert repr(new.train) == repr(old.train) and new.test == old.test  # nan != nan
    assert not any(math.isnan(r["Seconds"]) for r in new.train + new.test)


def test_parse_log_cli_reads_the_year_prefix(tmp_path, capsys):
    path = tmp_path / "new_glog.log"
    path.write_text(_with_year(SYNTHETIC))
    assert parse_log.main([str(path), str(tmp_path)]) == 0
    train = (tmp_path / "new_glog.log.train").read_text().splitlines()
    assert train[0].startswith("NumIters,Seconds,LearningRate")
    assert train[1].startswith("0,0.500001,0.01")
    assert "nan" not in train[1].split(",")[1]


def test_plot_log_charts_seconds_of_a_year_prefixed_log(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "new_glog.log"
    path.write_text(_with_year(SYNTHETIC))
    curves = caffe_log.plot_logs(1, tmp_path / "acc.png", [path])  # Test accuracy vs. Seconds
    assert curves == [(str(path), "accuracy")]
    assert (tmp_path / "acc.png").read_bytes().startswith(b"\x89PNG")


def test_netengine_glog_lines_parse():
    """Lines written through netengine's glog formatter are read like Caffe's."""
    from netengine import logging_glog

    stream = io.StringIO()
    logger = logging.getLogger("netengine.test_logparse")
    handler = logging_glog.GlogHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        where = logging_glog.at("solver.cpp:243")
        logger.info("Solving LeNet", extra=where)
        logger.info("Iteration 0, Testing net (#0)", extra=where)
        logger.info("    Test net output #0: accuracy = 0.1", extra=where)
        logger.info("Iteration 100 (50 iter/s, 2s/100 iters), loss = 0.3", extra=where)
        logger.info("    Train net output #0: loss = 0.3 (* 1 = 0.3 loss)", extra=where)
        logger.info("Iteration 100, lr = 0.01", extra=where)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0][0] == "I" and "solver.cpp:243] Solving LeNet" in lines[0]
    tables = caffe_log.parse_lines(lines)
    assert [(r["NumIters"], r["accuracy"]) for r in tables.test] == [(0, 0.1)]
    assert [(r["NumIters"], r["loss"], r["LearningRate"]) for r in tables.train] == \
        [(100, 0.3, 0.01)]
    assert all(0 <= r["Seconds"] < 60 for r in tables.train + tables.test)


def test_parse_log_cli_writes_csv(synthetic_log, tmp_path, capsys):
    out = tmp_path / "out"
    assert parse_log.main([str(synthetic_log), str(out), "--verbose"]) == 0
    train = (out / "tiny.log.train").read_text().splitlines()
    test = (out / "tiny.log.test").read_text().splitlines()
    assert train[0] == "NumIters,Seconds,LearningRate,loss,acc"
    assert train[2].startswith("10,") and train[2].endswith(",0.001,nan,1e-05")
    assert test[0] == "NumIters,Seconds,LearningRate,accuracy,loss"
    assert test[2].endswith(",0.2,")  # the second test net has no loss column
    assert "tiny.log.train: 2 rows" in capsys.readouterr().out
    rows = caffe_log.read_csv(out / "tiny.log.test")
    assert rows[2]["NumIters"] == 20 and rows[2]["loss"] == 0.25
    assert parse_log.main([str(synthetic_log), str(out), "--delimiter", "\t"]) == 0
    assert (out / "tiny.log.train").read_text().startswith("NumIters\tSeconds\tLearningRate")


def test_parse_log_cli_errors(tmp_path, capsys):
    assert parse_log.main([str(tmp_path / "nope.log"), str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("parse_log: error: log file not found") and "\n" not in err
    empty = tmp_path / "empty.log"
    empty.write_text("no iterations here\n")
    assert parse_log.main([str(empty), str(tmp_path)]) == 0
    assert (tmp_path / "empty.log.train").read_text() == "NumIters,Seconds,LearningRate\n"


def test_chart_titles_and_columns():
    assert [caffe_log.chart_title(k) for k in (0, 3, 4, 7)] == [
        "Test accuracy vs. Iters", "Test loss vs. Seconds", "Train learning rate vs. Iters",
        "Train loss vs. Seconds"]
    rows = [{"NumIters": 0, "loss1/loss1": 1.0, "loss3/top-1": 0.1, "accuracy": 0.2,
             "loss3/loss3": 2.0}]
    assert caffe_log.chart_columns(rows, "loss") == ["loss1/loss1", "loss3/loss3"]
    assert caffe_log.chart_columns(rows, "accuracy") == ["loss3/top-1", "accuracy"]


def test_plot_without_matplotlib_is_one_line(synthetic_log, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_log.main(["0", str(tmp_path / "x.png"), str(synthetic_log)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("plot_log: error: plotting needs matplotlib, which is not installed "
                   "(pip install matplotlib)")


@pytest.mark.parametrize("chart", range(8))
def test_plot_every_chart_type(chart, synthetic_log, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cifar = need_shared(*CIFAR_LOG)
    out = tmp_path / f"chart{chart}.png"
    assert plot_log.main([str(chart), str(out), str(cifar), str(synthetic_log)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert f"Wrote {out}" in capsys.readouterr().out


def test_plot_errors(synthetic_log, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    empty = tmp_path / "empty.log"
    empty.write_text("")
    assert plot_log.main(["0", str(tmp_path / "x.png"), str(empty)]) == 1
    assert "nothing to plot: no test 'accuracy' values" in capsys.readouterr().err
    assert plot_log.main(["0", str(tmp_path / "x.nosuchformat"), str(synthetic_log)]) == 1
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_log.main(["8", str(tmp_path / "x.png"), str(synthetic_log)])


def test_netengine_training_log_end_to_end(tmp_path):
    """A real netengine training run (step lr, tests every 5 iterations) parses like Caffe's."""
    from google.protobuf import text_format

    from netengine import logging_glog
    from netengine.proto import caffe_pb2
    from netengine.solvers import get_solver

    param = text_format.Parse("""
        base_lr: 0.1 lr_policy: "step" gamma: 0.1 stepsize: 5 max_iter: 10 display: 5
        test_iter: 2 test_interval: 5 snapshot_after_train: false random_seed: 3
        net_param {
          name: "tiny"
          layer { name: "data" type: "DummyData" top: "data" top: "label"
            dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
                               data_filler { type: "gaussian" } data_filler { value: 1 } } }
          layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
          layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
            include { phase: TEST } }
          layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
        }""", caffe_pb2.SolverParameter())
    stream = io.StringIO()
    logger = logging.getLogger(logging_glog.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logging_glog.install(stream=stream)
    try:
        get_solver(param).solve()
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    log = tmp_path / "train.log"
    log.write_text(stream.getvalue())
    train, test, tables = caffe_log.write_tables(log, tmp_path)
    assert [(r["NumIters"], r["LearningRate"]) for r in tables.train] == [(0, 0.1), (5, 0.01)]
    assert [r["NumIters"] for r in tables.test] == [0, 5, 10]
    assert caffe_log.LogTables.columns(tables.test) == ["NumIters", "Seconds", "LearningRate",
                                                       "accuracy", "loss"]
    assert train.read_text().startswith("NumIters,Seconds,LearningRate,loss\n0,")
    assert all(r["Seconds"] >= 0 for r in tables.train + tables.test)
