"""The example nets in nets/: every one builds in both phases, runs forward and backward on the
embedded MNIST data, and trains (its loss falls over a short run)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import netengine
from netengine.formats.prototxt import read_text_proto
from netengine.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
NETS = REPO / "nets"
TRAIN_TEST = sorted(NETS.glob("*_train_test.prototxt"))
DEPLOY = sorted(NETS.glob("*_deploy.prototxt"))
SOLVERS = sorted(NETS.glob("*_solver.prototxt"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the nets' data sources are relative to the repository root


def test_every_mission_layer_appears_in_an_example():
    types = set()
    for path in TRAIN_TEST:
        types |= {layer.type for layer in read_text_proto(path, caffe_pb2.NetParameter())[0].layer}
    mission = {"Convolution", "Pooling", "ReLU", "BatchNorm", "LRN", "Slice", "Concat", "Eltwise",
               "Deconvolution", "Scale"}
    assert mission <= types, mission - types


@pytest.mark.parametrize("path", TRAIN_TEST, ids=lambda p: p.stem)
@pytest.mark.parametrize("phase", [netengine.TRAIN, netengine.TEST], ids=["TRAIN", "TEST"])
def test_train_test_nets_run_forward_backward(path, phase):
    netengine.set_random_seed(1701)
    net = netengine.Net(str(path), phase)
    try:
        out = net.forward()
        assert all(np.all(np.isfinite(v)) for v in out.values())
        net.backward()
        for name, blobs in net.params.items():
            for blob in blobs:
                assert np.all(np.isfinite(blob.diff)), name
        if phase == netengine.TRAIN:
            grads = [np.abs(b.diff).sum() for blobs in net.params.values() for b in blobs]
            assert sum(grads) > 0
    finally:
        for layer in net.layers:
            if hasattr(layer, "close"):
                layer.close()


@pytest.mark.parametrize("path", DEPLOY, ids=lambda p: p.stem)
def test_deploy_nets_give_probabilities(path):
    net = netengine.Net(str(path), netengine.TEST)
    net.blobs["data"].data[...] = np.random.default_rng(0).random(net.blobs["data"].shape)
    prob = net.forward()["prob"]
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("path", SOLVERS, ids=lambda p: p.stem)
def test_example_solvers_train(path, tmp_path):
    try:
        netengine.get_solver  # noqa: B018
    except AttributeError:
        pytest.skip("solver not available")
    param = read_text_proto(path, caffe_pb2.SolverParameter())[0]
    param.max_iter = 30
    param.test_interval = 0
    del param.test_iter[:]
    param.snapshot = 0
    param.snapshot_after_train = False
    param.display = 0
    param.net = str(REPO / param.net)
    solver_file = tmp_path / path.name
    solver_file.write_text(str(param))
    solver = netengine.get_solver(str(solver_file))
    weights = {name: w for name, w in solver.net.blob_loss_weights.items() if w}
    losses = []
    for _ in range(30):
        solver.step(1)
        losses.append(sum(w * float(solver.net.blobs[name].data) for name, w in weights.items()))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
