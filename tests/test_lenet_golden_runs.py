"""BVLC Caffe's LeNet training runs (../shared/caffe-golden/cases/lenet_*) reproduced through
the pycaffe-shaped API: get_solver, net.copy_from, net.before_forward feeding every batch,
40 × step(1). Per-iteration loss within 1e-4 of Caffe's, final weights within 1e-3 relative.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN

from netengine.layers import REGISTRY, layer_type_list
from netengine.solvers import get_solver, lr_policy

LENET_TYPES = ("Input", "Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss")
RUNS = ["sgd", "adam", "sgd_step", "sgd_itersize2"]
LAYERS = ("conv1", "conv2", "ip1", "ip2")


def _need_lenet(golden_dir: Path) -> None:
    layer_type_list()
    missing = [t for t in LENET_TYPES if t not in REGISTRY]
    if missing:
        pytest.skip(f"layer type(s) not implemented yet: {missing}")
    if not (golden_dir / "lenet_data.npz").exists():
        pytest.skip("LeNet golden data absent")


@pytest.fixture(scope="module")
def lenet_data():
    path = GOLDEN / "lenet_data.npz"
    if not path.exists():
        pytest.skip("LeNet golden data absent")
    data = np.load(path)
    images = data["images_uint8"].astype(np.float32) * np.float32(0.00390625)
    return images[:, None], data["labels"].astype(np.float32), int(data["batch_size"])


def lenet_solver(tmp_path: Path, tag: str, golden_dir: Path):
    """Caffe's solver prototxt copied to tmp_path with ``net:`` naming the golden net."""
    text = (golden_dir / f"lenet_solver_{tag}.prototxt").read_text()
    text = text.replace('net: "lenet_train.prototxt"',
                        f'net: "{golden_dir / "lenet_train.prototxt"}"')
    path = tmp_path / f"lenet_solver_{tag}.prototxt"
    path.write_text(text)
    solver = get_solver(str(path))
    solver.net.copy_from(str(golden_dir / "lenet_init.caffemodel"))
    return solver


class BatchFeeder:
    """Writes batch b = 0, 1, 2, ... into data/label before every forward pass."""

    def __init__(self, net, images, labels, batch: int) -> None:
        self.net, self.images, self.labels, self.batch = net, images, labels, batch
        self.served: list[int] = []
        net.before_forward(self)

    def __call__(self, layer_index: int) -> None:
        if layer_index != 0:
            return
        b = len(self.served)
        lo = b * self.batch
        self.net.blobs["data"].data[...] = self.images[lo:lo + self.batch]
        self.net.blobs["label"].data[...] = self.labels[lo:lo + self.batch]
        self.served.append(b)


@pytest.mark.parametrize("tag", RUNS)
def test_lenet_run_matches_caffe(tag, tmp_path, golden_dir, lenet_data):
    _need_lenet(golden_dir)
    ref = np.load(golden_dir / f"lenet_run_{tag}.npz")
    solver = lenet_solver(tmp_path, tag, golden_dir)
    feeder = BatchFeeder(solver.net, *lenet_data)
    losses, rates = [], []
    for _ in range(40):
        rates.append(lr_policy.learning_rate(solver.param, solver.iter, solver.current_step)[0])
        solver.step(1)
        losses.append(solver.smoothed_loss)
        if solver.iter == 1 and "after_iter1/conv1/0" in ref.files:
            for layer in LAYERS:
                for i, blob in enumerate(solver.net.params[layer]):
                    want = ref[f"after_iter1/{layer}/{i}"]
                    err = np.max(np.abs(blob.data - want)) / max(np.max(np.abs(want)), 1e-12)
                    assert err <= 1e-4, f"{tag} after iteration 1: {layer}/{i} rel err {err:.3g}"
    np.testing.assert_array_equal(feeder.served, ref["batch_index_per_forward"])
    np.testing.assert_allclose(rates, ref["lr_per_iter"], rtol=1e-6)
    loss_err = np.max(np.abs(np.array(losses) - ref["loss_per_iter"]))
    assert loss_err <= 1e-4, f"{tag}: loss curve differs by {loss_err:.3g}"
    for layer in LAYERS:
        for i, blob in enumerate(solver.net.params[layer]):
            want = ref[f"final/{layer}/{i}"]
            err = np.max(np.abs(blob.data - want)) / np.max(np.abs(want))
            assert err <= 1e-3, f"{tag}: final {layer}/{i} relative error {err:.3g}"


def test_lenet_forward_backward_batch0(tmp_path, golden_dir, lenet_data):
    """One plain forward/backward on batch 0 with the initial weights: every blob's data and
    diff and the raw param gradients."""
    _need_lenet(golden_dir)
    ref = np.load(golden_dir / "lenet_fwdbwd_batch0.npz")
    solver = lenet_solver(tmp_path, "sgd", golden_dir)
    net = solver.net
    BatchFeeder(net, *lenet_data)
    net.clear_param_diffs()
    loss = net.forward_backward()
    assert loss == pytest.approx(float(ref["loss"]), abs=1e-5)
    for key in ref.files:
        kind, _, name = key.partition("/")
        want = ref[key]
        if kind == "blob":
            got = net.blobs[name].data
        elif kind == "blob_diff":
            if name in ("label", "data", "loss"):
                continue  # never back-propagated into / set by the loss weight
            got = net.blobs[name].diff
        elif kind == "param_diff":
            layer, _, i = name.rpartition("/")
            got = net.params[layer][int(i)].diff
        else:
            continue
        scale = max(float(np.max(np.abs(want))), 1e-12)
        err = float(np.max(np.abs(np.asarray(got) - want))) / scale
        assert err <= 1e-4, f"{key}: relative error {err:.3g}"


def test_lenet_snapshot_equals_caffe_bytes(tmp_path, golden_dir, monkeypatch):
    """Caffe's trained LeNet loaded and written back: the caffemodel is byte-identical to
    lenet_sgd_trained.caffemodel, and restoring Caffe's solverstate and snapshotting at the same
    prefix reproduces lenet_sgd_iter_40.solverstate byte for byte."""
    _need_lenet(golden_dir)
    solver = lenet_solver(tmp_path, "sgd", golden_dir)
    solver.restore(str(golden_dir / "lenet_sgd_iter_40.solverstate"))
    assert solver.iter == 40
    monkeypatch.chdir(tmp_path)
    model, state = solver.snapshot()
    assert (model, state) == ("lenet_sgd_iter_40.caffemodel", "lenet_sgd_iter_40.solverstate")
    assert Path(model).read_bytes() == (golden_dir / "lenet_sgd_trained.caffemodel").read_bytes()
    assert Path(state).read_bytes() == (golden_dir / "lenet_sgd_iter_40.solverstate").read_bytes()


def test_lenet_resume_from_caffe_state_continues(tmp_path, golden_dir, lenet_data):
    """Caffe's state after 40 SGD iterations restores (weights, momentum, iter) and the next
    step is w − (μ·h + lr(40)·lr_mult·(g + wd·w)) with Caffe's momentum h."""
    _need_lenet(golden_dir)
    solver = lenet_solver(tmp_path, "sgd", golden_dir)
    solver.restore(str(golden_dir / "lenet_sgd_iter_40.solverstate"))
    assert solver.iter == 40
    net = solver.net
    ref = np.load(golden_dir / "lenet_run_sgd.npz")
    for layer in LAYERS:
        for i, blob in enumerate(net.params[layer]):
            np.testing.assert_array_equal(blob.data, ref[f"final/{layer}/{i}"])
    feeder = BatchFeeder(net, *lenet_data)
    feeder.served = list(range(40))
    net.clear_param_diffs()
    net.forward_backward()
    weights = [p.data.astype(np.float64) for p in net.learnable_params]
    gradients = [p.diff.astype(np.float64) for p in net.learnable_params]
    history = [h.data.astype(np.float64) for h in solver.history]
    rate = 0.01 * (1 + 1e-4 * 40) ** -0.75
    feeder.served = list(range(40))
    solver.step(1)
    for k, blob in enumerate(net.learnable_params):
        lr = rate * net.params_lr[k]
        want = weights[k] - (0.9 * history[k] + lr * (gradients[k] + 5e-4 * weights[k]))
        np.testing.assert_allclose(blob.data, want, rtol=1e-5, atol=1e-7)
