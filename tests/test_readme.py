"""The README runs as written: every ```python block, from the repository's layout, after the
quick start's main job has written snapshots/lenet_iter_10000.caffemodel; every command the
issue names is listed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from netengine.cli.main import COMMANDS

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
MAIN_SNAPSHOT = REPO / "snapshots" / "lenet_iter_10000.caffemodel"
STAND_IN_ITERATIONS = 60


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder laid out like the repository root (nets/ and data/ linked) that holds the main
    job's snapshot: the real one where quick-start step 1 has run, else the weights of a short
    run of the same solver (the same net, so the same blobs) under the same name."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("nets", "data"):
        (work / name).symlink_to(REPO / name)
    snapshots = work / "snapshots"
    if MAIN_SNAPSHOT.exists():
        snapshots.mkdir()
        shutil.copy(MAIN_SNAPSHOT, snapshots / MAIN_SNAPSHOT.name)
        return work, True
    result = subprocess.run(
        [sys.executable, "-m", "netengine", "train", "--solver", "nets/mnist_solver.prototxt",
         "--max_iter", str(STAND_IN_ITERATIONS)],
        cwd=work, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    made = snapshots / f"lenet_iter_{STAND_IN_ITERATIONS}.caffemodel"
    made.rename(snapshots / MAIN_SNAPSHOT.name)
    return work, False


def test_readme_has_python_blocks():
    assert BLOCKS and any("snapshots/lenet_iter_10000.caffemodel" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, workdir):
    work, real = workdir
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=work, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    found = re.search(r"accuracy on 64 test digits: (\S+)", result.stdout)
    if found and real:  # the trained weights of the main job: LeNet's ~0.98
        assert float(found.group(1)) >= 0.95, result.stdout
    loss = re.search(r"loss after 100 iterations: (\S+)", result.stdout)
    if loss:
        assert 0 < float(loss.group(1)) < 2.3  # a loss that went down from ln(10) = 2.30


def test_readme_lists_every_command():
    commands = README[README.index("## Commands"):README.index("## Using it from Python")]
    for name in COMMANDS:
        if name != "gen_layer_docs":  # a developer tool, not for users
            assert f"`netengine {name}" in commands or f"/ `netengine {name}" in commands, name


def test_quick_start_commands_name_files_that_exist():
    shell = "\n".join(re.findall(r"^```sh\n(.*?)^```", README, re.S | re.M))
    assert "netengine train --solver nets/mnist_solver.prototxt" in shell
    assert (REPO / "nets" / "mnist_solver.prototxt").exists()
    for path in re.findall(r"\b(nets/\S+\.prototxt)", README):
        assert (REPO / path).exists(), path
