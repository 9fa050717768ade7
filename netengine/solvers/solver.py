"""Solvers with Caffe's semantics, shaped like pycaffe's.

The step loop every solver type shares (Caffe's Solver): ``get_solver(path)`` (in
:mod:`netengine.solvers.sgd`) returns the solver a prototxt's ``type`` names. Then ``solver.net``
(TRAIN net), ``solver.test_nets``, ``solver.step(n)``, ``solver.solve(resume_file)``,
``solver.iter``, ``solver.snapshot()``, ``solver.restore(path)``,
``solver.add_callback(on_start, on_gradients)``, ``solver.test_all()``.

One iteration (Caffe's Solver::Step):

1. zero the param diffs; run the test nets when ``iter % test_interval == 0`` (and
   ``iter > 0`` or ``test_initialization``);
2. loss = mean over ``iter_size`` forward/backward passes (param diffs accumulate);
   smoothed over the last ``average_loss`` iterations for display;
3. update (``apply_update``): rate from ``lr_policy`` at the 0-based iteration; clip the
   *accumulated* gradient to L2 norm ``clip_gradients``; per learnable param: normalise by
   1/iter_size, regularise (L2: g += wd·decay_mult·w, L1: g += wd·decay_mult·sign(w)), then the
   solver type's rule (:meth:`Solver.compute_update_value`, the one override point) leaves the
   step in the diff, and the net does w -= diff;
4. iter += 1; snapshot every ``snapshot`` iterations or on request (SIGHUP by default).

The update rules of the SGD family live in :mod:`netengine.solvers.sgd`.

Reproducibility and resume. With ``random_seed >= 0`` the seed is set before the nets are built
(fillers) and *re-derived at the start of every iteration* from (random_seed, iter), so Dropout
and other random layers draw the same numbers whether a run went straight through or was
resumed from a snapshot. Data layers that offer ``seek(batch_index)`` are moved on restore to
the batch the interrupted run would have served next: ``iter·iter_size`` for the train net,
``tests_done·test_iter[i]`` for test net i. So N iterations + snapshot + resume + N iterations
give bit-identical weights to 2N iterations in one go (Caffe restarts its data cursor instead).

Data-parallel runs (:mod:`netengine.parallel`, under mpiexec) replace ``solver.sync`` (a
:class:`LocalSync` here: one process, nothing to share) with hooks that average the loss, the
gradients (before the update), the displayed and test outputs, and BatchNorm-like statistics
(before tests and snapshots); the solver never imports them.

Deviations from Caffe, on purpose: a NaN or infinite loss stops training with a SolverError
naming the iteration (Caffe trains on); a "stop" request (SIGINT by default) always snapshots
before stopping (Caffe only does when ``snapshot_after_train`` is true).
"""
from __future__ import annotations

import glob
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from netengine import backend
from netengine.blob import Blob
from netengine.data.sources import add_search_dir
from netengine.errors import NetEngineError, SolverError
from netengine.formats import snapshot, upgrade
from netengine.formats.prototxt import atomic_group, read_text_proto, temporary_prefix
from netengine.logging_glog import at, fmt
from netengine.net import Net
from netengine.proto import caffe_pb2
from netengine.solvers import lr_policy

log = logging.getLogger("netengine.solver")

ACTIONS = ("none", "stop", "snapshot")


# -- reading a solver file ------------------------------------------------------------------------

def read_solver_param(path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    """Parse a solver prototxt, upgrade ``solver_type`` and default ``snapshot_prefix``.

    snapshot_prefix, as Caffe: unset → the solver file's path without its extension; naming an
    existing directory → that directory / the solver file's stem.
    """
    param, _ = read_text_proto(path, caffe_pb2.SolverParameter())
    upgrade.upgrade_solver(param, file=str(path))
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = str(Path(path).with_suffix(""))
    else:
        _check_snapshot_prefix_name(param.snapshot_prefix, path)
        if param.snapshot_prefix and Path(param.snapshot_prefix).is_dir():
            param.snapshot_prefix = str(Path(param.snapshot_prefix) / Path(path).stem)
    return param


# Room a snapshot's name needs after the prefix and around it for its temporary file
# ("._iter_<10 digits>.solverstate.h5.<8 random>.tmp"), within the usual file-system limits.
_NAME_MAX, _PATH_MAX, _SNAPSHOT_ROOM = 255, 4096, 50


def _check_snapshot_prefix_name(prefix: str, solver_file) -> None:
    """Refuse a snapshot_prefix no file system can hold (before training, not at the first
    snapshot): a NUL byte, a name part or a whole path that is too long."""
    longest = max((len(part.encode()) for part in Path(prefix).parts), default=0)
    problem = None
    if "\0" in prefix:
        problem = "contains a NUL character"
    elif longest > _NAME_MAX - _SNAPSHOT_ROOM:
        problem = (f"has a name part of {longest} bytes; at most "
                   f"{_NAME_MAX - _SNAPSHOT_ROOM} fit with the '_iter_N.solverstate' ending")
    elif len(prefix.encode()) > _PATH_MAX - _SNAPSHOT_ROOM:
        problem = (f"is {len(prefix.encode())} bytes long; at most "
                   f"{_PATH_MAX - _SNAPSHOT_ROOM} fit in a path")
    if problem:
        raise SolverError(f"snapshot_prefix {problem}: expected a folder and a file stem, e.g. "
                          "'snapshots/lenet'", file=str(solver_file))


def _mixed_seed(seed: int, iteration: int) -> int:
    """A per-iteration seed derived from (random_seed, iter), independent across iterations."""
    return int(np.random.SeedSequence([int(seed), int(iteration)]).generate_state(1)[0])


class LocalSync:
    """The hooks a data-parallel run replaces (:class:`netengine.parallel.DataParallel`), as
    one process has them: nothing to share. ``solver.sync`` holds one of these."""

    rank, size, is_root = 0, 1, True

    def reduce_loss(self, loss: float) -> float:
        return loss

    def reduce_gradients(self, net: Net) -> None:
        pass

    def reduce_outputs(self, net: Net) -> dict | None:
        return None  # the display reads the net's own output blobs

    def test_batches(self, net: Net, first: int, count: int):
        """One flag per round of a test: True runs a batch, False only polls the signals."""
        return [True] * count

    def reduce_test(self, net: Net, sums: dict, loss: float) -> tuple[dict, float]:
        return sums, loss

    def average_stats(self, net: Net) -> None:
        pass


class _Callback:
    __slots__ = ("on_start", "on_gradients")

    def __init__(self, on_start, on_gradients) -> None:
        self.on_start = on_start
        self.on_gradients = on_gradients


# -- the solver -----------------------------------------------------------------------------------
class Solver:
    """Caffe's Solver + SGDSolver machinery; subclasses define :meth:`compute_update_value`.

    ``Solver(solver, *, solver_file=None, dtype=np.float32)``: ``solver`` is a solver prototxt
    path or a SolverParameter (then relative paths resolve against ``solver_file``'s folder
    after the current directory).
    """

    type = ""
    history_sets = 1  # history blobs per learnable param (2 for AdaDelta and Adam)
    scratch_buffers = 1

    def __init__(self, solver, *, solver_file: str | os.PathLike | None = None,
                 dtype=np.float32) -> None:
        if isinstance(solver, caffe_pb2.SolverParameter):
            param = caffe_pb2.SolverParameter()
            param.CopyFrom(solver)
            upgrade.upgrade_solver(param, file=str(solver_file) if solver_file else None)
            self.solver_file = str(solver_file) if solver_file else None
        else:
            self.solver_file = str(solver)
            param = read_solver_param(solver)
        self.param = param
        self.dtype = np.dtype(dtype)
        self._base_dir = Path(self.solver_file).resolve().parent if self.solver_file else None
        if param.type and self.type and param.type != self.type and param.HasField("type"):
            log.warning("the solver file asks for type '%s'; running %s as constructed",
                        param.type, type(self).__name__, extra=at("solver.cpp:52"))
        self.iter = 0
        self.current_step = 0
        self.requested_early_exit = False
        self.smoothed_loss = 0.0
        self.test_results: list[dict] = []
        self._losses: list[float] = []
        self._start_iter = 0
        self._callbacks: list[_Callback] = []
        self._action_function: Callable[[], str] | None = None
        self._last_snapshot_iter: int | None = None
        self._timer = time.perf_counter()
        self._iters_last = 0
        self.sync = LocalSync()
        self._check()
        log.info("Initializing solver from parameters: %s",
                 text_format.MessageToString(param, as_one_line=True), extra=at("solver.cpp:48"))
        if param.random_seed >= 0:
            backend.set_random_seed(param.random_seed)
        self._add_data_search_dir()
        self.net = self._init_train_net()
        self._net_debug_info = self.net.debug_info
        self.test_nets = self._init_test_nets()
        self._load_finetune_weights()
        self._presolve()
        log.info("Solver scaffolding done.", extra=at("solver.cpp:94"))

    # -- construction --------------------------------------------------------------------------
    def _fail(self, message: str) -> SolverError:
        return SolverError(message, file=self.solver_file)

    def _check(self) -> None:
        p = self.param
        if p.iter_size < 1:
            raise self._fail(f"iter_size must be >= 1, got {p.iter_size}")
        if p.average_loss < 1:
            raise self._fail(f"average_loss must be >= 1, got {p.average_loss}")
        if p.regularization_type not in ("L2", "L1"):
            raise self._fail(f"unknown regularization_type '{p.regularization_type}'; "
                             "expected L2 or L1")
        self._check_finite()
        lr_policy.check(p, self.solver_file)
        if p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            try:
                import h5py  # noqa: F401
            except ImportError:
                raise self._fail("snapshot_format: HDF5 needs h5py (pip install "
                                 "'netengine[hdf5]'); or use BINARYPROTO") from None
        self.check_param()

    def check_param(self) -> None:
        """Type-specific checks of the solver parameters (Caffe's CHECKs in each PreSolve)."""

    def check_range(self, name: str, low: float, high: float, high_open: bool = True) -> None:
        """Refuse ``param.<name>`` outside [low, high) (or [low, high]), naming the range."""
        value = getattr(self.param, name)
        if not (low <= value < high or not high_open and value == high):
            bracket = ")" if high_open else "]"
            raise self._fail(f"{self.type or type(self).__name__} needs {name} in "
                             f"[{low:g}, {high:g}{bracket}, got {value:g}")

    def _check_finite(self) -> None:
        """Every real-valued setting must be a finite number (a NaN or inf base_lr, gamma,
        ... would only show up later as a NaN loss or an overflow)."""
        for descriptor, value in self.param.ListFields():
            if descriptor.cpp_type == descriptor.CPPTYPE_FLOAT or \
                    descriptor.cpp_type == descriptor.CPPTYPE_DOUBLE:
                values = [value] if isinstance(value, float) else list(value)
                if not all(math.isfinite(v) for v in values):
                    raise self._fail(f"{descriptor.name} must be a finite number, got "
                                     f"{', '.join(f'{v:g}' for v in values)}")

    def _add_data_search_dir(self) -> None:
        if self._base_dir is None:
            return
        add_search_dir(self._base_dir)

    def resolve_path(self, path: str, what: str = "file") -> str:
        """A relative path: the current directory first (Caffe's rule), then the solver's folder."""
        named = Path(os.path.expanduser(path))
        if named.is_absolute() or named.exists() or self._base_dir is None:
            if not named.exists():
                raise self._fail(f"{what} not found: {path}")
            return self._file(named, path, what)
        beside = self._base_dir / named
        if beside.exists():
            return self._file(beside, path, what)
        places = dict.fromkeys([str(Path.cwd()), str(self._base_dir.resolve())])
        raise self._fail(f"{what} not found: {path} (looked in {' and '.join(places)})")

    def _file(self, found: Path, path: str, what: str) -> str:
        if found.is_dir():
            raise self._fail(f"{what} '{path}' is a folder ({found.resolve()}); expected a file")
        return str(found)

    def _make_net(self, source, phase: int, override, default_phase: int, what: str) -> Net:
        """Build a net with Caffe's NetState precedence: solver default < net's own < override."""
        if isinstance(source, caffe_pb2.NetParameter):
            own_state = source.state
        else:
            message, _ = read_text_proto(source, caffe_pb2.NetParameter())
            own_state = message.state
        state = caffe_pb2.NetState(phase=default_phase)
        state.MergeFrom(own_state)
        if override is not None:
            state.MergeFrom(override)
        extra_stages = list(override.stage) if override is not None else []
        log.info("Creating %s", what, extra=at("solver.cpp:87"))
        try:
            return Net(source, state.phase, level=state.level, stages=extra_stages,
                       dtype=self.dtype)
        except NetEngineError as err:
            if isinstance(source, caffe_pb2.NetParameter):  # written inside the solver file
                raise err.with_context(file=self.solver_file) from None
            raise
        except (OSError, ValueError) as err:
            raise self._fail(f"cannot build {what}: {err}") from None

    def _init_train_net(self) -> Net:
        p = self.param
        given = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if not given:
            raise self._fail("the solver names no train net: give one of net, net_param, "
                             "train_net, train_net_param")
        if len(given) > 1:
            raise self._fail(f"the solver gives more than one train net ({', '.join(given)}); "
                             "give exactly one of net, net_param, train_net, train_net_param")
        field = given[0]
        if field.endswith("_param"):
            source, what = getattr(p, field), f"training net from {field}"
        else:
            source = self.resolve_path(getattr(p, field), "net file")
            what = f"training net from {field} file: {source}"
        override = p.train_state if p.HasField("train_state") else None
        return self._make_net(source, caffe_pb2.TRAIN, override, caffe_pb2.TRAIN, what)

    def _init_test_nets(self) -> list[Net]:
        p = self.param
        generic = p.HasField("net") + p.HasField("net_param")
        explicit = len(p.test_net_param) + len(p.test_net)
        if generic and len(p.test_iter) < explicit or not generic and \
                len(p.test_iter) != explicit:
            raise self._fail(f"test_iter must be given once per test net: {len(p.test_iter)} "
                             f"test_iter for {explicit} test_net/test_net_param")
        count = explicit + (len(p.test_iter) - explicit if generic else 0)
        if p.test_state and len(p.test_state) != count:
            raise self._fail(f"test_state must be given once per test net ({count}) or not at "
                             f"all, got {len(p.test_state)}")
        if count and p.test_interval <= 0:
            raise self._fail(f"{count} test net(s) (test_iter given) need test_interval > 0")
        sources: list[tuple[object, str]] = []
        for message in p.test_net_param:
            sources.append((message, f"test net (#{len(sources)}) specified by test_net_param"))
        for name in p.test_net:
            path = self.resolve_path(name, "test net file")
            sources.append((path, f"test net (#{len(sources)}) specified by test_net file: "
                                  f"{path}"))
        while len(sources) < count:
            if p.HasField("net_param"):
                sources.append((p.net_param, f"test net (#{len(sources)}) specified by "
                                             "net_param"))
            else:
                path = self.resolve_path(p.net, "net file")
                sources.append((path, f"test net (#{len(sources)}) specified by net file: "
                                      f"{path}"))
        nets = []
        for i, (source, what) in enumerate(sources):
            override = p.test_state[i] if p.test_state else None
            net = self._make_net(source, caffe_pb2.TEST, override, caffe_pb2.TEST, what)
            self._share_trained_layers(net)
            nets.append(net)
        return nets

    def _share_trained_layers(self, test_net: Net) -> None:
        """Make the test net's learned blobs use the train net's storage, by layer name
        (Caffe's ShareTrainedLayersWith, done once: no copies before each test)."""
        try:
            test_net.share_with(self.net)
        except NetEngineError as err:
            raise self._fail(f"sharing the train net's weights with the test net: {err}") \
                from None

    def _load_finetune_weights(self) -> None:
        for entry in self.param.weights:
            for name in filter(None, (s.strip() for s in entry.split(","))):
                path = self.resolve_path(name, "weights file")
                log.info("Finetuning from %s", path, extra=at("solver.cpp:110"))
                for net in [self.net, *self.test_nets]:
                    net.copy_from(path)

    def _presolve(self) -> None:
        params = self.net.learnable_params
        self.history: list[Blob] = [Blob(p.shape, dtype=p.dtype, xp=p.xp)
                                    for _ in range(self.history_sets) for p in params]
        biggest = max((p.count for p in params), default=1)
        xp = params[0].xp if params else backend.xp()
        dtype = params[0].dtype if params else self.dtype
        buffers = [xp.zeros(max(biggest, 1), dtype=dtype) for _ in range(self.scratch_buffers)]
        # per-param views of the shared scratch buffers (no allocation per update)
        self._scratch = [[buf[:p.count].reshape(p.shape) for buf in buffers] for p in params]

    # -- pycaffe-shaped API ----------------------------------------------------------------------
    def add_callback(self, on_start: Callable[[], None],
                     on_gradients: Callable[[], None]) -> None:
        """Call ``on_start()`` at each iteration's start (after testing) and ``on_gradients()``
        when the gradients are ready, before the update (pycaffe's add_callback)."""
        self._callbacks.append(_Callback(on_start, on_gradients))

    def set_action_function(self, function: Callable[[], str] | None) -> None:
        """``function()`` returns "none", "stop" or "snapshot"; polled between iterations and
        between test batches (Caffe's SetActionFunction, fed by the signal handler)."""
        self._action_function = function

    def _requested_action(self) -> str:
        if self._action_function is None:
            return "none"
        action = self._action_function() or "none"
        if action not in ACTIONS:
            raise SolverError(f"action function returned '{action}'; expected one of "
                              f"{', '.join(ACTIONS)}")
        return action

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations, whatever max_iter says (pycaffe's step)."""
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + int(iters)
        self._start_iter = start_iter
        self._losses = []
        self.smoothed_loss = 0.0
        self._timer = time.perf_counter()
        self._iters_last = self.iter
        net = self.net
        stopped = False
        while self.iter < stop_iter:
            net.clear_param_diffs()
            if self._test_due(self.iter):
                self.test_all()
                if self.requested_early_exit:
                    stopped = True
                    break
            for callback in self._callbacks:
                callback.on_start()
            display = p.display and self.iter % p.display == 0
            # Caffe: the solver's debug_info shows on display iterations; a net's own always
            net.debug_info = bool(display and p.debug_info) or self._net_debug_info
            if p.random_seed >= 0:
                backend.set_random_seed(_mixed_seed(p.random_seed + self.sync.rank, self.iter))
            loss = 0.0
            # A diverging run overflows: the check below names the iteration, NumPy's
            # per-operation warnings would only clutter the log.
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                for _ in range(p.iter_size):
                    loss += net.forward_backward()
            loss = self.sync.reduce_loss(loss / p.iter_size)
            if not math.isfinite(loss):
                raise self._fail(f"iteration {self.iter}: the loss is {loss} (not finite); "
                                 "training stopped: lower base_lr, clip_gradients, or check "
                                 "the data and the net")
            self._update_smoothed_loss(loss)
            if display:
                self._display()
            self.sync.reduce_gradients(net)
            for callback in self._callbacks:
                callback.on_gradients()
            self.apply_update()
            self.iter += 1
            request = self._requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == "snapshot":
                self.snapshot()
            if request == "stop":
                self._stop_requested()
                stopped = True
                break
        if stopped and self._last_snapshot_iter != self.iter:
            self.snapshot()

    def _stop_requested(self) -> None:
        log.info("Stop requested: snapshotting and stopping at iteration %d", self.iter,
                 extra=at("solver.cpp:280"))
        self.requested_early_exit = True

    def solve(self, resume_file: str | os.PathLike | None = None) -> None:
        """Train to max_iter (optionally resuming a solverstate), as Caffe's Solver::Solve."""
        p = self.param
        log.info("Solving %s", self.net.name, extra=at("solver.cpp:289"))
        log.info("Learning Rate Policy: %s", p.lr_policy, extra=at("solver.cpp:290"))
        self.requested_early_exit = False
        if (p.snapshot or p.snapshot_after_train) and self.sync.is_root:
            self._check_snapshot_prefix()
        self._remove_stale_temporaries()
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file,
                     extra=at("solver.cpp:295"))
            self.restore(resume_file)
        self.step(p.max_iter - self.iter)
        if (p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0)
                and self._last_snapshot_iter != self.iter):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.", extra=at("solver.cpp:310"))
            return
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_from_to(0, len(self.net.layers) - 1)
            self._update_smoothed_loss(self.sync.reduce_loss(loss))
            log.info("Iteration %d, loss = %s", self.iter, fmt(self.smoothed_loss),
                     extra=at("solver.cpp:323"))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.", extra=at("solver.cpp:328"))

    # -- one iteration's pieces ------------------------------------------------------------------
    def _test_due(self, it: int) -> bool:
        p = self.param
        return bool(self.test_nets and p.test_interval and it % p.test_interval == 0
                    and (it > 0 or p.test_initialization))

    def _update_smoothed_loss(self, loss: float) -> None:
        """Running mean over the last ``average_loss`` iterations (Caffe's ring buffer)."""
        window = self.param.average_loss
        if len(self._losses) < window:
            self._losses.append(loss)
            n = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (n - 1) + loss) / n
        else:
            index = (self.iter - self._start_iter) % window
            self.smoothed_loss += (loss - self._losses[index]) / window
            self._losses[index] = loss

    def _display(self) -> None:
        p = self.param
        lapse = time.perf_counter() - self._timer
        per_s = (self.iter - self._iters_last) / (lapse or 1.0)
        log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, fmt(per_s),
                 fmt(lapse), p.display, fmt(self.smoothed_loss), extra=at("solver.cpp:243"))
        self._timer = time.perf_counter()
        self._iters_last = self.iter
        self._log_outputs(self.net, "Train", self.sync.reduce_outputs(self.net),
                          at("solver.cpp:259"))

    @staticmethod
    def _log_outputs(net: Net, kind: str, values: dict | None, where: dict) -> None:
        index = 0
        for name in net.outputs:
            scores = (np.asarray(values[name], dtype=np.float64).ravel() if values is not None
                      else backend.to_host(net.blobs[name].data).ravel())
            weight = net.blob_loss_weights.get(name, 0.0)
            for score in scores:
                tail = (f" (* {fmt(weight)} = {fmt(weight * float(score))} loss)"
                        if weight else "")
                log.info("    %s net output #%d: %s = %s%s", kind, index, name,
                         fmt(float(score)), tail, extra=where)
                index += 1

    def get_learning_rate(self) -> float:
        """The rate at the current iteration (advances ``current_step`` for multistep/step)."""
        before = self.current_step
        try:
            rate, self.current_step = lr_policy.learning_rate(self.param, self.iter,
                                                              self.current_step)
        except SolverError as err:
            raise err.with_context(file=self.solver_file) from None
        if self.param.lr_policy == "multistep" and self.current_step != before:
            log.info("MultiStep Status: Iteration %d, step = %d", self.iter, self.current_step,
                     extra=at("sgd_solver.cpp:63"))
        return rate

    def apply_update(self) -> None:
        """Caffe's SGDSolver::ApplyUpdate: rate, clip, then normalise, regularise and the
        type's rule for each learnable param; finally w -= diff."""
        p = self.param
        rate = self.get_learning_rate()
        if p.display and self.iter % p.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, fmt(rate), extra=at("sgd_solver.cpp:138"))
        self.clip_gradients()
        for i in range(len(self.net.learnable_params)):
            self.normalize(i)
            self.regularize(i)
            self.compute_update_value(i, rate)
        if self.net.debug_info:
            self.net.update_debug_info()
        self.net.update()

    def _s(self, value: float):
        """A scalar in the params' dtype (Caffe computes its coefficients in Dtype)."""
        return self.dtype.type(value)

    def clip_gradients(self) -> None:
        clip = self.param.clip_gradients
        if clip < 0:
            return
        params = self.net.learnable_params
        sumsq = 0.0
        for blob in params:
            diff = blob.diff.reshape(-1)
            sumsq += float(blob.xp.dot(diff, diff))
        norm = math.sqrt(sumsq)
        if norm > clip:
            factor = clip / norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale "
                     "factor %s", fmt(norm), fmt(clip), fmt(factor),
                     extra=at("sgd_solver.cpp:100"))
            scale = self._s(factor)
            for blob in params:
                blob.diff[...] *= scale

    def normalize(self, i: int) -> None:
        if self.param.iter_size > 1:
            self.net.learnable_params[i].diff[...] *= self._s(1.0) / self._s(self.param.iter_size)

    def regularize(self, i: int) -> None:
        blob = self.net.learnable_params[i]
        decay = self._s(self._s(self.param.weight_decay) *
                        self._s(self.net.params_weight_decay[i]))
        if not decay:
            return
        xp, tmp = blob.xp, self._scratch[i][0]
        if self.param.regularization_type == "L2":
            xp.multiply(blob.data, decay, out=tmp)
        else:
            xp.sign(blob.data, out=tmp)
            tmp *= decay
        blob.diff[...] += tmp

    def local_rate(self, i: int, rate: float):
        return self._s(self._s(rate) * self._s(self.net.params_lr[i]))

    def compute_update_value(self, i: int, rate: float) -> None:
        """Turn param ``i``'s regularised gradient (its diff) into the step to subtract."""
        raise NotImplementedError

    # -- testing ----------------------------------------------------------------------------------
    def test_all(self) -> list[dict]:
        """Run every test net test_iter[i] times; returns one {output: mean} per net."""
        results = []
        self.sync.average_stats(self.net)
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            results.append(self.test(i))
        self.test_results = results
        return results

    def test(self, index: int = 0) -> dict:
        """Caffe's Solver::Test: the mean of every output element over test_iter batches."""
        p = self.param
        net = self.test_nets[index]
        log.info("Iteration %d, Testing net (#%d)", self.iter, index, extra=at("solver.cpp:347"))
        self._share_trained_layers(net)
        sums: dict[str, np.ndarray] = {}
        loss = 0.0
        iters = p.test_iter[index]
        first = self.tests_done_before(self.iter) * iters
        for run_batch in self.sync.test_batches(net, first, iters):
            request = self._requested_action()
            while request != "none":
                if request == "snapshot":
                    self.snapshot()
                else:
                    self._stop_requested()
                request = self._requested_action()
            if self.requested_early_exit:
                log.info("Test interrupted.", extra=at("solver.cpp:380"))
                return {}
            if not run_batch:
                continue
            iter_loss = net.forward_from_to(0, len(net.layers) - 1)
            if p.test_compute_loss:
                loss += iter_loss
            for name in net.outputs:
                values = backend.to_host(net.blobs[name].data).astype(np.float64).reshape(-1)
                if name in sums:
                    sums[name] += values
                else:
                    sums[name] = values.copy()
        sums, loss = self.sync.reduce_test(net, sums, loss)
        if p.test_compute_loss:
            log.info("Test loss: %s", fmt(loss / max(iters, 1)), extra=at("solver.cpp:391"))
        means = {name: total / max(iters, 1) for name, total in sums.items()}
        if not means:  # test_iter 0: Caffe runs no batch and prints no output
            return {}
        self._log_outputs(net, "Test", means, at("solver.cpp:414"))
        return {name: (float(v[0]) if v.size == 1 else v) for name, v in means.items()}

    # -- snapshots ---------------------------------------------------------------------------------
    def snapshot_filename(self, extension: str) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def _check_snapshot_prefix(self) -> None:
        """Fail before training, not after it, when snapshots cannot be written (Caffe's
        CheckSnapshotWritePermissions): make the folder as a snapshot would, then a probe file."""
        folder = Path(self.snapshot_filename("")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except (OSError, ValueError) as err:  # ValueError: a NUL byte in the prefix
            raise self._fail(f"cannot write to snapshot_prefix '{self.param.snapshot_prefix}' "
                             f"({err.strerror or err}: {err.filename or folder}); make sure its "
                             "folder exists or can be created, and is writable") from None

    def _remove_stale_temporaries(self) -> None:
        """A run killed while writing a snapshot leaves hidden temporaries of this prefix's
        files (``.<prefix>_iter_N.caffemodel.XXXX.tmp``): remove them before training."""
        first = Path(self.snapshot_filename(""))
        start = temporary_prefix(first).rsplit("_iter_", 1)[0] + "_iter_"
        try:
            for leftover in first.parent.glob(f"{glob.escape(start)}*.tmp"):
                log.info("Removing %s, left by an interrupted snapshot", leftover)
                leftover.unlink(missing_ok=True)
        except OSError:  # no such folder yet, or not ours to clean: nothing to do
            pass

    def snapshot(self) -> tuple[str, str]:
        """Write ``<prefix>_iter_N.caffemodel`` and ``.solverstate`` (``.h5`` variants with
        snapshot_format HDF5), atomically; returns both paths."""
        p = self.param
        self.sync.average_stats(self.net)
        hdf5 = p.snapshot_format == caffe_pb2.SolverParameter.HDF5
        model = self.snapshot_filename(".caffemodel.h5" if hdf5 else ".caffemodel")
        state_path = self.snapshot_filename(".solverstate.h5" if hdf5 else ".solverstate")
        kind = "HDF5 file" if hdf5 else "binary proto file"
        if not self.sync.is_root:  # rank 0 alone writes (every rank averaged the stats above)
            self._last_snapshot_iter = self.iter
            return model, state_path
        try:
            with atomic_group():  # renamed into place at the end, the state last
                log.info("Snapshotting to %s %s", kind, model, extra=at("solver.cpp:454"))
                if hdf5:
                    self.net.save_hdf5(model, p.snapshot_diff)
                else:
                    snapshot.write_weights(model, self.net.to_proto(p.snapshot_diff))
                state = snapshot.SolverStateData(self.iter, model,
                                                 [h.data for h in self.history],
                                                 self.current_step)
                log.info("Snapshotting solver state to %s %s", kind, state_path,
                         extra=at("sgd_solver.cpp:273"))
                if hdf5:
                    snapshot.write_state_hdf5(state_path, state)
                else:
                    snapshot.write_state(state_path, state)
        except OSError as err:
            raise SolverError(f"cannot write snapshot: {err.strerror or err}: "
                              f"{err.filename or model}") from None
        self._last_snapshot_iter = self.iter
        return model, state_path

    def restore(self, state_file: str | os.PathLike) -> None:
        """Resume from a solverstate (ours or Caffe's, binary or HDF5): weights, iter,
        current_step, history; moves seekable data layers to where the run left off."""
        state = snapshot.read_state(state_file)
        self._check_state(state, state_file)
        if len(state.history) != len(self.history):
            raise SolverError(f"the solver state has {len(state.history)} history blobs, this "
                              f"{type(self).__name__} on this net needs {len(self.history)} "
                              "(a state of another solver type or net?)", file=str(state_file))
        for i, (blob, values) in enumerate(zip(self.history, state.history)):
            if values.size != blob.count:
                raise SolverError(f"history blob {i} has {values.size} values, the param "
                                  f"needs {blob.count} {blob.shape}", file=str(state_file))
        weights = snapshot.resolve_learned_net(state.learned_net, state_file)
        self.net.copy_from(weights, strict=True)
        self.iter = int(state.iter)
        self.current_step = int(state.current_step)
        log.info("SGDSolver: restoring history", extra=at("sgd_solver.cpp:341"))
        for blob, values in zip(self.history, state.history):
            blob.data[...] = backend.to_module(values.reshape(blob.shape).astype(blob.dtype),
                                               blob.xp)
        self._last_snapshot_iter = self.iter
        self.seek_data()

    def _check_state(self, state: snapshot.SolverStateData, state_file) -> None:
        """Refuse a state that cannot have been written by a run of this solver."""
        if state.iter < 0 or state.current_step < 0:
            raise SolverError(f"iter ({state.iter}) and current_step ({state.current_step}) "
                              "must be >= 0", file=str(state_file))
        if not state.learned_net:
            beside = Path(state_file).name.replace(".solverstate", ".caffemodel")
            raise SolverError("the solver state names no weights file (learned_net is empty): "
                              f"its weights would restart from scratch; expected the caffemodel "
                              f"written with it (e.g. {beside}) for solver {self.solver_file}",
                              file=str(state_file))

    def tests_done_before(self, it: int) -> int:
        """How many test points a run has passed before iteration ``it``."""
        p = self.param
        if not self.test_nets or not p.test_interval or it <= 0:
            return 0
        return (it - 1) // p.test_interval + (1 if p.test_initialization else 0)

    def seek_data(self) -> None:
        """Tell data layers with ``seek(batch_index)`` which batch comes next (the engine's
        own layer classes only: a Python layer's user object may use the name otherwise)."""
        for layer in self.net.layers:
            if callable(getattr(type(layer), "seek", None)):
                layer.seek(self.iter * self.param.iter_size)
        done = self.tests_done_before(self.iter)
        for i, net in enumerate(self.test_nets):
            for layer in net.layers:
                if callable(getattr(type(layer), "seek", None)):
                    layer.seek(done * self.param.test_iter[i])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} iter {self.iter} net '{self.net.name}'>"
