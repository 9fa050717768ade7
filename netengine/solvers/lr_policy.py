"""Learning-rate policies of Caffe's SGDSolver::GetLearningRate (``lr_policy``).

``it`` is the 0-based iteration (the number of updates done so far), so the first update uses
``base_lr`` under every policy but poly/sigmoid:

==========  =======================================================================
fixed       base_lr
step        base_lr · gamma^floor(it / stepsize)
exp         base_lr · gamma^it
inv         base_lr · (1 + gamma·it)^(−power)
multistep   base_lr · gamma^current_step; current_step advances by at most one per
            iteration, when it ≥ stepvalue[current_step] (kept in the solverstate)
poly        base_lr · (1 − it/max_iter)^power
sigmoid     base_lr / (1 + exp(−gamma·(it − stepsize)))
==========  =======================================================================

Caffe's quirk kept: ``step`` also stores floor(it/stepsize) as the solver's current_step (so it
is what a solverstate records). The rate is computed in double and the update casts it to the
parameters' dtype (Caffe rounds it to float).
"""
from __future__ import annotations

import math
from collections.abc import Callable

from netengine.errors import SolverError


def _fixed(p, it: int, step: int) -> tuple[float, int]:
    return p.base_lr, step


def _step(p, it: int, step: int) -> tuple[float, int]:
    step = it // p.stepsize
    return p.base_lr * p.gamma ** step, step


def _exp(p, it: int, step: int) -> tuple[float, int]:
    return p.base_lr * p.gamma ** it, step


def _inv(p, it: int, step: int) -> tuple[float, int]:
    return p.base_lr * (1.0 + p.gamma * it) ** (-p.power), step


def _multistep(p, it: int, step: int) -> tuple[float, int]:
    if step < len(p.stepvalue) and it >= p.stepvalue[step]:
        step += 1
    return p.base_lr * p.gamma ** step, step


def _poly(p, it: int, step: int) -> tuple[float, int]:
    base = 1.0 - it / p.max_iter
    if base < 0 and p.power != int(p.power):  # past max_iter: C's pow gives NaN, not complex
        return math.nan, step
    return p.base_lr * base ** p.power, step


def _sigmoid(p, it: int, step: int) -> tuple[float, int]:
    z = -p.gamma * (it - p.stepsize)
    return p.base_lr * (1.0 / (1.0 + math.exp(z)) if z < 700 else 0.0), step


POLICIES: dict[str, Callable] = {"fixed": _fixed, "step": _step, "exp": _exp, "inv": _inv,
                                 "multistep": _multistep, "poly": _poly, "sigmoid": _sigmoid}


def check(param, file: str | None = None) -> None:
    """Refuse an unknown policy or the settings Caffe CHECKs, with a one-line SolverError."""
    policy = param.lr_policy
    if policy not in POLICIES:
        hint = "" if policy else " (lr_policy is not set)"
        raise SolverError(f"unknown lr_policy '{policy}'{hint}; expected one of "
                          f"{', '.join(POLICIES)}", file=file)
    if policy == "step" and param.stepsize <= 0:
        raise SolverError(f"lr_policy '{policy}' needs stepsize > 0, got {param.stepsize}",
                          file=file)
    if policy in ("step", "exp", "inv") and param.gamma < 0:
        raise SolverError(f"lr_policy '{policy}' needs gamma >= 0, got {param.gamma:g}",
                          file=file)
    if policy == "poly" and param.max_iter <= 0:
        raise SolverError("lr_policy 'poly' needs max_iter > 0", file=file)
    if policy in ("inv", "poly") and param.power < 0:
        # a negative power makes the rate grow without bound (poly: divides by 0 at max_iter)
        raise SolverError(f"lr_policy '{policy}' needs power >= 0, got {param.power:g}",
                          file=file)


def learning_rate(param, it: int, current_step: int = 0) -> tuple[float, int]:
    """(rate at iteration ``it``, new current_step) for ``param.lr_policy``."""
    try:
        policy = POLICIES[param.lr_policy]
    except KeyError:
        check(param)
        raise
    try:
        return policy(param, it, current_step)
    except (OverflowError, ZeroDivisionError):  # e.g. exp with gamma > 1 after many iterations
        raise SolverError(f"lr_policy '{param.lr_policy}': the learning rate overflows at "
                          f"iteration {it} (base_lr {param.base_lr:g}, gamma {param.gamma:g}, "
                          f"power {param.power:g}); expected settings that keep it finite") \
            from None
