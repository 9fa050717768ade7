"""Solver unit tests on a tiny net (Input → InnerProduct → EuclideanLoss), checked against a
NumPy re-derivation of Caffe's update rules: loss = Σ(xWᵀ + b − y)²/(2N), so
dW = rᵀx/N and db = Σr/N with r = xWᵀ + b − y.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

import netengine
from netengine.errors import SolverError
from netengine.layers import REGISTRY, layer_type_list
from netengine.proto import caffe_pb2
from netengine.solvers import (
    SOLVERS,
    AdaDeltaSolver,
    AdamSolver,
    SGDSolver,
    get_solver,
    lr_policy,
    read_solver_param,
)
from netengine.solvers import solver as solver_module

TINY_NET = """name: "tiny"
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: {n} dim: 3 }} }} }}
layer {{ name: "y" type: "Input" top: "y" input_param {{ shape {{ dim: {n} dim: 2 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  param {{ lr_mult: {lr_w} decay_mult: {dm_w} }} param {{ lr_mult: {lr_b} decay_mult: {dm_b} }}
  inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.5 }}
    bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }}
"""


def need_layers(*types: str) -> None:
    layer_type_list()
    missing = [t for t in types if t not in REGISTRY]
    if missing:
        pytest.skip(f"layer type(s) not implemented yet: {missing}")


def write_tiny(folder: Path, *, n: int = 4, lr_w: float = 1, lr_b: float = 2, dm_w: float = 1,
               dm_b: float = 0, name: str = "tiny_net.prototxt") -> Path:
    need_layers("Input", "InnerProduct", "EuclideanLoss")
    path = folder / name
    path.write_text(TINY_NET.format(n=n, lr_w=lr_w, lr_b=lr_b, dm_w=dm_w, dm_b=dm_b))
    return path


def tiny_data(n_batches: int, n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_batches, n, 3)).astype(np.float32),
            rng.normal(size=(n_batches, n, 2)).astype(np.float32))


class Feeder:
    """before_forward callback: writes batch k (cyclic) before every forward pass."""

    def __init__(self, net, xs, ys) -> None:
        self.net, self.xs, self.ys, self.k = net, xs, ys, 0
        net.before_forward(self)

    def __call__(self, layer_index: int) -> None:
        if layer_index == 0:
            k = self.k % len(self.xs)
            self.net.blobs["x"].data[...] = self.xs[k]
            self.net.blobs["y"].data[...] = self.ys[k]
            self.k += 1


def tiny_solver(folder: Path, solver_text: str, *, net_kwargs=None, batches: int = 8,
                seed: int = 0, cls=None):
    net = write_tiny(folder, **(net_kwargs or {}))
    path = folder / "solver.prototxt"
    path.write_text(f'net: "{net}"\n' + solver_text)
    solver = (cls or get_solver)(str(path))
    n = (net_kwargs or {}).get("n", 4)
    xs, ys = tiny_data(batches, n, seed)
    feeder = Feeder(solver.net, xs, ys)
    return solver, feeder


# -- a NumPy reference of Caffe's solver -------------------------------------------------------------
def grads(w, b, x, y):
    r = x @ w.T + b - y
    n = x.shape[0]
    return r.T @ x / n, r.sum(0) / n, float((r ** 2).sum() / (2 * n))


def reference_run(kind: str, w, b, xs, ys, steps: int, *, base_lr=0.1, momentum=0.0,
                  momentum2=0.999, delta=1e-8, rms_decay=0.99, weight_decay=0.0, reg="L2",
                  lr_mult=(1.0, 2.0), decay_mult=(1.0, 0.0), iter_size=1, clip=-1.0,
                  rate_fn=None):
    params = [w.astype(np.float64), b.astype(np.float64)]
    h = [np.zeros_like(p) for p in params]
    h2 = [np.zeros_like(p) for p in params]
    k = 0
    losses = []
    for it in range(steps):
        acc = [np.zeros_like(p) for p in params]
        loss = 0.0
        for _ in range(iter_size):
            gw, gb, lo = grads(params[0], params[1], xs[k % len(xs)], ys[k % len(ys)])
            k += 1
            acc[0] += gw
            acc[1] += gb
            loss += lo
        losses.append(loss / iter_size)
        if clip >= 0:
            norm = math.sqrt(sum(float((a ** 2).sum()) for a in acc))
            if norm > clip:
                acc = [a * (clip / norm) for a in acc]
        rate = rate_fn(it) if rate_fn else base_lr
        for i, p in enumerate(params):
            g = acc[i] / iter_size
            decay = weight_decay * decay_mult[i]
            g = g + decay * (p if reg == "L2" else np.sign(p))
            lr = rate * lr_mult[i]
            if kind == "SGD":
                h[i] = momentum * h[i] + lr * g
                step = h[i]
            elif kind == "Nesterov":
                old = h[i].copy()
                h[i] = momentum * h[i] + lr * g
                step = (1 + momentum) * h[i] - momentum * old
            elif kind == "AdaGrad":
                h[i] = h[i] + g * g
                step = lr * g / (np.sqrt(h[i]) + delta)
            elif kind == "RMSProp":
                h[i] = rms_decay * h[i] + (1 - rms_decay) * g * g
                step = lr * g / (np.sqrt(h[i]) + delta)
            elif kind == "AdaDelta":
                h[i] = momentum * h[i] + (1 - momentum) * g * g
                d = g * np.sqrt((h2[i] + delta) / (h[i] + delta))
                h2[i] = momentum * h2[i] + (1 - momentum) * d * d
                step = lr * d
            elif kind == "Adam":
                t = it + 1
                h[i] = momentum * h[i] + (1 - momentum) * g
                h2[i] = momentum2 * h2[i] + (1 - momentum2) * g * g
                step = lr * math.sqrt(1 - momentum2 ** t) / (1 - momentum ** t) * h[i] / (
                    np.sqrt(h2[i]) + delta)
            else:
                raise ValueError(kind)
            params[i] = p - step
    return params, h, h2, losses


def initial(solver):
    return [p.data.copy() for p in solver.net.learnable_params]


SETTINGS = {
    "SGD": dict(momentum=0.9),
    "Nesterov": dict(momentum=0.9),
    "AdaGrad": dict(),
    "RMSProp": dict(rms_decay=0.9),
    "AdaDelta": dict(momentum=0.95, delta=1e-6, base_lr=1.0),
    "Adam": dict(momentum=0.9, momentum2=0.999, base_lr=0.01),
}


def solver_text(kind: str, **extra) -> str:
    settings = {"base_lr": 0.1, **SETTINGS[kind], **extra}
    lines = [f'type: "{kind}"', 'lr_policy: "fixed"', "max_iter: 100", "random_seed: 7",
             "snapshot_after_train: false"]
    for key, value in settings.items():
        lines.append(f'{key}: "{value}"' if isinstance(value, str) else f"{key}: {value}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_update_rules_match_reference(kind, tmp_path):
    solver, feeder = tiny_solver(tmp_path, solver_text(kind, weight_decay=0.01))
    assert type(solver) is SOLVERS[kind]
    w, b = initial(solver)
    ref, h, h2, losses = reference_run(kind, w, b, feeder.xs, feeder.ys, 4, weight_decay=0.01,
                                       **{"base_lr": 0.1, **SETTINGS[kind]})
    got_losses = []
    for _ in range(4):
        solver.step(1)
        got_losses.append(solver.smoothed_loss)
    for got, want in zip(solver.net.learnable_params, ref):
        np.testing.assert_allclose(got.data, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got_losses, losses, rtol=1e-5)
    assert solver.iter == 4
    # history layout: one set per param, a second full set for AdaDelta and Adam
    sets = 2 if kind in ("AdaDelta", "Adam") else 1
    assert len(solver.history) == 2 * sets
    np.testing.assert_allclose(solver.history[0].data, h[0], rtol=2e-5, atol=1e-6)
    if sets == 2:
        np.testing.assert_allclose(solver.history[2].data, h2[0], rtol=2e-5, atol=1e-7)


def test_first_step_by_hand_sgd(tmp_path):
    """One step: w1 = w0 − lr·lr_mult·(g + wd·decay_mult·w0); biases: lr_mult 2, decay_mult 0."""
    solver, feeder = tiny_solver(tmp_path, solver_text("SGD", weight_decay=0.1))
    w0, b0 = initial(solver)
    gw, gb, _ = grads(w0.astype(np.float64), b0.astype(np.float64), feeder.xs[0], feeder.ys[0])
    solver.step(1)
    np.testing.assert_allclose(solver.net.params["ip"][0].data, w0 - 0.1 * (gw + 0.1 * w0),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(solver.net.params["ip"][1].data, b0 - 0.2 * gb, rtol=1e-6,
                               atol=1e-7)
    # the diff holds the step that was subtracted (Caffe leaves it there)
    np.testing.assert_allclose(solver.net.params["ip"][1].diff, 0.2 * gb, rtol=1e-6, atol=1e-7)


def test_lr_mult_and_decay_mult(tmp_path):
    solver, feeder = tiny_solver(tmp_path, solver_text("SGD", weight_decay=0.05),
                                 net_kwargs=dict(lr_w=0.5, lr_b=0, dm_w=2, dm_b=1))
    w, b = initial(solver)
    ref, *_ = reference_run("SGD", w, b, feeder.xs, feeder.ys, 3, momentum=0.9,
                            weight_decay=0.05, lr_mult=(0.5, 0.0), decay_mult=(2.0, 1.0))
    solver.step(3)
    np.testing.assert_allclose(solver.net.params["ip"][0].data, ref[0], rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(solver.net.params["ip"][1].data, b)  # lr_mult 0: frozen


def test_l1_regularization(tmp_path):
    text = solver_text("SGD", weight_decay=0.05, regularization_type="L1")
    solver, feeder = tiny_solver(tmp_path, text, net_kwargs=dict(dm_b=1))
    w, b = initial(solver)
    ref, *_ = reference_run("SGD", w, b, feeder.xs, feeder.ys, 3, momentum=0.9,
                            weight_decay=0.05, reg="L1", decay_mult=(1.0, 1.0))
    solver.step(3)
    for got, want in zip(solver.net.learnable_params, ref):
        np.testing.assert_allclose(got.data, want, rtol=2e-5, atol=1e-7)


def test_clip_gradients_before_iter_size_normalisation(tmp_path):
    """The L2 norm compared with clip_gradients is that of the *accumulated* gradient."""
    solver, feeder = tiny_solver(tmp_path, solver_text("SGD", clip_gradients=0.3, iter_size=2))
    w, b = initial(solver)
    ref, *_ = reference_run("SGD", w, b, feeder.xs, feeder.ys, 3, momentum=0.9, iter_size=2,
                            clip=0.3)
    solver.step(3)
    for got, want in zip(solver.net.learnable_params, ref):
        np.testing.assert_allclose(got.data, want, rtol=2e-5, atol=1e-7)
    # clipping after normalisation would have given different weights
    other, *_ = reference_run("SGD", w, b, feeder.xs, feeder.ys, 3, momentum=0.9, iter_size=2,
                              clip=0.15)
    assert not np.allclose(other[0], ref[0], rtol=1e-4)


def test_iter_size_equals_bigger_batch(tmp_path):
    """iter_size 2 on batches of 4 ≡ iter_size 1 on the same 8 items in one batch."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    small, feed_small = tiny_solver(a_dir, solver_text("SGD", iter_size=2, weight_decay=0.01))
    big, feed_big = tiny_solver(b_dir, solver_text("SGD", weight_decay=0.01),
                                net_kwargs=dict(n=8))
    for mine, theirs in zip(big.net.learnable_params, small.net.learnable_params):
        mine.data[...] = theirs.data
    feed_big.xs = feed_small.xs.reshape(-1, 8, 3)
    feed_big.ys = feed_small.ys.reshape(-1, 8, 2)
    losses_small, losses_big = [], []
    for _ in range(3):
        small.step(1)
        big.step(1)
        losses_small.append(small.smoothed_loss)
        losses_big.append(big.smoothed_loss)
    np.testing.assert_allclose(losses_small, losses_big, rtol=1e-5)
    for p, q in zip(small.net.learnable_params, big.net.learnable_params):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-7)
    assert feed_small.k == 6 and feed_big.k == 3  # iter_size forwards per iteration


@pytest.mark.parametrize("policy,extra,formula", [
    ("fixed", {}, lambda it: 0.1),
    ("step", {"gamma": 0.5, "stepsize": 3}, lambda it: 0.1 * 0.5 ** (it // 3)),
    ("exp", {"gamma": 0.9}, lambda it: 0.1 * 0.9 ** it),
    ("inv", {"gamma": 1e-1, "power": 0.75}, lambda it: 0.1 * (1 + 0.1 * it) ** -0.75),
    ("poly", {"power": 2.0, "max_iter": 10}, lambda it: 0.1 * (1 - it / 10) ** 2),
    ("sigmoid", {"gamma": -0.5, "stepsize": 4},
     lambda it: 0.1 / (1 + math.exp(0.5 * (it - 4)))),
])
def test_lr_policies(policy, extra, formula):
    param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy=policy, max_iter=100)
    for key, value in extra.items():
        setattr(param, key, value)
    for it in (0, 1, 2, 3, 5, 7, 9):
        rate, _ = lr_policy.learning_rate(param, it, 0)
        assert rate == pytest.approx(formula(it), rel=1e-6), (policy, it)


def test_lr_poly_past_max_iter_is_nan_as_in_c():
    param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="poly", power=0.5, max_iter=5)
    assert math.isnan(lr_policy.learning_rate(param, 8, 0)[0])
    param.power = 2.0  # an integer power stays real
    assert lr_policy.learning_rate(param, 8, 0)[0] == pytest.approx(0.1 * 0.36)


def test_lr_multistep_keeps_current_step():
    param = caffe_pb2.SolverParameter(base_lr=1.0, lr_policy="multistep", gamma=0.1,
                                      stepvalue=[2, 3, 6])
    step, rates = 0, []
    for it in range(8):
        rate, step = lr_policy.learning_rate(param, it, step)
        rates.append(rate)
    assert rates == pytest.approx([1, 1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001])
    assert step == 3
    # resuming mid-way from a stored current_step continues the same schedule
    assert lr_policy.learning_rate(param, 4, 2)[0] == pytest.approx(0.01)


def test_lr_policy_errors():
    with pytest.raises(SolverError, match="unknown lr_policy 'invv'"):
        lr_policy.check(caffe_pb2.SolverParameter(lr_policy="invv"))
    with pytest.raises(SolverError, match="stepsize > 0"):
        lr_policy.check(caffe_pb2.SolverParameter(lr_policy="step"))


def test_solver_uses_policy_and_multistep_state(tmp_path):
    text = solver_text("SGD").replace('lr_policy: "fixed"', 'lr_policy: "multistep"')
    text += "gamma: 0.5\nstepvalue: 1\nstepvalue: 2\n"
    solver, feeder = tiny_solver(tmp_path, text)
    w, b = initial(solver)
    ref, *_ = reference_run("SGD", w, b, feeder.xs, feeder.ys, 4, momentum=0.9,
                            rate_fn=lambda it: 0.1 * 0.5 ** min(it, 2))
    solver.step(4)
    assert solver.current_step == 2
    for got, want in zip(solver.net.learnable_params, ref):
        np.testing.assert_allclose(got.data, want, rtol=2e-5, atol=1e-7)


def test_average_loss_smoothing(tmp_path):
    solver, feeder = tiny_solver(tmp_path, solver_text("SGD", average_loss=3, base_lr=0.0))
    w, b = initial(solver)
    raw = [grads(w.astype(np.float64), b.astype(np.float64), feeder.xs[k], feeder.ys[k])[2]
           for k in range(5)]
    solver.step(5)
    assert solver.smoothed_loss == pytest.approx(np.mean(raw[2:5]), rel=1e-5)


def test_step_ignores_max_iter_and_solve_stops_there(tmp_path):
    solver, _ = tiny_solver(tmp_path, solver_text("SGD").replace("max_iter: 100", "max_iter: 2"))
    solver.step(3)
    assert solver.iter == 3
    solver.solve()  # already past max_iter: nothing to do
    assert solver.iter == 3
    again, _ = tiny_solver(tmp_path, solver_text("SGD").replace("max_iter: 100", "max_iter: 2"))
    again.solve()
    assert again.iter == 2


def test_callbacks_run_in_order(tmp_path):
    solver, feeder = tiny_solver(tmp_path, solver_text("SGD"))
    events = []
    solver.add_callback(lambda: events.append(("start", solver.iter, feeder.k)),
                        lambda: events.append(("gradients", solver.iter, feeder.k)))
    solver.step(2)
    assert events == [("start", 0, 0), ("gradients", 0, 1), ("start", 1, 1),
                      ("gradients", 1, 2)]


def test_test_nets_share_weights_and_average_outputs(tmp_path):
    text = solver_text("SGD") + "test_iter: 3\ntest_interval: 2\ntest_initialization: false\n"
    solver, _ = tiny_solver(tmp_path, text)
    assert len(solver.test_nets) == 1
    test_net = solver.test_nets[0]
    assert test_net.phase == netengine.TEST
    for mine, theirs in zip(test_net.params["ip"], solver.net.params["ip"]):
        assert np.shares_memory(mine.data, theirs.data)
    xs, ys = tiny_data(6, seed=3)
    test_feed = Feeder(test_net, xs, ys)
    solver.step(5)  # tests at iterations 2 and 4 (not 0: test_initialization false)
    assert test_feed.k == 6
    w, b = (p.data.astype(np.float64) for p in solver.net.learnable_params)
    results = solver.test_all()
    expected = np.mean([grads(w, b, xs[k], ys[k])[2] for k in range(3)])
    assert results[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_test_state_and_stages(tmp_path):
    need_layers("Input", "InnerProduct", "EuclideanLoss")
    net = tmp_path / "staged.prototxt"
    net.write_text(TINY_NET.format(n=4, lr_w=1, lr_b=2, dm_w=1, dm_b=0) + """
layer { name: "extra" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "extra"
  include { stage: "deep" } }
layer { name: "lvl" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "lvl"
  include { min_level: 2 } }
""")
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{net}"\n' + solver_text("SGD") + """test_iter: 1
test_iter: 1
test_interval: 10
test_state { stage: "deep" }
test_state { level: 3 }
train_state { level: 2 }
""")
    solver = get_solver(str(path))
    assert "lvl" in solver.net.layer_dict and "extra" not in solver.net.layer_dict
    assert "extra" in solver.test_nets[0].layer_dict
    assert "lvl" not in solver.test_nets[0].layer_dict
    assert "lvl" in solver.test_nets[1].layer_dict
    assert all(n.phase == netengine.TEST for n in solver.test_nets)


def test_deprecated_solver_type_enum(tmp_path):
    solver, _ = tiny_solver(tmp_path, solver_text("SGD").replace('type: "SGD"',
                                                               "solver_type: ADAM"))
    assert isinstance(solver, AdamSolver)
    assert solver.param.type == "Adam"


def test_pycaffe_constructors_and_lazy_exports(tmp_path):
    net = write_tiny(tmp_path)
    path = tmp_path / "s.prototxt"
    path.write_text(f'net: "{net}"\n' + solver_text("SGD"))
    assert isinstance(netengine.AdaDeltaSolver(str(path)), AdaDeltaSolver)
    assert isinstance(netengine.SGDSolver(str(path)), SGDSolver)
    assert isinstance(netengine.get_solver(str(path)), SGDSolver)


def test_relative_net_path_resolves_against_solver_folder(tmp_path, monkeypatch):
    folder = tmp_path / "exp"
    folder.mkdir()
    write_tiny(folder)
    (folder / "solver.prototxt").write_text('net: "tiny_net.prototxt"\n' + solver_text("SGD"))
    monkeypatch.chdir(tmp_path)
    solver = get_solver("exp/solver.prototxt")
    assert solver.net.name == "tiny"
    assert solver.param.snapshot_prefix == str(Path("exp/solver"))  # Caffe's default prefix


def test_snapshot_prefix_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "snaps").mkdir()
    (tmp_path / "my_solver.prototxt").write_text('net: "n.prototxt"\nsnapshot_prefix: "snaps"\n')
    assert read_solver_param("my_solver.prototxt").snapshot_prefix == str(Path("snaps/my_solver"))


@pytest.mark.parametrize("text,match", [
    ('type: "Adagrad"\nbase_lr: 0.1\nlr_policy: "fixed"\n', "did you mean 'AdaGrad'"),
    ('type: "AdaGrad"\nmomentum: 0.9\nlr_policy: "fixed"\n', "AdaGrad cannot use momentum"),
    ('type: "RMSProp"\nrms_decay: 1.5\nlr_policy: "fixed"\n', "rms_decay must be in"),
    ('lr_policy: "fixed"\ntest_iter: 2\n', "need test_interval > 0"),
    ('lr_policy: "fixed"\niter_size: 0\n', "iter_size must be >= 1"),
    ('lr_policy: "fixed"\nregularization_type: "L3"\n', "unknown regularization_type"),
    ('lr_policy: "step"\n', "stepsize > 0"),
    ('lr_policy: "fixed"\ntest_net: "a.prototxt"\n', "test_iter must be given once per"),
])
def test_solver_errors_are_one_line(tmp_path, text, match):
    net = write_tiny(tmp_path)
    path = tmp_path / "s.prototxt"
    path.write_text(f'net: "{net}"\n' + text)
    with pytest.raises(SolverError, match=match) as info:
        get_solver(str(path))
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_train_net_must_be_given_once(tmp_path, monkeypatch):
    net = write_tiny(tmp_path)
    path = tmp_path / "s.prototxt"
    path.write_text('lr_policy: "fixed"\n')
    with pytest.raises(SolverError, match="names no train net"):
        get_solver(str(path))
    path.write_text(f'net: "{net}"\ntrain_net: "{net}"\nlr_policy: "fixed"\n')
    with pytest.raises(SolverError, match="more than one train net"):
        get_solver(str(path))
    path.write_text('net: "missing.prototxt"\nlr_policy: "fixed"\n')
    with pytest.raises(SolverError, match="net file not found: missing.prototxt") as info:
        get_solver(str(path))
    assert f"(looked in {Path.cwd()} and {tmp_path.resolve()})" in str(info.value)
    monkeypatch.chdir(tmp_path)  # one folder is named once
    with pytest.raises(SolverError, match=rf"\(looked in {re.escape(str(tmp_path.resolve()))}\)"):
        get_solver("s.prototxt")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # NumPy's overflow noise stays out
def test_nan_loss_stops_with_iteration(tmp_path):
    solver, feeder = tiny_solver(tmp_path, solver_text("SGD", base_lr=1e30))
    with pytest.raises(SolverError, match=r"iteration \d+: the loss is (nan|inf)"):
        solver.step(20)


def test_multistep_logs_its_status_when_the_step_advances(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(solver_module.log, "info", lambda msg, *a, **k: lines.append(msg % a))
    solver, _ = tiny_solver(tmp_path, solver_text("SGD") + 'lr_policy: "multistep"\n'
                            "gamma: 0.5\nstepvalue: 2\nstepvalue: 4\n")
    solver.step(5)
    assert [ln for ln in lines if ln.startswith("MultiStep")] == [
        "MultiStep Status: Iteration 2, step = 1", "MultiStep Status: Iteration 4, step = 2"]


def test_inline_net_param_and_train_state(tmp_path):
    need_layers("Input", "InnerProduct", "EuclideanLoss")
    param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed")
    from netengine.formats.prototxt import parse_text

    parse_text(TINY_NET.format(n=4, lr_w=1, lr_b=2, dm_w=1, dm_b=0), param.net_param)
    solver = get_solver(param)
    assert solver.net.phase == netengine.TRAIN
    assert solver.net.name == "tiny"


def test_random_seed_rederived_every_iteration(tmp_path):
    """Random draws inside an iteration depend only on (random_seed, iter), so a resumed run
    draws what the uninterrupted one did."""
    solver, _ = tiny_solver(tmp_path, solver_text("SGD"))
    record = []
    solver.net.before_forward(
        lambda i: record.append((solver.iter, netengine.backend.rng().random())) if i == 0
        else None)
    solver.step(3)
    netengine.set_random_seed(999)  # whatever happened in between
    solver.iter = 1
    solver.step(1)
    assert record[3] == record[1]
    assert len({value for _, value in record[:3]}) == 3


@pytest.fixture
def fake_gpu(monkeypatch):
    """GPU mode on tests/fake_cupy.py (NumPy underneath, CuPy's rules on top)."""
    fake_cupy = pytest.importorskip("fake_cupy").cupy
    monkeypatch.setattr(netengine.backend, "_import_cupy", lambda: fake_cupy)
    netengine.set_mode_gpu()
    yield fake_cupy
    netengine.set_mode_cpu()


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_update_rules_on_the_gpu_path(kind, tmp_path, fake_gpu):
    """Every rule, L1, clipping, iter_size, snapshot and restore run through CuPy's API."""
    text = solver_text(kind, weight_decay=0.01, regularization_type="L1", clip_gradients=0.5,
                       iter_size=2) + f'snapshot_prefix: "{tmp_path / "g"}"\n'
    solver, feeder = tiny_solver(tmp_path, text)
    assert solver.net.learnable_params[0].xp is fake_gpu
    w, b = (netengine.backend.to_host(p.data).copy() for p in solver.net.learnable_params)
    ref, *_ = reference_run(kind, w, b, feeder.xs, feeder.ys, 3, weight_decay=0.01, reg="L1",
                            clip=0.5, iter_size=2, **{"base_lr": 0.1, **SETTINGS[kind]})
    solver.step(3)
    for got, want in zip(solver.net.learnable_params, ref):
        np.testing.assert_allclose(netengine.backend.to_host(got.data), want, rtol=2e-5,
                                   atol=1e-6)
    _, state = solver.snapshot()
    again, _ = tiny_solver(tmp_path, text)
    again.restore(state)
    for mine, theirs in zip(again.history, solver.history):
        np.testing.assert_array_equal(netengine.backend.to_host(mine.data),
                                      netengine.backend.to_host(theirs.data))


def test_test_iter_zero_runs_an_empty_test_as_caffe(tmp_path):
    net = write_tiny(tmp_path)
    path = tmp_path / "s.prototxt"
    path.write_text(f'net: "{net}"\nlr_policy: "fixed"\nbase_lr: 0.01\ntest_iter: 0\n'
                    'test_interval: 1\n')
    solver = get_solver(str(path))
    feeder = Feeder(solver.net, *tiny_data(2))
    solver.step(2)
    assert solver.test_all() == [{}] and feeder.k == 2  # no test batch was run


def test_unwritable_snapshot_prefix_fails_before_training(tmp_path):
    net = write_tiny(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    path = tmp_path / "s.prototxt"
    path.write_text(f'net: "{net}"\nlr_policy: "fixed"\nbase_lr: 0.01\nmax_iter: 3\n'
                    f'snapshot_prefix: "{blocker}/lenet"\n')
    solver = get_solver(str(path))  # constructing is fine (pycaffe may only step)
    with pytest.raises(SolverError, match="cannot write to snapshot_prefix .*not_a_folder"):
        solver.solve()
    assert solver.iter == 0
    made = tmp_path / "new" / "deeper"
    path.write_text(path.read_text().replace(f"{blocker}/lenet", f"{made}/lenet"))
    get_solver(str(path)).solve()  # a missing folder is made, as a snapshot would make it
    assert (made / "lenet_iter_3.caffemodel").exists() and not list(made.glob(".write_probe*"))


def test_errors_in_a_net_inside_the_solver_file_name_that_file(tmp_path):
    path = tmp_path / "consolidated.prototxt"
    path.write_text('lr_policy: "fixed"\nnet_param { layer { name: "x" type: "Input" top: "x" '
                    'input_param { shape { dim: 2 } } }\n'
                    'layer { name: "bad" type: "Flatten" bottom: "nowhere" top: "y" } }\n')
    with pytest.raises(netengine.NetEngineError,
                       match=r"consolidated\.prototxt: layer 'bad' \(Flatten\): unknown bottom"):
        get_solver(str(path))


def test_debug_info_lines_on_display_iterations(tmp_path, monkeypatch):
    from netengine import net as net_module

    lines = []
    monkeypatch.setattr(net_module.log, "info", lambda msg, *a, **k: lines.append(msg % a))
    solver, _ = tiny_solver(tmp_path, solver_text("SGD") + "debug_info: true\ndisplay: 2\n")
    solver.step(3)
    forward = [ln for ln in lines if "[Forward]" in ln]
    backward = [ln for ln in lines if "[Backward]" in ln]
    update = [ln for ln in lines if "[Update]" in ln]
    # iterations 0 and 2 only; the tiny net's ip layer: its top and its two params
    assert len(update) == 2 * 2 and len(forward) == 2 * 6  # tops x, y, ip, loss; 2 params
    assert any(ln.startswith("    [Forward] Layer ip, param blob 0 data: ") for ln in forward)
    assert any(ln.startswith("    [Backward] Layer ip, param blob 1 diff: ") for ln in backward)
    assert update[0].startswith("    [Update] Layer ip, param 0 data: ") and "; diff: " in update[0]
    value = float(forward[0].rsplit(": ", 1)[1])
    assert value > 0
    lines.clear()
    solver.param.debug_info = False
    solver.step(2)
    assert not [ln for ln in lines if "[Forward]" in ln]
