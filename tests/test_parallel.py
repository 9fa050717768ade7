"""Data-parallel training (netengine.parallel): the sharding plan and data layers' shards in
one process, then real runs under mpiexec (skipped where mpi4py or mpiexec is missing) against
one process with the global batch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from netengine import Net, parallel
from netengine.formats import snapshot
from netengine.parallel import Shard
from netengine.parallel.comm import launched_size
from netengine.proto import caffe_pb2
from netengine.solvers import get_solver

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "parallel_driver.py"
MNIST = ROOT / "data" / "mnist" / "train-images-idx3-ubyte.gz"
MNIST_TEST = ROOT / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"


def _mpiexec() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        found = here / name if (here / name).exists() else shutil.which(name)
        if found:
            return str(found)
    return None


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="needs mpi4py and mpiexec (the mpi extra)")


# -- nets and solvers ---------------------------------------------------------------------------
def _data(batch: int, test_batch: int = 0) -> str:
    """A Data layer of ``batch``; with ``test_batch``, TRAIN only, and a TEST one beside it."""
    phase = 'include { phase: TRAIN } ' if test_batch else ''
    text = (f'layer {{ name: "mnist" type: "Data" top: "data" top: "label" {phase}'
            f'transform_param {{ scale: 0.00390625 }} '
            f'data_param {{ source: "{MNIST}" batch_size: {batch} }} }}\n')
    if test_batch:
        text += (f'layer {{ name: "test" type: "Data" top: "data" top: "label" '
                 f'include {{ phase: TEST }} transform_param {{ scale: 0.00390625 }} '
                 f'data_param {{ source: "{MNIST_TEST}" batch_size: {test_batch} }} }}\n')
    return text


def _ip(name: str, bottom: str, top: str, n: int) -> str:
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "xavier" }} '
            f'bias_filler {{ type: "constant" value: 0.1 }} }} }}\n')


LOSS = ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" '
        'top: "loss" }\n')
RELU = 'layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }\n'


def tiny_net(batch: int, middle: str = RELU, top: str = "ip1", test_batch: int = 0) -> str:
    return _data(batch, test_batch) + _ip("ip1", "data", "ip1", 8) + middle \
        + _ip("ip2", top, "ip2", 10) + LOSS


BN = ('layer { name: "bn" type: "BatchNorm" bottom: "ip1" top: "bn" }\n'
      'layer { name: "relu" type: "ReLU" bottom: "bn" top: "bn" }\n')
DROP = (RELU + 'layer { name: "drop" type: "Dropout" bottom: "ip1" top: "drop" '
        'dropout_param { dropout_ratio: 0.5 } }\n')


def write_solver(folder: Path, net: str, *, iters: int, extra: str = "", name: str = "s") -> Path:
    (folder / f"{name}_net.prototxt").write_text(net)
    path = folder / f"{name}_solver.prototxt"
    path.write_text(f'net: "{folder / (name + "_net.prototxt")}"\nbase_lr: 0.05\n'
                    f'lr_policy: "fixed"\nmax_iter: {iters}\ndisplay: 0\nrandom_seed: 1701\n'
                    f'snapshot_prefix: "{folder / name}"\n{extra}')
    return path


def one_process(solver: Path, dtype=np.float64, resume: str | None = None,
                tests: list | None = None) -> list[np.ndarray]:
    """Train in this process; the params at the end (``tests`` gets the last test's results)."""
    s = get_solver(str(solver), dtype=dtype)
    if resume:
        s.restore(resume)
    s.step(s.param.max_iter - s.iter)
    if tests is not None:
        tests.extend(s.test_results)
    return [b.data.copy() for b in s.net.learnable_params]


def mpirun(ranks: int, solver: Path, out: Path, *extra: str, dtype: str = "float64",
           timeout: float = 120, env: dict | None = None) -> list[dict]:
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, str(DRIVER), str(solver), str(out),
           "--dtype", dtype, *extra]
    # NETENGINE_JIT=0: the same formulas without compiling Numba's loops in every rank
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "NETENGINE_JIT": "0",
                               **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return [dict(np.load(f"{out}.rank{r}.npz")) for r in range(ranks)]


def params_of(result: dict) -> list[np.ndarray]:
    return [result[f"p{i}"] for i in range(sum(k[0] == "p" and k[1:].isdigit() for k in result))]


def caffemodel_params(path: str) -> list[np.ndarray]:
    net = snapshot.read_weights(path)
    return [np.asarray(b.double_data or b.data, dtype=np.float64)
            for layer in net.layer for b in layer.blobs]


# -- one process: the plan and the shards ------------------------------------------------------
def test_test_batches_split_the_test_into_contiguous_runs():
    runs = [Shard(r, 3).test_batches(10) for r in range(3)]
    assert [list(r) for r in runs] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert Shard(0, 3).test_rounds(10) == 4 and Shard(1, 4).test_rounds(2) == 1
    assert [len(Shard(r, 4).test_batches(2)) for r in range(4)] == [0, 1, 0, 1]


def test_launched_size_reads_the_launchers_variables(monkeypatch):
    for name in parallel.comm.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launched_size() == 1 and parallel.world() is None
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_size() == 4


@pytest.mark.parametrize("local, size, user, expect", [
    ("2", "2", None, "^sysv,posix"),  # MPICH, every rank on this machine
    ("2", "4", None, None),  # two machines: UCX carries the traffic between them
    ("2", "2", "rc,sm", "rc,sm"),  # the user's choice stays
    (None, "2", None, None),  # not MPICH's launcher
])
def test_ucx_shared_memory_off_on_one_machine(monkeypatch, local, size, user, expect):
    for name in (*parallel.comm.SIZE_VARIABLES, "MPI_LOCALNRANKS", "UCX_TLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_SIZE", size)
    for name, value in (("MPI_LOCALNRANKS", local), ("UCX_TLS", user)):
        if value is not None:
            monkeypatch.setenv(name, value)
    assert parallel.comm.one_machine_ucx() == (expect is not None and user is None)
    assert os.environ.get("UCX_TLS") == expect


def test_user_thread_settings_win(monkeypatch):
    from netengine.parallel import threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.split_threads(2) == "threads as set by OMP_NUM_THREADS=3"


def test_gpu_lists_in_caffes_syntax():
    from netengine.errors import NetEngineError
    from netengine.parallel import launch

    assert launch.gpu_list("") is None and launch.gpu_list("0, 1") == [0, 1]
    assert launch.rank_gpu([2, 3], 1, 2) == 3
    for bad in ("0,0", "a", "1,-1"):
        with pytest.raises(NetEngineError):
            launch.gpu_list(bad)
    with pytest.raises(NetEngineError, match="list one per rank"):
        launch.rank_gpu([0], 0, 2)


def _net(text: str, tmp_path: Path, phase=caffe_pb2.TRAIN) -> Net:
    path = tmp_path / "n.prototxt"
    path.write_text(text)
    return Net(str(path), phase)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_data_shards_are_slices_of_the_global_batch(tmp_path, prefetch):
    big = _net(_data(12).replace("batch_size", f"prefetch: {prefetch} batch_size"), tmp_path)
    shards = [_net(_data(4), tmp_path) for _ in range(3)]
    for r, net in enumerate(shards):
        parallel.shard.shard_data_layers(net, Shard(r, 3))
    for _ in range(3):
        big.forward()
        parts = []
        for net in shards:
            net.forward()
            parts.append(net.blobs["label"].data.copy())
        np.testing.assert_array_equal(np.concatenate(parts), big.blobs["label"].data)
    shards[1].layers[0].seek(5)
    shards[1].forward()
    big.layers[0].seek(5)
    big.forward()
    np.testing.assert_array_equal(shards[1].blobs["data"].data, big.blobs["data"].data[4:8])


def test_memory_data_shards(tmp_path):
    text = ('layer { name: "m" type: "MemoryData" top: "data" top: "label" memory_data_param '
            '{ batch_size: 2 channels: 1 height: 1 width: 1 } }')
    data = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1)
    served = []
    for r in range(2):
        net = _net(text, tmp_path)
        net.layers[0].set_input_arrays(data, np.arange(12, dtype=np.float32))
        net.layers[0].set_shard(r, 2)
        served.append([net.forward() and net.blobs["label"].data.tolist() for _ in range(4)])
    assert served[0] == [[0, 1], [4, 5], [8, 9], [0, 1]]
    assert served[1] == [[2, 3], [6, 7], [10, 11], [2, 3]]


def test_hdf5_data_shards(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"] = np.arange(10, dtype=np.float32).reshape(10, 1)
        f["label"] = np.arange(10, dtype=np.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\n")
    text = ('layer { name: "h" type: "HDF5Data" top: "data" top: "label" hdf5_data_param '
            f'{{ source: "{tmp_path / "list.txt"}" batch_size: 3 }} }}')
    served = []
    for r in range(2):
        net = _net(text, tmp_path)
        net.layers[0].set_shard(r, 2)
        served.append([net.forward() and net.blobs["label"].data.tolist() for _ in range(2)])
    assert served == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9, 0, 1]]]


def test_single_process_training_never_imports_mpi(tmp_path):
    solver = write_solver(tmp_path, tiny_net(4), iters=2)
    code = ("import sys; from netengine.cli.train import main; "
            f"rc = main(['--solver', '{solver}']); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k not in parallel.comm.SIZE_VARIABLES}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


# -- under mpiexec --------------------------------------------------------------------------------
@needs_mpi
def test_two_ranks_equal_one_process_with_the_global_batch_float64(tmp_path):
    """SGD with momentum, 300 iterations: 2 ranks x 4 == 1 process x 8 to 1e-12; the test
    (3 batches of 5 split 1 + 2 over the ranks, at 0, 100, 200) gives one process's outputs."""
    extra = "momentum: 0.9\nweight_decay: 0.0005\ntest_iter: 3\ntest_interval: 100\n"
    ranks = mpirun(2, write_solver(tmp_path, tiny_net(4, test_batch=5), iters=300, extra=extra),
                   tmp_path / "out")
    tests: list = []
    single = one_process(write_solver(tmp_path, tiny_net(8, test_batch=5), iters=300,
                                      extra=extra, name="g"), tests=tests)
    for r in ranks:
        assert int(r["iter"]) == 300
        for got, want in zip(params_of(r), single):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.abs(params_of(ranks[0])[0] - params_of(ranks[1])[0]).max() == 0
    assert tests and float(ranks[0]["test_loss"]) == pytest.approx(tests[0]["loss"], abs=1e-12)


@needs_mpi
@pytest.mark.parametrize("per_node", ["", "2"])
def test_four_ranks_adam_iter_size_equal_one_process(tmp_path, per_node):
    """Adam with iter_size 2, oversubscribed: 4 ranks x 2 == 1 process x 8, iter_size 2; on one
    machine, and as two machines of two ranks (shared memory, then MPI between them)."""
    extra = 'type: "Adam"\nbase_lr: 0.01\niter_size: 2\n'
    ranks = mpirun(4, write_solver(tmp_path, tiny_net(2), iters=300, extra=extra),
                   tmp_path / "out", env={"NETENGINE_RANKS_PER_NODE": per_node})
    single = one_process(write_solver(tmp_path, tiny_net(8), iters=300, extra=extra, name="g"))
    for got, want in zip(params_of(ranks[3]), single):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@needs_mpi
@pytest.mark.parametrize("ranks, env, kind, dtype", [
    (2, {}, "shared memory", "float32"),
    (2, {}, "shared memory", "float64"),
    (4, {}, "shared memory", "float64"),
    (4, {"NETENGINE_RANKS_PER_NODE": "2"}, "shared memory + MPI_Allreduce between machines",
     "float32"),
    (3, {"NETENGINE_RANKS_PER_NODE": "2"}, "MPI_Allreduce", "float64"),  # machines of 2 and 1
    (2, {"NETENGINE_RANKS_PER_NODE": "1"}, "MPI_Allreduce", "float64"),
    (2, {"NETENGINE_SHM": "0"}, "MPI_Allreduce", "float32"),
    (2, {"nowindow": "1"}, "MPI_Allreduce", "float64"),  # an MPI without shared windows
])
def test_gradient_sum_equals_mpi_allreduce(ranks, env, kind, dtype):
    """Each way of summing the gradient buffer (straight in the window, piece by piece, through
    host copies) gives MPI_Allreduce's sums (to rounding: the order of the additions differs),
    the very same values on every rank, step after step."""
    done = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable,
                           str(ROOT / "tests" / "parallel_sum_driver.py"), dtype,
                           *(["nowindow"] if "nowindow" in env else [])],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["KIND"] == f"{kind}|{kind} on host copies"
    assert float(lines["WORST"]) < (1e-6 if dtype == "float32" else 1e-14)
    assert lines["SAME"] == "True"


@needs_mpi
def test_two_ranks_through_cupys_api_equal_one_process(tmp_path):
    """The device path (params in CuPy arrays, the sum through host copies, broadcast and
    resume) on tests/fake_cupy.py: 2 ranks x 4 == 1 process x 8 to 1e-12, and the run resumed
    from its snapshot at 10 ends where it did (to the float32 the snapshot stores)."""
    extra = "momentum: 0.9\nsnapshot: 10\n"
    solver = write_solver(tmp_path, tiny_net(4), iters=20, extra=extra)
    ranks = mpirun(2, solver, tmp_path / "out", "--fake-gpu")
    assert str(ranks[0]["sum_kind"]) == "shared memory on host copies"
    single = one_process(write_solver(tmp_path, tiny_net(8), iters=20, extra=extra, name="g"))
    for got, want in zip(params_of(ranks[1]), single):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    resumed = mpirun(2, solver, tmp_path / "again", "--fake-gpu", "--resume",
                     str(tmp_path / "s_iter_10.solverstate"), dtype="float64")
    for got, want in zip(params_of(resumed[0]), params_of(ranks[0])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@needs_mpi
def test_a_bad_ranks_per_node_is_one_line(tmp_path):
    solver = write_solver(tmp_path, tiny_net(4), iters=2)
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(ROOT / "tools" / "train"),
                           "--solver", str(solver)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "NETENGINE_RANKS_PER_NODE": "two"})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "NETENGINE_RANKS_PER_NODE" in line]
    assert lines and all(line.startswith("error: NETENGINE_RANKS_PER_NODE must be a whole "
                                         "number") and line.endswith("got 'two'")
                         for line in lines), done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@needs_mpi
def test_lenet_float32_two_ranks_agree_with_one_process(tmp_path):
    net = (ROOT / "nets" / "mnist_train_test.prototxt").read_text()
    net = net.replace('"data/mnist/', f'"{ROOT}/data/mnist/')
    half, full = net.replace("batch_size: 64", "batch_size: 8"), net.replace(
        "batch_size: 64", "batch_size: 16")
    extra = 'momentum: 0.9\nweight_decay: 0.0005\nbase_lr: 0.01\n'
    ranks = mpirun(2, write_solver(tmp_path, half, iters=30, extra=extra), tmp_path / "out",
                   dtype="float32")
    single = one_process(write_solver(tmp_path, full, iters=30, extra=extra, name="g"),
                         dtype=np.float32)
    for got, want in zip(params_of(ranks[0]), single):
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-4 * scale


@needs_mpi
def test_batchnorm_ranks_equal_iter_size_and_stats_are_averaged(tmp_path):
    """2 ranks x 4 == 1 process x 4 with iter_size 2 (learnable weights, 100 iterations);
    the snapshot's running statistics are the mean of the ranks' own."""
    ranks = mpirun(2, write_solver(tmp_path, tiny_net(4, BN, "bn"), iters=100),
                   tmp_path / "out")
    single = one_process(write_solver(tmp_path, tiny_net(4, BN, "bn"), iters=100,
                                      extra="iter_size: 2\n", name="g"))
    own = [params_of(r) for r in ranks]
    for i in (0, 1, 5, 6):  # ip1 weight/bias, ip2 weight/bias (2..4 are BatchNorm's stats)
        np.testing.assert_allclose(own[0][i], single[i], rtol=0, atol=1e-12)
    saved = caffemodel_params(str(tmp_path / "s_iter_100.caffemodel"))  # float32 on disk
    for i in (2, 3):
        assert np.abs(own[0][i] - own[1][i]).max() > 0  # each rank saw its own batches
        mean = (own[0][i] + own[1][i]) / 2
        for r in ranks:
            np.testing.assert_allclose(r[f"after_snapshot_{i}"], mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(saved[i].ravel(), mean.astype(np.float32).ravel())
    np.testing.assert_array_equal(saved[4].ravel(), own[0][4].astype(np.float32).ravel())
    for i in (0, 1, 5, 6):  # trained params are left as they are
        np.testing.assert_array_equal(ranks[1][f"after_snapshot_{i}"], own[0][i])


@needs_mpi
def test_dropout_snapshot_resume_is_bit_identical_and_masks_differ(tmp_path):
    """Dropout net, 2 ranks: a run to 20 with a snapshot at 10; the same run again; a resume
    from the snapshot at 2 ranks: all bit-identical. The ranks' masks differ. The snapshot
    also resumes at 1 and 4 ranks (it holds no rank count). float32: snapshots hold float32."""
    solver = write_solver(tmp_path, tiny_net(4, DROP, "drop"), iters=20, extra="snapshot: 10\n")
    first = mpirun(2, solver, tmp_path / "a", dtype="float32")
    again = mpirun(2, solver, tmp_path / "b", dtype="float32")
    state = str(tmp_path / "s_iter_10.solverstate")
    resumed = mpirun(2, solver, tmp_path / "c", "--resume", state, dtype="float32")
    for got in (again[0], resumed[0], resumed[1]):
        for x, y in zip(params_of(got), params_of(first[0])):
            np.testing.assert_array_equal(x, y)
    assert (first[0]["mask_drop"] != first[1]["mask_drop"]).any()
    np.testing.assert_array_equal(first[0]["mask_drop"], again[0]["mask_drop"])
    four = mpirun(4, solver, tmp_path / "d", "--resume", state, dtype="float32")
    assert int(four[0]["iter"]) == 20
    alone = one_process(solver, resume=state, dtype=np.float32)
    assert all(np.isfinite(p).all() for p in alone)


RANK_LAYER = """import os
import signal

import netengine as caffe


class OnRankOne(caffe.Layer):
    \"\"\"Passes its bottom through; on rank 1 at the 3rd forward, raises or sends itself
    SIGINT (param_str).\"\"\"

    def setup(self, bottom, top):
        self.n = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        self.n += 1
        rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
        if rank == "1" and self.n == 3:
            if self.param_str == "fail":
                raise ValueError("rank one gives up")
            os.kill(os.getpid(), signal.SIGINT)
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
"""


def _train_with_rank_layer(tmp_path: Path, action: str) -> subprocess.CompletedProcess:
    (tmp_path / "rank_layer.py").write_text(RANK_LAYER)
    middle = RELU + ('layer { name: "r" type: "Python" bottom: "ip1" top: "f" python_param '
                     f'{{ module: "rank_layer" layer: "OnRankOne" param_str: "{action}" }} }}\n')
    solver = write_solver(tmp_path, tiny_net(4, middle, "f"), iters=100000)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "NETENGINE_JIT": "0"}
    return subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(ROOT / "tools" / "train"),
                           "--solver", str(solver)], capture_output=True, text=True, timeout=60,
                          env=env)


@needs_mpi
def test_a_failing_rank_ends_the_job_with_its_message(tmp_path):
    """... within 30 s, and leaves no MPICH shared-memory file in /dev/shm behind."""
    shm = Path("/dev/shm")
    before = set(shm.iterdir()) if shm.is_dir() else set()
    began = time.monotonic()
    done = _train_with_rank_layer(tmp_path, "fail")
    assert done.returncode != 0
    assert time.monotonic() - began < 30
    assert "error: rank 1 of 2:" in done.stderr and "rank one gives up" in done.stderr, \
        done.stderr[-2000:]
    if shm.is_dir():
        time.sleep(0.5)
        left = [p.name for p in set(shm.iterdir()) - before
                if p.name.startswith(parallel.comm.SHARED_FILE_PREFIXES)]
        assert not left, left


@needs_mpi
def test_sigint_on_one_rank_snapshots_and_stops_all(tmp_path):
    done = _train_with_rank_layer(tmp_path, "sigint")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Stop requested: snapshotting and stopping at iteration 3" in done.stderr
    assert (tmp_path / "s_iter_3.caffemodel").exists()
    assert (tmp_path / "s_iter_3.solverstate").exists()


# -- on GPUs (unverified without a device: run by bench/gpu_check.sh) ---------------------------
def _gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


@needs_mpi
@pytest.mark.gpu
@pytest.mark.parametrize("nccl", ["1", "0"])
def test_gpu_ranks_equal_one_gpu_process(tmp_path, nccl):
    """2 ranks on GPUs (NCCL where there are 2 GPUs and CuPy has it; else MPI on host copies)
    vs one GPU process with the global batch, float64, 50 iterations."""
    count = _gpu_count()
    if count == 0 or (nccl == "1" and count < 2):
        pytest.skip("needs CuPy and a GPU (two for NCCL)")
    from netengine import backend

    extra = "momentum: 0.9\n"
    ranks = mpirun(2, write_solver(tmp_path, tiny_net(4), iters=50, extra=extra),
                   tmp_path / "out", "--gpu", env={"NETENGINE_NCCL": nccl})
    backend.set_mode_gpu()
    try:
        single = one_process(write_solver(tmp_path, tiny_net(8), iters=50, extra=extra,
                                          name="g"))
    finally:
        backend.set_mode_cpu()
    for got, want in zip(params_of(ranks[1]), single):
        np.testing.assert_allclose(got, backend.to_host(want), rtol=0, atol=1e-10)
