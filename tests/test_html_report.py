"""train --report, plot_log --html and netengine.html.run_report: the training report page
(without a browser; tests/test_html_browser.py opens it in Chromium)."""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import pytest
from conftest import ACCEPTANCE, REPO

from netengine import backend
from netengine.cli import plot_log as plot_log_cli
from netengine.cli import train as train_cli
from netengine.formats import caffe_log
from netengine.html import run_report, svg
from netengine.logging_glog import GlogFormatter

CIFAR_LOG = ACCEPTANCE / "weights/everpeace_caffe/examples/cifar10/train_log.txt"
TINY_MNIST = """name: "tiny_mnist"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 }
  data_param { source: "%(data)s/train-images-idx3-ubyte.gz" batch_size: 16 } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 }
  data_param { source: "%(data)s/t10k-images-idx3-ubyte.gz" batch_size: 16 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def tiny_mnist_solver(folder: Path, max_iter: int = 12) -> Path:
    """A one-layer MNIST classifier trained for a few iterations: outputs at every display
    (2) and test (4) step, a step learning rate that halves at 6."""
    (folder / "net.prototxt").write_text(TINY_MNIST % {"data": REPO / "data/mnist"})
    solver = folder / "solver.prototxt"  # paths relative to ``folder``: run it from there
    solver.write_text('net: "net.prototxt"\ntest_iter: 2\ntest_interval: 4\n'
                      'base_lr: 0.05\nmomentum: 0.9\nlr_policy: "step"\nstepsize: 6\n'
                      f'gamma: 0.5\ndisplay: 2\nmax_iter: {max_iter}\nrandom_seed: 5\n'
                      'snapshot_prefix: "snap"\n')
    return solver


@pytest.fixture(autouse=True)
def _cpu_mode():
    yield
    backend.set_mode_cpu()


def series(page: str) -> dict[str, dict[str, int]]:
    """data-series → {phase: number of points of its polyline}, read from the page's SVG."""
    found: dict[str, dict[str, int]] = {}
    for figure in re.findall(r'<figure class="chart" data-series="([^"]*)">(.*?)</figure>', page,
                             re.S):
        name, body = figure
        for phase, count, points in re.findall(
                r'<polyline class="\w+" data-phase="(\w+)" data-points="(\d+)" points="([^"]*)"',
                body):
            assert len(points.split()) == int(count)
            found.setdefault(name, {})[phase] = int(count)
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run with --report: (its log text, the report, the pages written)."""
    folder = tmp_path_factory.mktemp("report")
    solver = tiny_mnist_solver(folder)
    report = folder / "run.html"
    log_path = folder / "train.log"
    writes: list[str] = []
    original = run_report.write_atomic

    def recording(path, data):
        writes.append(data)
        original(path, data)

    budget = run_report.LiveReport.BUDGET
    run_report.LiveReport.BUDGET = math.inf  # no waiting: a page after every output here
    logger = logging.getLogger("netengine")
    with log_path.open("w") as stream:
        handler = logging.StreamHandler(stream)  # the glog lines, as a log file holds them
        handler.setFormatter(GlogFormatter())
        logger.addHandler(handler)
        run_report.write_atomic = recording
        cwd = os.getcwd()
        os.chdir(folder)  # the solver's paths are relative, as in Caffe's examples
        try:
            status = train_cli.main(["--solver", solver.name, "--report", str(report)])
        finally:
            os.chdir(cwd)
            run_report.write_atomic = original
            run_report.LiveReport.BUDGET = budget
            logger.removeHandler(handler)
    assert status == 0
    return log_path, report, writes


def test_report_has_a_series_per_output_with_the_logs_points(trained):
    log_path, report, _ = trained
    tables = caffe_log.parse_log(log_path)
    assert [r["NumIters"] for r in tables.train] == [0, 2, 4, 6, 8, 10]
    assert [r["NumIters"] for r in tables.test] == [0, 4, 8, 12]
    assert series(report.read_text()) == {
        "loss": {"train": 6, "test": 4}, "accuracy": {"test": 4}, "LearningRate": {"rate": 6}}


def test_report_refreshes_while_the_run_is_alive_then_stops(trained):
    log_path, report, writes = trained
    done = re.search(r"^I\d{4} [\d:.]+ +\d+ run_report\.py:\d+\] Report \S+run\.html: "
                     r"(\d+) refreshes, [\d.]+ s in all$", log_path.read_text(), re.M)
    assert done and int(done.group(1)) == len(writes)  # a glog line Caffe's tools can read
    reload = 'http-equiv="refresh"'
    # a first page at once, then one after each display (6) and test (4) step, and the last
    assert len(writes) >= 1 + 6 + 3
    assert all(reload in page for page in writes[:-1])
    assert reload not in writes[-1] and report.read_text() == writes[-1]
    assert "<b class=\"state finished\">finished</b>" in writes[-1]
    assert "running" in writes[1]
    growing = [sum(series(page).get("loss", {}).values()) for page in writes]
    assert growing == sorted(growing) and growing[0] == 0 and growing[-1] == 10


def test_a_long_run_pays_at_most_its_budget_for_the_page(tmp_path, monkeypatch):
    """3000 display steps, each 1 ms of (simulated) training, each page 10 ms: a page at most
    every 0.5 s (10 ms / 2%), each record read once; the last page has every point."""
    clock = [0.0]
    monkeypatch.setattr(run_report.time, "perf_counter", lambda: clock[0])

    def writing(path, data):  # the page costs 10 ms
        clock[0] += 0.010
        Path(path).write_text(data)

    monkeypatch.setattr(run_report, "write_atomic", writing)
    log = logging.getLogger("netengine.solver")
    with run_report.live_report(tmp_path / "r.html", "long") as report:
        for it in range(3000):
            log.info("Iteration %d (1000 iter/s, 0.001s/1 iters), loss = %.4f", it, 1 / (it + 1))
            log.info("    Train net output #0: loss = %.4f (* 1 = %.4f loss)", 1 / (it + 1),
                     1 / (it + 1))
            clock[0] += 0.001
            report.refresh()
        during, cost, elapsed = report.refreshes, report.seconds, clock[0]
    assert 6 <= during <= 8  # the first page, then one each 0.5 s of the 3 s run
    assert cost <= 0.02 * elapsed + 0.010  # 2%, and the first page
    drawn = series((tmp_path / "r.html").read_text())
    assert drawn["loss"]["train"] <= svg.MAX_POINTS < 3000


def test_report_shows_progress_speed_and_the_solver(trained):
    _, report, _ = trained
    page = report.read_text()
    assert "<h1>Training tiny_mnist</h1>" in page  # the net's name, from the "Solving" line
    assert "iteration: <b" in page and "12 of 12" in page
    speed = re.search(r"iterations/s: <b[^>]*>([\d.e+-]+)</b>", page)
    assert speed and float(speed.group(1)) > 0
    table = dict(re.findall(r"<tr><th>(\w+)</th><td><code>([^<]*)</code>", page))
    assert table["lr_policy"] == "step" and table["base_lr"] == "0.05"
    assert table["stepsize"] == "6" and table["max_iter"] == "12"
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//)""", page)


def test_plot_log_html_gives_the_same_series(trained, tmp_path, capsys):
    log_path, report, _ = trained
    out = tmp_path / "from_log.html"
    assert plot_log_cli.main([str(log_path), "--html", str(out)]) == 0
    assert "6 train and 4 test rows" in capsys.readouterr().out
    assert series(out.read_text()) == series(report.read_text())
    assert 'http-equiv="refresh"' not in out.read_text()


def test_plot_log_html_on_a_caffe_log(tmp_path):
    if not CIFAR_LOG.exists():
        pytest.skip(f"{CIFAR_LOG} is absent (shared material not available)")
    out = tmp_path / "cifar.html"
    assert plot_log_cli.main([str(CIFAR_LOG), "--html", str(out)]) == 0
    tables = caffe_log.parse_log(CIFAR_LOG)
    page = out.read_text()
    assert series(page) == {"loss": {"train": len(tables.train), "test": len(tables.test)},
                            "accuracy": {"test": len(tables.test)},
                            "LearningRate": {"rate": len(tables.train)}}
    assert len(tables.train) == 50  # Caffe's multi-line settings block, of the last run:
    assert "<th>lr_policy</th><td><code>fixed</code>" in page
    assert "<th>solver_mode</th><td><code>GPU</code>" in page


def test_plot_log_html_errors_are_one_line(tmp_path, capsys):
    assert plot_log_cli.main([str(tmp_path / "none.log"), "--html",
                              str(tmp_path / "x.html")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "log file not found" in err[0]


def test_solver_settings_in_both_spellings():
    caffe = ["I1105 00:37:55.414554 21 solver.cpp:32] Initializing solver from parameters: ",
             "test_iter: 100", "base_lr: 0.001", 'lr_policy: "fixed"', "solver_mode: GPU",
             "I1105 00:37:55.414772 21 solver.cpp:67] Creating training net"]
    ours = ["I1105 00:37:55.414554 21 solver.cpp:48] Initializing solver from parameters: "
            'test_iter: 100 base_lr: 0.001 lr_policy: "fixed" solver_mode: GPU']
    for lines in (caffe, ours):
        param = run_report.solver_settings(lines)
        assert param.base_lr == pytest.approx(0.001) and param.lr_policy == "fixed"
        assert list(param.test_iter) == [100] and param.solver_mode == param.GPU
    assert run_report.solver_settings(["I1105 00:37:55.4 1 x] Iteration 1, lr = 0.1"]) is None


def test_a_run_that_fails_ends_its_report(tmp_path):
    path = tmp_path / "r.html"
    log = logging.getLogger("netengine.solver")
    with pytest.raises(RuntimeError):
        with run_report.live_report(path, "failing") as report:
            log.info("    Train net output #0: loss = 2.5")
            report.refresh()
            assert 'http-equiv="refresh"' in path.read_text()
            raise RuntimeError("diverged")
    page = path.read_text()
    assert 'http-equiv="refresh"' not in page and ">ended</b>" in page


@pytest.mark.parametrize("low, high", [(0.3, 2.49), (0, 0), (0.0099, 0.01), (-3, 7),
                                       (1e-6, 3e-6), (0, 10000), (5, 5)])
def test_chart_ticks_cover_the_data(low, high):
    ticks = svg.nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and 2 <= len(ticks) <= 12
    assert ticks == sorted(ticks)


def test_thinning_keeps_the_order_and_every_spike():
    points = [(float(i), 1.0 / (i + 1)) for i in range(10000)]
    points[7777] = (7777.0, 50.0)  # a spike: a diverging step
    points[4321] = (4321.0, -3.0)
    thinned = svg.thin(points)
    assert len(thinned) <= svg.MAX_POINTS and thinned == sorted(thinned)
    assert (7777.0, 50.0) in thinned and (4321.0, -3.0) in thinned
    assert thinned[0] == points[0] and svg.thin(points[:50]) == points[:50]
