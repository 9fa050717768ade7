"""A seeded mutator over the shipped nets and solvers and over weights, solver states and data
files: every outcome must be success or the engine's own one-line error (NetEngineError); no
other exception, no signal, no hang. A sample also goes through the command line.

The seed is fixed, so a failure is reproducible: the message names the case (kind, file,
mutation) and the mutated file is kept in pytest's tmp_path.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from netengine import backend
from netengine.data.idx import gzip_bytes, idx_bytes, read_idx
from netengine.errors import NetEngineError
from netengine.formats import snapshot
from netengine.net import TEST, TRAIN, Net
from netengine.solvers import get_solver

SEED = 16
CASES = {"net": 120, "solver": 60, "weights": 60, "state": 40, "idx": 40, "hdf5": 30}
CASE_SECONDS = 10  # a case running longer counts as a hang
MEMORY_CAP = 256 << 20  # the guard's limit while fuzzing: a legal but huge net is refused fast

EXTREMES = ["0", "-1", "1", "0x7fffffff", "2147483648", "-2147483649", "1000000000", "1e9",
            "-1e9", "1e300", "nan", "inf", "-inf", "3.5", '""', '"."', '"/"', '"x"']
GARBAGE = ["{", "}", "}}", '"', "layer {", "#", ":", "\x00", "\u00e9", "::", "<", ";", "\\"]

TINY_NET = """name: "tiny"
layer { name: "x" type: "Input" top: "x" top: "y"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
"""
TINY_SOLVER = """net: "tiny.prototxt"
type: "Adam"
base_lr: 0.01
momentum: 0.9
momentum2: 0.999
lr_policy: "inv"
gamma: 0.0001
power: 0.75
max_iter: 2
display: 1
snapshot: 2
snapshot_prefix: "snap/tiny"
random_seed: 3
"""


# -- mutations --------------------------------------------------------------------------------------
def mutate_text(text: str, rng: random.Random) -> tuple[str, str]:
    """One to three edits a damaged or hostile prototxt might carry; returns (text, what)."""
    done = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["number", "number", "number", "delete", "duplicate", "garbage",
                           "truncate", "swap_lines"])
        if kind == "number":
            numbers = list(re.finditer(r'(?<=: )(-?[0-9][0-9.e+-]*|"[^"]*")', text))
            if numbers:
                match = rng.choice(numbers)
                value = rng.choice(EXTREMES)
                text = text[:match.start()] + value + text[match.end():]
                done.append(f"line {text.count(chr(10), 0, match.start()) + 1} -> {value}")
                continue
            kind = "delete"
        if not text:
            break
        start = rng.randrange(len(text))
        if kind == "delete":
            end = min(len(text), start + rng.randint(1, 80))
            text = text[:start] + text[end:]
        elif kind == "duplicate":
            end = min(len(text), start + rng.randint(1, 200))
            text = text[:end] + text[start:end] + text[end:]
        elif kind == "garbage":
            text = text[:start] + rng.choice(GARBAGE) + text[start:]
        elif kind == "truncate":
            text = text[:start]
        else:
            lines = text.splitlines()
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        done.append(f"{kind}@{start}")
    return text, ", ".join(done)


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Bit flips, truncation, inserted or zeroed spans, or a huge varint in the middle."""
    data = bytearray(data)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "zero", "varint"])
    start = rng.randrange(max(len(data), 1))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[start:]
    elif kind == "insert":
        data[start:start] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "zero":
        end = min(len(data), start + rng.randint(1, 64))
        data[start:end] = bytes(end - start)
    else:
        data[start:start] = b"\xff" * 9 + b"\x01"
    return bytes(data), f"{kind}@{start}"


# -- the harness ------------------------------------------------------------------------------------
class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang()


TALLY = {"success": 0, "engine error": 0}


def outcome(action: Callable[[], object]) -> str | None:
    """None for success or a NetEngineError; otherwise what went wrong."""
    timer = hasattr(signal, "setitimer")  # POSIX: a case running too long is a hang
    if timer:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        with np.errstate(all="ignore"):
            action()
        TALLY["success"] += 1
    except NetEngineError as err:
        TALLY["engine error"] += 1
        text = str(err)
        if "\n" in text or not text.strip():
            return f"NetEngineError not on one line: {text!r}"
    except Hang:
        return f"hang (over {CASE_SECONDS} s)"
    except Exception as err:  # noqa: BLE001 - the point of the test
        return f"{type(err).__name__}: {str(err)[:200]}"
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return None


@pytest.fixture
def capped_memory(monkeypatch):
    monkeypatch.setitem(backend._limits, "cpu", MEMORY_CAP)
    monkeypatch.setenv("NETENGINE_JIT", os.environ.get("NETENGINE_JIT", "0"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with the tiny net and solver, MNIST-shaped IDX data; the current directory."""
    (tmp_path / "tiny.prototxt").write_text(TINY_NET)
    (tmp_path / "tiny_solver.prototxt").write_text(TINY_SOLVER)
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    for stem, count in (("train", 64), ("t10k", 100)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        (data / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip_bytes(idx_bytes(images)))
        (data / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip_bytes(idx_bytes(labels)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def build_and_run(path: Path, phase: int) -> None:
    net = Net(str(path), phase)
    net.forward()
    if phase == TRAIN:
        net.backward()


def run_cases(kind: str, count: int, make: Callable[[random.Random, int], tuple[str, Callable]],
              rng: random.Random) -> list[str]:
    failures = []
    for i in range(count):
        what, action = make(rng, i)
        problem = outcome(action)
        if problem:
            failures.append(f"{kind} #{i} ({what}): {problem}")
    return failures


def test_fuzz_every_outcome_is_success_or_the_engines_error(workdir, capped_memory):
    rng = random.Random(SEED)
    nets = sorted(p for p in (REPO / "nets").glob("*.prototxt") if "solver" not in p.name)
    solvers = sorted((REPO / "nets").glob("*solver.prototxt")) + [workdir / "tiny_solver.prototxt"]
    failures: list[str] = []

    def net_case(rng, i):
        source = rng.choice(nets)
        text, what = mutate_text(source.read_text(), rng)
        path = workdir / f"net{i}.prototxt"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        phase = TRAIN if "train" in source.name and rng.random() < 0.5 else TEST
        return f"{source.name}: {what}", lambda: build_and_run(path, phase)

    def solver_case(rng, i):
        source = rng.choice(solvers)
        text = source.read_text()
        if source.parent != workdir:  # the shipped solvers, on the tiny net (fast)
            text = re.sub(r'net: "[^"]*"', 'net: "tiny.prototxt"', text)
            text = re.sub(r"max_iter: \d+", "max_iter: 2", text)
            text = re.sub(r"test_iter: \d+\n", "", text)
            text = re.sub(r"test_interval: \d+\n", "", text)
            text = re.sub(r'snapshot_prefix: "[^"]*"', 'snapshot_prefix: "snap/s"', text)
        text, what = mutate_text(text, rng)
        path = workdir / f"solver{i}.prototxt"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")

        def action():
            solver = get_solver(str(path))
            if solver.param.max_iter <= 3:
                solver.solve()
        return f"{source.name}: {what}", action

    weights_net = workdir / "lenet.prototxt"
    weights_net.write_text((REPO / "nets" / "mnist_deploy.prototxt").read_text()
                           .replace("dim: 64", "dim: 2"))
    lenet = Net(str(weights_net), TEST)
    weights_bytes = lenet.to_proto().SerializeToString()

    def weights_case(rng, i):
        data, what = mutate_bytes(weights_bytes, rng)
        path = workdir / f"w{i}.caffemodel"
        path.write_bytes(data)

        def action():
            Net(str(weights_net), TEST, weights=str(path)).forward()
        return what, action

    tiny = get_solver(str(workdir / "tiny_solver.prototxt"))
    tiny.step(1)
    model, state_path = tiny.snapshot()
    state_bytes = Path(state_path).read_bytes()

    def state_case(rng, i):
        data, what = mutate_bytes(state_bytes, rng)
        path = workdir / "snap" / f"s{i}.solverstate"
        path.write_bytes(data)
        return what, lambda: tiny.restore(str(path))

    idx_gz = (workdir / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    idx_raw = idx_bytes(np.zeros((3, 4, 4), np.uint8))

    def idx_case(rng, i):
        data, what = mutate_bytes(idx_gz if i % 2 else idx_raw, rng)
        path = workdir / (f"d{i}-idx3-ubyte" + (".gz" if i % 2 else ""))
        path.write_bytes(data)
        return what, lambda: read_idx(path)

    failures += run_cases("net", CASES["net"], net_case, rng)
    failures += run_cases("solver", CASES["solver"], solver_case, rng)
    failures += run_cases("weights", CASES["weights"], weights_case, rng)
    failures += run_cases("state", CASES["state"], state_case, rng)
    failures += run_cases("idx", CASES["idx"], idx_case, rng)
    try:
        import h5py  # noqa: F401
    except ImportError:
        h5py = None
    if h5py is not None:
        lenet.save(str(workdir / "lenet.caffemodel.h5"))
        h5_weights = (workdir / "lenet.caffemodel.h5").read_bytes()
        state_h5 = workdir / "snap" / "h.solverstate.h5"
        snapshot.write_state_hdf5(state_h5, snapshot.read_state(state_path))
        h5_state = state_h5.read_bytes()

        def hdf5_case(rng, i):
            data, what = mutate_bytes(h5_weights if i % 2 else h5_state, rng)
            path = workdir / "snap" / f"h{i}.{'caffemodel' if i % 2 else 'solverstate'}.h5"
            path.write_bytes(data)
            if i % 2:
                return what, lambda: Net(str(weights_net), TEST, weights=str(path))
            return what, lambda: tiny.restore(str(path))

        failures += run_cases("hdf5", CASES["hdf5"], hdf5_case, rng)
    assert not failures, f"{len(failures)} case(s) ended otherwise:\n" + "\n".join(failures)
    # the mutations both break files and leave some usable: the harness sees both outcomes
    assert TALLY["success"] > 20 and TALLY["engine error"] > 100, TALLY


def test_fuzz_sample_through_the_command_line(tmp_path):
    """A few mutated nets through tools/test: exit 0 or 1, at most one error line, never a
    traceback or a signal."""
    rng = random.Random(SEED + 1)
    source = (REPO / "nets" / "mnist_deploy.prototxt").read_text().replace("dim: 64", "dim: 2")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NETENGINE_DEBUG", None)
    script = ("import sys\nfrom netengine.cli import time as t\n"
              "sys.exit(t.main(sys.argv[1:]))\n")
    for i in range(4):
        text, what = mutate_text(source, rng)
        path = tmp_path / f"cli{i}.prototxt"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        result = subprocess.run([sys.executable, "-c", script, "--model", str(path),
                                 "--iterations", "1"], env=env, capture_output=True, text=True,
                                timeout=120)
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert result.returncode in (0, 1), (what, result.returncode, result.stderr[-800:])
        assert "Traceback" not in result.stderr, (what, result.stderr[-800:])
        assert len(errors) == (result.returncode == 1), (what, errors)
