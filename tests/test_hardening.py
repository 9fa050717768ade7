"""Damaged and hostile files: each cause of issue 16 gets the engine's own one-line error (or,
for LMDB, no signal), nothing crashes, nothing is silently accepted."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_solver import solver_text, tiny_solver

from netengine.blob import blob_proto
from netengine.cli import test as cli_test
from netengine.data.idx import gzip_bytes, idx_bytes, read_idx
from netengine.errors import LayerError, NetEngineError, SolverError
from netengine.formats import snapshot
from netengine.formats.prototxt import atomic_group, write_atomic
from netengine.net import TEST, TRAIN, Net
from netengine.proto import caffe_pb2

try:
    import h5py
except ImportError:
    h5py = None
try:
    import lmdb
except ImportError:
    lmdb = None

needs_h5py = pytest.mark.skipif(h5py is None, reason="h5py is not installed")
needs_lmdb = pytest.mark.skipif(lmdb is None, reason="lmdb is not installed")

IP_NET = """name: "ip"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
"""


def one_line(err: BaseException, *needles: str) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- data files -----------------------------------------------------------------------------------
LMDB_READER = textwrap.dedent("""
    import sys
    from netengine.data.db import LMDBSource
    from netengine.errors import NetEngineError
    try:
        print(len(LMDBSource(sys.argv[1])))
    except NetEngineError as err:
        print("error:", err, file=sys.stderr)
        sys.exit(1)
""")


@needs_lmdb
def test_truncated_lmdb_is_refused_before_mapping_never_sigbus(tmp_path):
    from netengine.data.db import array_to_datum, check_lmdb_file, lmdb_key, write_lmdb

    whole = tmp_path / "whole"
    images = np.arange(40 * 2 * 30 * 30, dtype=np.uint32).astype(np.uint8).reshape(40, 2, 30, 30)
    write_lmdb(whole, ((lmdb_key(i), array_to_datum(x, i % 10).SerializeToString())
                       for i, x in enumerate(images)))
    check_lmdb_file(whole)
    size = (whole / "data.mdb").stat().st_size
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for cut in (100, 8192 + 17, size // 2, size - 1):
        copy = tmp_path / f"cut{cut}"
        shutil.copytree(whole, copy)
        os.truncate(copy / "data.mdb", cut)
        result = subprocess.run([sys.executable, "-c", LMDB_READER, str(copy)], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, (cut, result.returncode, result.stderr)  # no signal
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(copy / "data.mdb") in lines[0], lines
        assert "LMDB" in lines[0]


@needs_lmdb
def test_truncated_lmdb_behind_a_data_layer_names_both_files(tmp_path):
    from netengine.data.db import array_to_datum, lmdb_key, write_lmdb

    images = np.zeros((20, 1, 28, 28), np.uint8)
    write_lmdb(tmp_path / "db", ((lmdb_key(i), array_to_datum(x, 1).SerializeToString())
                                 for i, x in enumerate(images)))
    os.truncate(tmp_path / "db" / "data.mdb", 9000)
    text = (f'layer {{ name: "d" type: "Data" top: "data" top: "label" data_param {{ '
            f'source: "{tmp_path / "db"}" backend: LMDB batch_size: 2 }} }}\n')
    with pytest.raises(LayerError) as err:  # checked before mapping: safe in-process
        Net(write(tmp_path / "lm.prototxt", text), TRAIN)
    one_line(err.value, f"lm.prototxt:1: layer 'd' (Data): {tmp_path / 'db' / 'data.mdb'}: "
             "truncated LMDB")


def test_damaged_gzip_idx_names_the_file(tmp_path):
    good = gzip_bytes(idx_bytes(np.arange(600, dtype=np.uint8).reshape(6, 10, 10)))
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF  # a zlib.error, not an OSError
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(NetEngineError) as err:
        read_idx(path)
    one_line(err.value, str(path), "corrupt gzip data")
    path.write_bytes(good[: len(good) // 2])  # truncated stream: EOFError
    with pytest.raises(NetEngineError, match="corrupt gzip data"):
        read_idx(path)


def test_idx_header_with_255_axes(tmp_path):
    path = tmp_path / "many-axes-idx"
    path.write_bytes(bytes([0, 0, 8, 255]) + b"\0\0\0\1" * 255 + b"\7")
    with pytest.raises(NetEngineError) as err:
        read_idx(path)
    one_line(err.value, str(path), "255 axes")


# -- nets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "# only a comment\n  # and another\n", 'name: "x"\n'])
def test_net_without_layers(tmp_path, text):
    with pytest.raises(NetEngineError) as err:
        Net(write(tmp_path / "empty.prototxt", text), TEST)
    one_line(err.value, "empty.prototxt", "no layers")


@pytest.mark.parametrize("layer", [
    'type: "BatchNorm"', 'type: "MVN"',
    'type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 2 }'])
def test_zero_batch_is_refused_at_setup_naming_the_layer(tmp_path, layer):
    text = ('layer { name: "in" type: "Input" top: "x" '
            'input_param { shape { dim: 0 dim: 3 dim: 4 dim: 4 } } }\n'
            f'layer {{ name: "l" {layer} bottom: "x" top: "y" }}\n')
    with pytest.raises(LayerError) as err:
        Net(write(tmp_path / "zero.prototxt", text), TRAIN)
    one_line(err.value, "zero.prototxt:1", "layer 'in' (Input)", "zero or negative")


LENET = (REPO / "nets" / "mnist_deploy.prototxt").read_text()


@pytest.mark.parametrize("old, new, needle", [
    ("dim: 64", "dim: 1000000000", "layer 'data' (Input)"),  # batch_size 1e9
    ("num_output: 20", "num_output: 0x7fffffff", "layer 'conv1' (Convolution)"),
    ("kernel_size: 5", "kernel_size: 0x7fffffff", "layer 'conv1' (Convolution)"),
    ("pool: MAX kernel_size: 2 stride: 2", "pool: MAX kernel_size: 2 stride: 1000000000",
     "layer 'pool1' (Pooling)"),
    ("pool: MAX kernel_size: 2 stride: 2",
     "pool: MAX kernel_size: 0x7fffffff stride: 0x7fffffff", "layer 'conv2'"),
])
def test_huge_sizes_are_refused_before_allocating(tmp_path, old, new, needle):
    assert old in LENET
    path = write(tmp_path / "huge.prototxt", LENET.replace(old, new, 1))
    with pytest.raises(NetEngineError) as err:
        Net(path, TEST)
    one_line(err.value, "huge.prototxt:", needle)


def test_data_layer_batch_size_1e9_is_refused_before_allocating(tmp_path):
    text = (REPO / "nets" / "mnist_train_test.prototxt").read_text()
    text = text.replace('source: "data/', f'source: "{REPO}/data/')
    text = text.replace("batch_size: 100", "batch_size: 1000000000")
    with pytest.raises(NetEngineError) as err:
        Net(write(tmp_path / "big.prototxt", text), TEST)
    one_line(err.value, "big.prototxt:", "layer 'mnist' (Data)", "blob shape (1000000000, 1, 28, 28)")


def test_memory_guard_refuses_before_allocating(monkeypatch):
    from netengine import backend
    from netengine.blob import Blob

    monkeypatch.setitem(backend._limits, "cpu", 1 << 20)  # 1 MiB of "memory"
    blob = Blob((10,))
    with pytest.raises(NetEngineError, match=r"blob shape \(1000, 1000\) \(1000000 values\)"):
        blob.reshape((1000, 1000))
    assert blob.shape == (10,) and blob.data.shape == (10,)  # left as it was
    blob.reshape((2, 5))  # within the storage it has: no check, no allocation
    monkeypatch.setitem(backend._limits, "cpu", 1 << 62)
    with pytest.raises(NetEngineError, match="blob shape"):
        Blob((2 ** 41,))  # above 2**40 elements whatever the memory


def test_pooling_kernel_wider_than_the_input_keeps_caffe_semantics(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 '
            'dim: 3 dim: 3 } } }\nlayer { name: "p" type: "Pooling" bottom: "x" top: "y" '
            'pooling_param { pool: AVE kernel_size: 0x7fffffff stride: 0x7fffffff } }\n')
    net = Net(write(tmp_path / "wide.prototxt", text), TEST)
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    y = net.forward(x=x)["y"]
    assert y.shape == (1, 1, 1, 1) and y[0, 0, 0, 0] == pytest.approx(x.sum() / 9)


@needs_h5py
def test_hdf5_data_with_zero_channels_and_external_links(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as handle:
        handle["data"] = np.zeros((4, 0), np.float32)
        handle["label"] = np.zeros(4, np.float32)
    (tmp_path / "list.txt").write_text(str(tmp_path / "d.h5") + "\n")
    text = (f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
            f'source: "{tmp_path / "list.txt"}" batch_size: 2 }} }}\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            'inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }\n')
    path = write(tmp_path / "h.prototxt", text)
    with pytest.raises(LayerError) as err:
        Net(path, TRAIN)
    one_line(err.value, "layer 'ip' (InnerProduct)", "xavier filler", "0 channels")
    with h5py.File(tmp_path / "d.h5", "w") as handle:
        handle["data"] = h5py.ExternalLink("/etc/hostname", "/")
        handle["label"] = np.zeros(4, np.float32)
    with pytest.raises(LayerError) as err:
        Net(path, TRAIN)
    one_line(err.value, f"h.prototxt:1: layer 'd' (HDF5Data): {tmp_path / 'd.h5'}: ",
             "external link")
    (tmp_path / "d.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(LayerError) as err:
        Net(path, TRAIN)
    one_line(err.value, str(tmp_path / "d.h5"), "cannot read HDF5 data file")


# -- weights --------------------------------------------------------------------------------------
def saved_ip(tmp_path) -> tuple[str, caffe_pb2.NetParameter]:
    net_path = write(tmp_path / "ip.prototxt", IP_NET)
    param = Net(net_path, TEST).to_proto()
    return net_path, param


def test_caffemodel_blob_with_negative_dims_or_wrong_count_names_the_file(tmp_path):
    net_path, param = saved_ip(tmp_path)
    weights = tmp_path / "bad.caffemodel"
    blob = param.layer[1].blobs[0]
    blob.shape.dim[0] = -2
    weights.write_bytes(param.SerializeToString())
    with pytest.raises(NetEngineError) as err:
        Net(net_path, TEST, weights=str(weights))
    one_line(err.value, str(weights), "layer 'ip'", "negative dimension")
    blob.shape.dim[0] = 2
    del blob.data[-1]
    weights.write_bytes(param.SerializeToString())
    with pytest.raises(NetEngineError) as err:
        Net(net_path, TEST, weights=str(weights))
    one_line(err.value, str(weights), "layer 'ip'", "5 values", "needs 6")


def test_named_layer_missing_some_blobs_is_refused_as_caffe_does(tmp_path):
    net_path, param = saved_ip(tmp_path)
    weights = tmp_path / "half.caffemodel"
    del param.layer[1].blobs[1]  # weights without the bias
    weights.write_bytes(param.SerializeToString())
    net = Net(net_path, TEST)
    with pytest.raises(LayerError) as err:
        net.copy_from(str(weights))
    one_line(err.value, str(weights), "layer 'ip'", "has 1, the net expects 2")
    del param.layer[1].blobs[:]  # a layer named, with no blobs at all
    weights.write_bytes(param.SerializeToString())
    with pytest.raises(LayerError, match="has 0, the net expects 2"):
        net.copy_from(str(weights))


def test_weights_for_no_layer_are_refused_for_scoring_and_logged_for_finetuning(
        tmp_path, capsys, caplog):
    net_path, param = saved_ip(tmp_path)
    foreign = caffe_pb2.NetParameter(name="other")
    other = foreign.layer.add(name="fc_other", type="InnerProduct")
    other.blobs.append(blob_proto(np.ones((2, 3), np.float32)))
    weights = tmp_path / "foreign.caffemodel"
    weights.write_bytes(foreign.SerializeToString())
    with pytest.raises(NetEngineError) as err:
        Net(net_path, TEST, weights=str(weights))
    one_line(err.value, str(weights), "'fc_other'", "'ip'")
    rc = cli_test.main(["--model", net_path, "--weights", str(weights), "--iterations", "1"])
    assert rc == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(weights) in lines[0] and "no layer" in lines[0]
    logger = logging.getLogger("netengine")  # the tool's glog handler stops propagation
    logger.addHandler(caplog.handler)
    try:
        net = Net(net_path, TEST)  # fine-tuning keeps Caffe's skip-by-name, with a warning
        assert net.copy_from(str(weights)) == ["fc_other"]
        assert "no layer of this net gets weights" in caplog.text
        good = tmp_path / "good.caffemodel"
        good.write_bytes(param.SerializeToString())
        caplog.clear()
        net.copy_from(str(good))
        assert "copied the weights of 1 layer(s): 'ip'" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)


@needs_h5py
@pytest.mark.parametrize("damage", ["renamed", "empty", "dataset", "layer_dataset", "external",
                                    "truncated"])
def test_damaged_hdf5_weights(tmp_path, damage):
    net_path, _ = saved_ip(tmp_path)
    path = tmp_path / "w.caffemodel.h5"
    Net(net_path, TEST).save(str(path))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:600])
    else:
        with h5py.File(path, "a") as handle:
            if damage == "renamed":
                handle["data"].move("ip", "ip_renamed")
            elif damage in ("empty", "dataset"):
                del handle["data"]
                if damage == "empty":
                    handle.create_group("data")
                else:
                    handle["data"] = np.zeros(3)
            elif damage == "layer_dataset":
                del handle["data/ip"]
                handle["data/ip"] = np.zeros(3)
            else:
                handle["data/ip/0"].attrs["x"] = 1
                del handle["data/ip/0"]
                handle["data/ip/0"] = h5py.ExternalLink("/etc/hostname", "/")
    with pytest.raises(NetEngineError) as err:
        Net(net_path, TEST, weights=str(path))
    one_line(err.value, str(path))


# -- solvers and solver states --------------------------------------------------------------------
@pytest.mark.parametrize("extra, needles", [
    ('lr_policy: "inv"\ngamma: 0.1\npower: -1e9\n', ("power >= 0",)),
    ('lr_policy: "poly"\npower: -2\n', ("power >= 0",)),
    ("base_lr: inf\n", ("base_lr must be a finite number",)),
])
def test_out_of_range_solver_values(tmp_path, extra, needles):
    text = solver_text("SGD").replace('lr_policy: "fixed"\n', "") + extra
    if "lr_policy" not in extra:
        text += 'lr_policy: "fixed"\n'
    with pytest.raises(SolverError) as err:
        tiny_solver(tmp_path, text)
    one_line(err.value, "solver.prototxt", *needles)


@pytest.mark.parametrize("field, value", [("momentum", 1), ("momentum2", 2),
                                          ("momentum", -0.5)])
def test_adam_moments_out_of_range(tmp_path, field, value):
    text = solver_text("Adam") + f"{field}: {value}\n"
    with pytest.raises(SolverError) as err:
        tiny_solver(tmp_path, text)
    one_line(err.value, "solver.prototxt", f"Adam needs {field} in [0, 1)")


def test_exp_rate_overflow_names_the_solver(tmp_path):
    text = solver_text("SGD").replace('lr_policy: "fixed"', 'lr_policy: "exp"') + "gamma: 1e30\n"
    solver, _ = tiny_solver(tmp_path, text)
    solver.iter = 1000
    with pytest.raises(SolverError) as err:
        solver.step(1)
    one_line(err.value, "solver.prototxt", "overflows at iteration 1000")


def test_nan_loss_names_the_solver(tmp_path):
    solver, feeder = tiny_solver(tmp_path, solver_text("SGD"))
    feeder.xs[...] = np.nan
    with pytest.raises(SolverError) as err:
        solver.step(1)
    one_line(err.value, "solver.prototxt", "not finite")


def test_long_snapshot_prefix_and_a_folder_as_net(tmp_path):
    with pytest.raises(SolverError) as err:
        tiny_solver(tmp_path, solver_text("SGD") + f'snapshot_prefix: "{"x" * 100000}"\n')
    one_line(err.value, "solver.prototxt", "snapshot_prefix")
    (tmp_path / "s.prototxt").write_text('net: "."\n' + solver_text("SGD"))
    from netengine.solvers import get_solver
    with pytest.raises(SolverError) as err:
        get_solver(str(tmp_path / "s.prototxt"))
    one_line(err.value, "s.prototxt", "net file '.' is a folder")


def snapshotted(tmp_path):
    solver, _ = tiny_solver(tmp_path, solver_text("SGD") +
                            f'snapshot_prefix: "{tmp_path / "snap" / "run"}"\n')
    solver.step(2)
    return solver, solver.snapshot()


def test_solver_state_with_bad_iter_or_empty_learned_net(tmp_path):
    solver, (model, state_path) = snapshotted(tmp_path)
    state = snapshot.read_state(state_path)
    for changes, needle in (({"iter": -5}, "must be >= 0"),
                            ({"learned_net": ""}, "names no weights file")):
        bad = snapshot.SolverStateData(**{**state.__dict__, **changes})
        path = tmp_path / "bad.solverstate"
        snapshot.write_state(path, bad)
        with pytest.raises(SolverError) as err:
            solver.restore(str(path))
        one_line(err.value, str(path), needle)
    os.unlink(model)
    with pytest.raises(SolverError) as err:
        solver.restore(state_path)
    one_line(err.value, state_path, "missing")


@needs_h5py
@pytest.mark.parametrize("damage", ["truncated", "iter_text", "iter_group", "history_dataset",
                                    "no_iter"])
def test_damaged_hdf5_solver_state(tmp_path, damage):
    solver, _ = tiny_solver(tmp_path, solver_text("SGD") + "snapshot_format: HDF5\n" +
                            f'snapshot_prefix: "{tmp_path / "h"}"\n')
    solver.step(1)
    _, state_path = solver.snapshot()
    if damage == "truncated":
        Path(state_path).write_bytes(Path(state_path).read_bytes()[:700])
    else:
        with h5py.File(state_path, "a") as handle:
            del handle["history" if damage == "history_dataset" else "iter"]
            if damage == "iter_text":
                handle["iter"] = "five"
            elif damage == "iter_group":
                handle.create_group("iter")
            elif damage == "history_dataset":
                handle["history"] = np.zeros(2)
    with pytest.raises(SolverError) as err:
        solver.restore(state_path)
    one_line(err.value, state_path)


# -- snapshots: the pair, atomically --------------------------------------------------------------
def test_snapshot_pair_is_renamed_together_and_leftovers_are_removed(tmp_path):
    target_a, target_b = tmp_path / "a.caffemodel", tmp_path / "a.solverstate"
    with pytest.raises(RuntimeError), atomic_group():
        write_atomic(target_a, b"model")
        write_atomic(target_b, b"state")
        assert not target_a.exists() and not target_b.exists()  # nothing renamed yet
        raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == []  # temporaries removed too
    with atomic_group():
        write_atomic(target_a, b"model")
        write_atomic(target_b, b"state")
    assert target_a.read_bytes() == b"model" and target_b.read_bytes() == b"state"
    # a kill (no clean-up possible) leaves hidden temporaries: the next start removes them
    folder = tmp_path / "snap"
    folder.mkdir()
    stale = [folder / ".run_iter_4.caffemodel.abc1.tmp", folder / ".run_iter_4.solverstate.x.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    keep = folder / ".other_iter_4.caffemodel.abc.tmp"
    keep.write_bytes(b"another run's")
    text = solver_text("SGD").replace("max_iter: 100", "max_iter: 1")
    solver, _ = tiny_solver(tmp_path, text + f'snapshot_prefix: "{folder / "run"}"\n')
    solver.solve()
    assert not any(path.exists() for path in stale) and keep.exists()


PAIR_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from netengine.formats import snapshot
    from netengine.formats.prototxt import atomic_group
    from netengine.proto import caffe_pb2
    from netengine.blob import blob_proto
    folder = sys.argv[1]
    for k in range(1, 10000):
        values = np.full((700, 700), k, np.float32)
        model = f"{folder}/run_iter_{k}.caffemodel"
        net = caffe_pb2.NetParameter(name="n")
        net.layer.add(name="ip").blobs.append(blob_proto(values))
        with atomic_group():
            snapshot.write_weights(model, net)
            snapshot.write_state(f"{folder}/run_iter_{k}.solverstate",
                                 snapshot.SolverStateData(k, model, [values], 0))
        print(k, flush=True)
""")


def test_a_kill_leaves_only_complete_snapshot_pairs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for attempt, delay in enumerate((0.05, 0.2, 0.45)):
        folder = tmp_path / f"run{attempt}"
        folder.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", PAIR_WRITER, str(folder)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "1", proc.stderr.read()
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
        states = sorted(folder.glob("*.solverstate"))
        assert states
        for state_path in states:  # every state has its complete caffemodel beside it
            state = snapshot.read_state(state_path)
            weights = snapshot.read_weights(state.learned_net)
            k = state.iter
            assert np.all(np.asarray(weights.layer[0].blobs[0].data) == k)
            assert np.all(state.history[0] == k)


# -- the command line: one line, traceback only with --debug -------------------------------------
def test_cli_one_line_and_debug_traceback(tmp_path):
    net = write(tmp_path / "empty.prototxt", "# nothing\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NETENGINE_DEBUG", None)
    argv = [sys.executable, str(REPO / "tools" / "test"), "--model", net, "--weights", "w"]
    plain = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    errors = [ln for ln in plain.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {net}: the net defines no layers (an empty or comment-only file?)"
                      ": expected 'layer { name: ... type: ... }' blocks"]
    debug = subprocess.run(argv + ["--debug"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == errors[0]
    env["NETENGINE_DEBUG"] = "1"
    by_env = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" in by_env.stderr


def test_unforeseen_failure_is_still_one_line(capsys, monkeypatch):
    from netengine import cli

    def body() -> int:
        raise KeyError("surprise")

    monkeypatch.delenv("NETENGINE_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["tool"])
    assert cli.run(body) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: internal error: KeyError")

