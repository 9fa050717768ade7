"""Snapshots: Caffe's solverstates restore, ours restore identically, HDF5 layout, bit-identical
resume, no truncated file after SIGKILL, SIGINT/SIGHUP during tools/train."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_solver import Feeder, need_layers, solver_text, tiny_data, tiny_solver, write_tiny

from netengine import backend
from netengine.errors import NetEngineError, SolverError
from netengine.formats import snapshot
from netengine.layers import Layer, register
from netengine.proto import caffe_pb2
from netengine.solvers import SOLVERS, get_solver

try:
    import h5py
except ImportError:
    h5py = None

needs_h5py = pytest.mark.skipif(h5py is None, reason="h5py is not installed")


# -- Caffe's own solver states ----------------------------------------------------------------------
def golden_tiny(golden_dir: Path, tag: str, tmp_path: Path):
    """A solver on Caffe's tiny net and tiny_solver_<tag>, fed Caffe's three batches."""
    need_layers("Input", "InnerProduct", "EuclideanLoss")
    ref = np.load(golden_dir / f"tiny_{tag}.npz")
    text = (golden_dir / f"tiny_solver_{tag}.prototxt").read_text().replace(
        'net: "tiny_net.prototxt"', f'net: "{golden_dir / "tiny_net.prototxt"}"')
    path = tmp_path / f"tiny_solver_{tag}.prototxt"
    path.write_text(text)
    solver = get_solver(str(path))
    Feeder(solver.net, ref["x"], ref["y"])
    return solver, ref


@pytest.mark.parametrize("tag,ext", [("sgd", ""), ("adam", ""),
                                     pytest.param("sgd_h5", ".h5", marks=needs_h5py)])
def test_restore_caffe_tiny_states(tag, ext, golden_dir, tmp_path):
    solver, ref = golden_tiny(golden_dir, tag, tmp_path)
    solver.restore(str(golden_dir / f"tiny_{tag}_iter_3.solverstate{ext}"))
    assert solver.iter == 3
    assert solver.current_step == 0
    for i, blob in enumerate(solver.net.params["ip"]):
        np.testing.assert_array_equal(blob.data, ref[f"final/ip/{i}"])
    if "history/0" in ref.files:
        for i, blob in enumerate(solver.history):
            np.testing.assert_array_equal(blob.data, ref[f"history/{i}"])
    else:  # the HDF5 run keeps no history copy: replaying the 3 steps must give it
        (tmp_path / "replay").mkdir()
        replay, _ = golden_tiny(golden_dir, tag, tmp_path / "replay")
        for i, blob in enumerate(replay.net.params["ip"]):
            blob.data[...] = ref[f"init/ip/{i}"]
        replay.step(3)
        for mine, theirs in zip(solver.history, replay.history):
            np.testing.assert_allclose(mine.data, theirs.data, rtol=1e-5, atol=1e-7)
    solver.step(2)  # and training goes on from there
    assert solver.iter == 5
    assert np.all(np.isfinite(solver.net.params["ip"][0].data))


def test_our_tiny_runs_match_caffe_and_write_its_bytes(golden_dir, tmp_path, monkeypatch):
    """3 steps from Caffe's initial weights reach Caffe's weights and history; written back
    at Caffe's prefix, a restored state gives Caffe's files byte for byte."""
    for tag in ("sgd", "adam"):
        solver, ref = golden_tiny(golden_dir, tag, tmp_path)
        for i, blob in enumerate(solver.net.params["ip"]):
            blob.data[...] = ref[f"init/ip/{i}"]
        losses = []
        for _ in range(3):
            solver.step(1)
            losses.append(solver.smoothed_loss)
        np.testing.assert_allclose(losses, ref["loss_per_iter"], rtol=1e-5)
        for i, blob in enumerate(solver.net.params["ip"]):
            np.testing.assert_allclose(blob.data, ref[f"final/ip/{i}"], rtol=1e-5, atol=1e-7)
        for i, blob in enumerate(solver.history):
            np.testing.assert_allclose(blob.data, ref[f"history/{i}"], rtol=1e-5, atol=1e-8)
        solver.restore(str(golden_dir / f"tiny_{tag}_iter_3.solverstate"))
        monkeypatch.chdir(tmp_path)
        model, state = solver.snapshot()
        assert model == f"tiny_{tag}_iter_3.caffemodel"
        assert Path(model).read_bytes() == (golden_dir / model).read_bytes()
        assert Path(state).read_bytes() == (golden_dir / state).read_bytes()
        monkeypatch.chdir(REPO)


@needs_h5py
def test_hdf5_layout_matches_caffe(golden_dir, tmp_path, monkeypatch):
    solver, ref = golden_tiny(golden_dir, "sgd_h5", tmp_path)
    solver.restore(str(golden_dir / "tiny_sgd_h5_iter_3.solverstate.h5"))
    monkeypatch.chdir(tmp_path)
    model, state = solver.snapshot()
    assert (model, state) == ("tiny_sgd_h5_iter_3.caffemodel.h5",
                              "tiny_sgd_h5_iter_3.solverstate.h5")

    def layout(path):
        items = {}
        with h5py.File(path, "r") as handle:
            handle.visititems(lambda name, obj: items.__setitem__(
                name, (obj.dtype.str, obj.shape, obj[()].tobytes() if obj.dtype.kind != "S"
                       else obj[()]) if isinstance(obj, h5py.Dataset) else "group"))
            if "learned_net" in handle:
                items["strpad"] = handle["learned_net"].id.get_type().get_strpad()
        return items

    assert layout(model) == layout(golden_dir / model)
    assert layout(state) == layout(golden_dir / state)
    assert snapshot.is_hdf5(model)


@needs_h5py
def test_hdf5_weights_load_into_net(golden_dir, tmp_path):
    solver, ref = golden_tiny(golden_dir, "sgd_h5", tmp_path)
    ignored = solver.net.copy_from(golden_dir / "tiny_sgd_h5_iter_3.caffemodel.h5")
    assert ignored == []
    for i, blob in enumerate(solver.net.params["ip"]):
        np.testing.assert_array_equal(blob.data, ref[f"final/ip/{i}"])


@pytest.mark.parametrize("fmt", ["BINARYPROTO", pytest.param("HDF5", marks=needs_h5py)])
@pytest.mark.parametrize("kind", sorted(SOLVERS))
def test_our_state_reads_back_identically(kind, fmt, tmp_path):
    extra = "snapshot_format: HDF5\n" if fmt == "HDF5" else ""
    text = solver_text(kind, weight_decay=0.01) + 'lr_policy: "multistep"\nstepvalue: 1\n'
    text = text.replace('lr_policy: "fixed"\n', "") + extra
    text += f'snapshot_prefix: "{tmp_path / "snap" / "run"}"\n'
    solver, _ = tiny_solver(tmp_path, text)
    solver.step(3)
    model, state = solver.snapshot()
    suffix = ".h5" if fmt == "HDF5" else ""
    assert model.endswith(f"run_iter_3.caffemodel{suffix}")
    assert state.endswith(f"run_iter_3.solverstate{suffix}")
    other, _ = tiny_solver(tmp_path / "snap", text)
    other.restore(state)
    assert (other.iter, other.current_step) == (3, 1)
    for mine, theirs in zip(solver.history, other.history):
        np.testing.assert_array_equal(mine.data, theirs.data)
    for mine, theirs in zip(solver.net.learnable_params, other.net.learnable_params):
        np.testing.assert_array_equal(mine.data, theirs.data)
    raw = snapshot.read_state(state)
    assert len(raw.history) == len(solver.history)
    assert raw.learned_net == model


def test_adam_history_order_is_all_m_then_all_v(tmp_path):
    solver, _ = tiny_solver(tmp_path, solver_text("Adam") +
                            f'snapshot_prefix: "{tmp_path / "a"}"\n')
    solver.step(2)
    _, state = solver.snapshot()
    message = caffe_pb2.SolverState.FromString(Path(state).read_bytes())
    shapes = [tuple(h.shape.dim) for h in message.history]
    assert shapes == [(2, 3), (2,), (2, 3), (2,)]
    m_w = np.asarray(message.history[0].data).reshape(2, 3)
    v_w = np.asarray(message.history[2].data).reshape(2, 3)
    assert np.all(v_w >= 0) and not np.allclose(m_w, v_w)


def test_restore_refuses_state_of_another_solver(tmp_path):
    sgd, _ = tiny_solver(tmp_path, solver_text("SGD") + f'snapshot_prefix: "{tmp_path / "s"}"\n')
    sgd.step(1)
    _, state = sgd.snapshot()
    adam, _ = tiny_solver(tmp_path, solver_text("Adam"))
    with pytest.raises(SolverError, match="has 2 history blobs.*needs 4"):
        adam.restore(state)
    with pytest.raises(SolverError, match="solver state not found"):
        adam.restore(str(tmp_path / "nope.solverstate"))


def test_weights_given_as_a_state_or_as_a_prototxt_say_what_they_are(tmp_path):
    sgd, _ = tiny_solver(tmp_path, solver_text("SGD") + f'snapshot_prefix: "{tmp_path / "s"}"\n')
    sgd.step(1)
    model, _ = sgd.snapshot()
    with pytest.raises(SolverError, match=r"s_iter_1\.caffemodel: this is a caffemodel "
                                          r"\(a net of 4 layers\), not a solver state"):
        sgd.restore(model)
    with pytest.raises(NetEngineError, match=r"s_iter_1\.caffemodel is a binary file .*not "
                                             "the text prototxt expected here"):
        get_solver(model)
    v1 = caffe_pb2.NetParameter(name="old")  # a V1 caffemodel: its layers are field 2,
    v1.layers.add(name="conv1", type=caffe_pb2.V1LayerParameter.CONVOLUTION)  # as learned_net
    (tmp_path / "v1.caffemodel").write_bytes(v1.SerializeToString())
    with pytest.raises(SolverError, match=r"v1\.caffemodel: this is a caffemodel \(a net of 1"):
        snapshot.read_state(tmp_path / "v1.caffemodel")


def test_snapshot_after_train_and_intervals(tmp_path):
    text = solver_text("SGD").replace("max_iter: 100", "max_iter: 7")
    text = text.replace("snapshot_after_train: false", "snapshot: 3")
    text += f'snapshot_prefix: "{tmp_path / "out" / "t"}"\n'
    solver, _ = tiny_solver(tmp_path, text)
    solver.solve()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["t_iter_3.caffemodel", "t_iter_3.solverstate", "t_iter_6.caffemodel",
                     "t_iter_6.solverstate", "t_iter_7.caffemodel", "t_iter_7.solverstate"]


# -- bit-identical resume -----------------------------------------------------------------------
@register
class SeekableTestData(Layer):
    """Test-only data layer: batch k is a pure function of (phase, k); ``seek`` moves k."""

    type = "NetengineTestSeekableData"
    exact_bottoms = 0
    exact_tops = 2

    def layer_setup(self, bottom, top) -> None:
        self.next_batch = 0

    def reshape(self, bottom, top) -> None:
        top[0].reshape((4, 3))
        top[1].reshape((4, 2))

    def compute_forward(self, bottom, top) -> None:
        rng = np.random.default_rng([77, self.phase, self.next_batch])
        top[0].data[...] = backend.to_module(rng.normal(size=(4, 3)), top[0].xp)
        top[1].data[...] = backend.to_module(rng.normal(size=(4, 2)), top[1].xp)
        self.next_batch += 1

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass

    def seek(self, batch_index: int) -> None:
        self.next_batch = int(batch_index)


RESUME_NET = """name: "resume"
layer { name: "data" type: "NetengineTestSeekableData" top: "x" top: "y" }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "drop" type: "Dropout" bottom: "h" top: "h" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "out"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_resume_is_bit_identical(kind, tmp_path):
    """N iterations + snapshot + resume in a fresh solver + N iterations == 2N in one go: same
    weights, history and test outputs bit for bit (data position and random draws included)."""
    need_layers("InnerProduct", "Dropout", "EuclideanLoss")
    (tmp_path / "net.prototxt").write_text(RESUME_NET)

    def make(name: str, max_iter: int):
        path = tmp_path / f"{name}.prototxt"
        path.write_text(f'net: "{tmp_path / "net.prototxt"}"\ntype: "{kind}"\nbase_lr: 0.05\n'
                        'momentum: 0.9\nlr_policy: "inv"\ngamma: 0.1\npower: 0.75\n'
                        'weight_decay: 0.001\nrandom_seed: 1701\ntest_iter: 2\n'
                        f'test_interval: 4\ndisplay: 3\nmax_iter: {max_iter}\niter_size: 2\n'
                        f'snapshot_prefix: "{tmp_path / name}"\n')
        return get_solver(str(path))

    straight = make("straight", 12)
    straight.solve()
    first = make("first", 6)
    first.solve()
    resumed = make("resumed", 12)
    resumed.solve(str(tmp_path / "first_iter_6.solverstate"))
    assert resumed.iter == straight.iter == 12
    for mine, theirs in zip(resumed.net.learnable_params, straight.net.learnable_params):
        np.testing.assert_array_equal(mine.data, theirs.data)
    for mine, theirs in zip(resumed.history, straight.history):
        np.testing.assert_array_equal(mine.data, theirs.data)
    assert resumed.test_results == straight.test_results
    assert (tmp_path / "straight_iter_12.caffemodel").read_bytes() == \
        (tmp_path / "resumed_iter_12.caffemodel").read_bytes()


# -- crash safety ---------------------------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from netengine.formats import snapshot
    from netengine.blob import blob_proto
    from netengine.proto import caffe_pb2

    # one layer with a 16 MB blob, enough for a write to take a while
    weights = np.zeros((2000, 2000), np.float32)
    k = 0
    while True:
        weights[...] = k
        param = caffe_pb2.NetParameter(name="big")
        param.layer.add(name="ip", type="InnerProduct").blobs.append(blob_proto(weights))
        snapshot.write_weights({model!r}, param)
        snapshot.write_state({state!r}, snapshot.SolverStateData(k, "m", [weights], 0))
        if k == 0:
            print("written", flush=True)
        k += 1
""")


def _check_complete(model: Path, state: Path) -> None:
    if model.exists():
        message = caffe_pb2.NetParameter.FromString(model.read_bytes())
        values = np.asarray(message.layer[0].blobs[0].data)
        assert values.size == 2000 * 2000 and np.all(values == values[0])
    if state.exists():
        message = caffe_pb2.SolverState.FromString(state.read_bytes())
        values = np.asarray(message.history[0].data)
        assert values.size == 2000 * 2000 and np.all(values == message.iter)


def test_sigkill_never_leaves_a_truncated_snapshot(tmp_path):
    model, state = tmp_path / "big.caffemodel", tmp_path / "big.solverstate"
    script = KILL_SCRIPT.format(repo=str(REPO), model=str(model), state=str(state))
    rng = np.random.default_rng(0)
    for _attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert "written" in line, proc.stderr.read()
            time.sleep(float(rng.uniform(0.05, 0.4)))
        finally:
            proc.kill()
            proc.wait()
        _check_complete(model, state)
        assert model.exists() and state.exists()


# -- signals during tools/train -------------------------------------------------------------------
def _start_training(tmp_path: Path, *flags: str):
    write_tiny(tmp_path)
    (tmp_path / "solver.prototxt").write_text(
        'net: "tiny_net.prototxt"\nbase_lr: 0.01\nmomentum: 0.9\nlr_policy: "fixed"\n'
        'max_iter: 100000000\ndisplay: 0\nsnapshot_prefix: "out/tiny"\n')
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "train"), "--solver",
                             "solver.prototxt", *flags], cwd=tmp_path, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    lines = []
    while True:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "Learning Rate Policy" in line:
            break
    assert proc.poll() is None, "".join(lines)
    time.sleep(0.3)
    return proc, lines


def _finish(proc, lines) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, "".join(lines) + err


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigint_snapshots_and_stops(tmp_path):
    proc, lines = _start_training(tmp_path)
    proc.send_signal(signal.SIGINT)
    code, log = _finish(proc, lines)
    assert code == 0, log
    assert "stopping" in log
    assert "Optimization stopped early." in log
    models = list((tmp_path / "out").glob("tiny_iter_*.caffemodel"))
    states = list((tmp_path / "out").glob("tiny_iter_*.solverstate"))
    assert len(models) == 1 and len(states) == 1, log
    restored = snapshot.read_state(states[0])
    assert restored.iter > 0 and Path(tmp_path / restored.learned_net).exists()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP")
def test_sighup_snapshots_and_goes_on(tmp_path):
    proc, lines = _start_training(tmp_path)
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    code, log = _finish(proc, lines)
    assert code == 0, log
    assert "Caught SIGHUP: snapshotting" in log
    assert len(list((tmp_path / "out").glob("tiny_iter_*.solverstate"))) == 2, log


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigint_effect_none_keeps_training(tmp_path):
    proc, lines = _start_training(tmp_path, "--sigint_effect", "none", "--sighup_effect",
                                  "stop")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None
    proc.send_signal(signal.SIGHUP)
    code, log = _finish(proc, lines)
    assert code == 0, log
    assert "Caught SIGINT; ignored" in log and "Caught SIGHUP: stopping" in log


DATA_NET = """name: "mnist_small"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 crop_size: 24 mirror: true }
  data_param { source: "%(source)s" batch_size: 16 prefetch: 2 } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 crop_size: 24 }
  data_param { source: "%(source)s" batch_size: 10 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" include { phase: TRAIN } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_resume_is_bit_identical_with_the_data_layer(tmp_path):
    """The same claim with the real Data layer (MNIST IDX, random crops and mirrors, prefetch)
    whose ``seek`` the solver calls on restore."""
    need_layers("Data", "InnerProduct", "Dropout", "Accuracy", "SoftmaxWithLoss")
    source = REPO / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not source.exists():
        pytest.skip("embedded MNIST data absent")
    (tmp_path / "net.prototxt").write_text(DATA_NET % {"source": source})

    def make(name: str, max_iter: int):
        path = tmp_path / f"{name}.prototxt"
        path.write_text('net: "net.prototxt"\nbase_lr: 0.05\nmomentum: 0.9\nlr_policy: "fixed"\n'
                        "random_seed: 42\ntest_iter: 3\ntest_interval: 3\n"
                        f'max_iter: {max_iter}\nsnapshot_prefix: "{tmp_path / name}"\n')
        return get_solver(str(path))

    straight = make("straight", 8)
    straight.solve()
    first = make("first", 4)
    first.solve()
    resumed = make("resumed", 8)
    resumed.solve(str(tmp_path / "first_iter_4.solverstate"))
    for mine, theirs in zip(resumed.net.learnable_params, straight.net.learnable_params):
        np.testing.assert_array_equal(mine.data, theirs.data)
    assert resumed.test_results == straight.test_results


def test_action_function_snapshot_and_stop(tmp_path):
    """Actions polled after each iteration: "snapshot" writes one and goes on, "stop" writes
    one and ends solve() early; a stop during testing ends the test and the run too."""
    text = solver_text("SGD").replace("max_iter: 100", "max_iter: 50")
    text += f'snapshot_prefix: "{tmp_path / "out" / "a"}"\n'
    solver, _ = tiny_solver(tmp_path, text)
    actions = iter(["none", "snapshot", "none", "stop"])
    solver.set_action_function(lambda: next(actions, "none"))
    solver.solve()
    assert solver.iter == 4 and solver.requested_early_exit
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_iter_2.caffemodel", "a_iter_2.solverstate", "a_iter_4.caffemodel",
        "a_iter_4.solverstate"]
    text = text.replace("max_iter: 50", "max_iter: 50\ntest_iter: 5\ntest_interval: 3")
    solver, _ = tiny_solver(tmp_path, text.replace('/ "out" / "a"', "").replace(
        str(tmp_path / "out" / "a"), str(tmp_path / "b")))
    Feeder(solver.test_nets[0], *tiny_data(2))
    polls = []

    def action() -> str:
        polls.append(solver.iter)
        # 5 polls testing at 0, 3 after iterations 0-2, then the 4th test batch at 3
        return "stop" if len(polls) == 12 else "none"

    solver.set_action_function(action)
    solver.solve()
    assert solver.iter == 3 and solver.test_results == [{}]  # the test at 3 was cut short
    assert (tmp_path / "b_iter_3.solverstate").exists()


@pytest.mark.parametrize("fmt", ["BINARYPROTO", pytest.param("HDF5", marks=needs_h5py)])
def test_snapshot_diff_writes_the_gradients(fmt, tmp_path):
    text = solver_text("SGD") + f'snapshot_diff: true\nsnapshot_format: {fmt}\n'
    text += f'snapshot_prefix: "{tmp_path / "d"}"\n'
    solver, _ = tiny_solver(tmp_path, text)
    solver.step(1)
    model, _ = solver.snapshot()
    diffs = [blob.diff for blob in solver.net.params["ip"]]
    if fmt == "HDF5":
        with h5py.File(model, "r") as handle:
            got = [handle[f"diff/ip/{i}"][()] for i in range(2)]
            assert set(handle["diff"]) == {"x", "y", "ip", "loss"}
    else:
        layer = caffe_pb2.NetParameter.FromString(Path(model).read_bytes()).layer[2]
        got = [np.asarray(blob.diff).reshape(blob.shape.dim) for blob in layer.blobs]
    for mine, want in zip(got, diffs):
        np.testing.assert_array_equal(mine, want)
