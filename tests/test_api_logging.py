"""The Python API logs like pycaffe: glog lines on stderr by default, GLOG_minloglevel and
netengine.set_log_level quiet it, and an application's own handler is left alone."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from netengine import logging_glog

GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ", re.M)
SCRIPT = """
import netengine as caffe, sys
if len(sys.argv) > 1:
    caffe.set_log_level(sys.argv[1])
net = caffe.Net("nets/mnist_deploy.prototxt", caffe.TEST)
import logging; logging.getLogger("netengine").warning("a warning line")
"""


def _run(env_level: str | None = None, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GLOG_minloglevel"}
    if env_level is not None:
        env["GLOG_minloglevel"] = env_level
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    return result.stderr


def test_net_setup_logs_glog_lines_on_stderr_by_default():
    err = _run()
    assert GLOG.search(err) and "Setting up conv1" in err and "Top shape:" in err
    lines = err.splitlines()
    assert all(GLOG.match(line) for line in lines[:-1]) and lines[-1].endswith("a warning line")


@pytest.mark.parametrize("how", [("1",), (None, "WARNING")])
def test_glog_minloglevel_and_set_log_level_keep_warnings_only(how):
    err = _run(*how)
    assert "Setting up conv1" not in err
    assert re.search(r"^W\d{4} .*\] a warning line$", err, re.M)


def test_level_two_is_errors_only():
    assert _run("2") == ""


def test_set_log_level_in_process():
    logger = logging.getLogger(logging_glog.LOGGER_NAME)
    before = logger.level
    try:
        logging_glog.set_log_level(2)
        assert logger.level == logging.ERROR
        logging_glog.set_log_level("info")
        assert logger.level == logging.INFO
        with pytest.raises(ValueError):
            logging_glog.set_log_level("loud")
    finally:
        logger.setLevel(before)


def test_an_application_handler_is_kept(monkeypatch):
    logger = logging.getLogger(logging_glog.LOGGER_NAME)
    mine = logging.NullHandler()
    monkeypatch.setattr(logger, "handlers", [mine])
    logging_glog.install_default()
    assert logger.handlers == [mine]
