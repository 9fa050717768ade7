"""The SGD family (Caffe's SGDSolver and its siblings): each overrides one update rule,
:meth:`Solver.compute_update_value`, on the step loop of :mod:`netengine.solvers.solver`.

Update rules, with lr = rate·lr_mult and t = iter + 1:

=========  ======================================================================================
SGD        h = μ·h + lr·g; step h (lr inside the momentum)
Nesterov   h' = μ·h + lr·g; step (1+μ)·h' − μ·h
AdaGrad    h += g²; step lr·g/(√h + δ)                              (momentum must be 0)
RMSProp    h = ρ·h + (1−ρ)·g²; step lr·g/(√h + δ)                   (ρ = rms_decay)
AdaDelta   h = μ·h + (1−μ)·g²; d = g·√((h2+δ)/(h+δ)); h2 = μ·h2 + (1−μ)·d²; step lr·d
Adam       m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²; step lr·√(1−β2^t)/(1−β1^t)·m/(√v + δ)
=========  ======================================================================================

History buffers are updated in place; each rule works in the params' dtype (float32 as Caffe)
on their array module (NumPy or CuPy) with one or two scratch buffers shared by all params.
"""
from __future__ import annotations

import difflib
import math
import os

import numpy as np

from netengine.errors import SolverError
from netengine.formats import upgrade
from netengine.logging_glog import at, fmt
from netengine.ops import jit
from netengine.proto import caffe_pb2
from netengine.solvers.solver import Solver, log, read_solver_param

# The fused CPU SGD update works through each param in blocks of this many values.
UPDATE_BLOCK = 32768


class SGDSolver(Solver):
    """Stochastic gradient descent with momentum: h = μ·h + lr·g; step h.

    On the CPU the whole update (normalise, regularise, momentum, w -= step) runs block by
    block (:data:`UPDATE_BLOCK` values), so each block's w, g, h stay in cache through the
    steps: the same operations in the same order per value, so the same results.
    """

    type = "SGD"

    def compute_update_value(self, i: int, rate: float) -> None:
        blob = self.net.learnable_params[i]
        g, h, tmp = blob.diff, self.history[i].data, self._scratch[i][0]
        h *= self._s(self.param.momentum)
        blob.xp.multiply(g, self.local_rate(i, rate), out=tmp)
        h += tmp
        g[...] = h

    def apply_update(self) -> None:
        params = self.net.learnable_params
        if type(self) is not SGDSolver or any(b.xp is not np for b in params) or \
                self.net.debug_info:  # the generic path logs the [Update] lines
            return super().apply_update()
        p = self.param
        rate = self.get_learning_rate()
        if p.display and self.iter % p.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, fmt(rate), extra=at("sgd_solver.cpp:138"))
        self.clip_gradients()
        momentum = self._s(p.momentum)
        scale = self._s(1.0) / self._s(p.iter_size) if p.iter_size > 1 else None
        compiled = jit.enabled(np)
        for i, blob in enumerate(params):
            decay = self._s(self._s(p.weight_decay) * self._s(self.net.params_weight_decay[i]))
            lr = self.local_rate(i, rate)
            w, g = blob.data.reshape(-1), blob.diff.reshape(-1)
            h, tmp = self.history[i].data.reshape(-1), self._scratch[i][0].reshape(-1)
            if compiled and jit.suitable(w, g, h):  # one pass per value, on Numba's threads
                jit.sgd_update(w, g, h, self._s(1) if scale is None else scale, decay,
                               p.regularization_type != "L2", momentum, lr)
                continue
            for start in range(0, w.size, UPDATE_BLOCK):
                part = slice(start, start + UPDATE_BLOCK)
                wb, gb, hb, tb = w[part], g[part], h[part], tmp[part]
                if scale is not None:  # normalize
                    gb *= scale
                if decay:  # regularize
                    if p.regularization_type == "L2":
                        np.multiply(wb, decay, out=tb)
                    else:
                        np.sign(wb, out=tb)
                        tb *= decay
                    gb += tb
                hb *= momentum  # compute_update_value
                np.multiply(gb, lr, out=tb)
                hb += tb
                gb[...] = hb
                wb -= gb  # the net's update: data -= diff


class NesterovSolver(SGDSolver):
    """Nesterov's accelerated gradient: h' = μ·h + lr·g; step (1+μ)·h' − μ·h."""

    type = "Nesterov"

    def compute_update_value(self, i: int, rate: float) -> None:
        blob = self.net.learnable_params[i]
        g, h, old = blob.diff, self.history[i].data, self._scratch[i][0]
        mu = self._s(self.param.momentum)
        old[...] = h
        h *= mu
        g *= self.local_rate(i, rate)
        h += g
        blob.xp.multiply(h, self._s(1) + mu, out=g)
        old *= -mu
        g += old


def _refuse_momentum(solver) -> None:
    """AdaGrad and RMSProp take no momentum (Caffe's CHECK_EQ(0, momentum))."""
    if solver.param.momentum != 0:
        raise solver._fail(f"{solver.type} cannot use momentum (got "
                           f"{solver.param.momentum:g}); set momentum: 0")


class AdaGradSolver(SGDSolver):
    """AdaGrad: h += g²; step lr·g/(√h + δ)."""

    type = "AdaGrad"

    def check_param(self) -> None:
        _refuse_momentum(self)

    def compute_update_value(self, i: int, rate: float) -> None:
        blob = self.net.learnable_params[i]
        xp, g, h, tmp = blob.xp, blob.diff, self.history[i].data, self._scratch[i][0]
        xp.multiply(g, g, out=tmp)
        h += tmp
        xp.sqrt(h, out=tmp)
        tmp += self._s(self.param.delta)
        xp.divide(g, tmp, out=g)
        g *= self.local_rate(i, rate)


class RMSPropSolver(SGDSolver):
    """RMSProp: h = ρ·h + (1−ρ)·g²; step lr·g/(√h + δ) (ρ = rms_decay)."""

    type = "RMSProp"

    def check_param(self) -> None:
        _refuse_momentum(self)
        if not 0 <= self.param.rms_decay < 1:
            raise self._fail(f"rms_decay must be in [0, 1), got {self.param.rms_decay:g}")

    def compute_update_value(self, i: int, rate: float) -> None:
        blob = self.net.learnable_params[i]
        xp, g, h, tmp = blob.xp, blob.diff, self.history[i].data, self._scratch[i][0]
        rho = self._s(self.param.rms_decay)
        xp.multiply(g, g, out=tmp)
        tmp *= self._s(1) - rho
        h *= rho
        h += tmp
        xp.sqrt(h, out=tmp)
        tmp += self._s(self.param.delta)
        xp.divide(g, tmp, out=g)
        g *= self.local_rate(i, rate)


class AdaDeltaSolver(SGDSolver):
    """AdaDelta: h = μ·h + (1−μ)·g²; d = g·√((h2+δ)/(h+δ)); h2 = μ·h2 + (1−μ)·d²; step lr·d.

    History: all h blobs, then all h2 blobs (Caffe's solverstate order).
    """

    type = "AdaDelta"
    history_sets = 2
    scratch_buffers = 2

    def check_param(self) -> None:
        self.check_range("momentum", 0, 1, high_open=False)

    def compute_update_value(self, i: int, rate: float) -> None:
        blob = self.net.learnable_params[i]
        xp, g = blob.xp, blob.diff
        h = self.history[i].data
        h2 = self.history[i + len(self.net.learnable_params)].data
        upd, tmp = self._scratch[i]
        mu, delta = self._s(self.param.momentum), self._s(self.param.delta)
        one_minus = self._s(1) - mu
        xp.multiply(g, g, out=upd)
        upd *= one_minus
        h *= mu
        h += upd
        xp.add(h2, delta, out=upd)
        xp.add(h, delta, out=tmp)
        upd /= tmp
        xp.sqrt(upd, out=upd)
        g *= upd
        xp.multiply(g, g, out=upd)
        upd *= one_minus
        h2 *= mu
        h2 += upd
        g *= self.local_rate(i, rate)


class AdamSolver(SGDSolver):
    """Adam with the bias correction folded into the rate and δ outside the square root.

    History: all first moments m, then all second moments v (Caffe's solverstate order).
    """

    type = "Adam"
    history_sets = 2

    def check_param(self) -> None:
        # The bias correction divides by 1 - momentum^t and takes sqrt(1 - momentum2^t).
        self.check_range("momentum", 0, 1)
        self.check_range("momentum2", 0, 1)

    def compute_update_value(self, i: int, rate: float) -> None:
        blob = self.net.learnable_params[i]
        xp, g = blob.xp, blob.diff
        m = self.history[i].data
        v = self.history[i + len(self.net.learnable_params)].data
        tmp = self._scratch[i][0]
        beta1, beta2 = self.param.momentum, self.param.momentum2
        t = self.iter + 1
        correction = math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        b1, b2 = self._s(beta1), self._s(beta2)
        m *= b1
        xp.multiply(g, self._s(1) - b1, out=tmp)
        m += tmp
        xp.multiply(g, g, out=tmp)
        tmp *= self._s(1) - b2
        v *= b2
        v += tmp
        xp.sqrt(v, out=tmp)
        tmp += self._s(self.param.delta)
        xp.divide(m, tmp, out=g)
        g *= self.local_rate(i, rate) * self._s(correction)


SOLVERS: dict[str, type[Solver]] = {cls.type: cls for cls in (
    SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver)}


def solver_class(type_name: str, file: str | None = None) -> type[Solver]:
    if type_name in SOLVERS:
        return SOLVERS[type_name]
    close = difflib.get_close_matches(type_name, SOLVERS, n=1, cutoff=0.5)
    lowered = {k.lower(): k for k in SOLVERS}
    if type_name.lower() in lowered:
        close = [lowered[type_name.lower()]]
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise SolverError(f"unknown solver type '{type_name}'; {hint}known types: "
                      f"{', '.join(SOLVERS)}", file=file)


def get_solver(solver, *, solver_file: str | os.PathLike | None = None,
               dtype=np.float32) -> Solver:
    """The solver a prototxt (or SolverParameter) asks for with ``type`` (pycaffe's
    ``caffe.get_solver``); the deprecated ``solver_type`` enum is accepted."""
    if isinstance(solver, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(solver)
        upgrade.upgrade_solver(param, file=str(solver_file) if solver_file else None)
        cls = solver_class(param.type, str(solver_file) if solver_file else None)
        return cls(param, solver_file=solver_file, dtype=dtype)
    param = read_solver_param(solver)
    cls = solver_class(param.type, str(solver))
    return cls(param, solver_file=solver, dtype=dtype)


__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "NesterovSolver", "RMSPropSolver",
           "SGDSolver", "SOLVERS", "Solver", "get_solver", "read_solver_param"]
