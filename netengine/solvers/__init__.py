"""Training: the step loop, test nets, snapshots and signals (``solver.py``), the SGD family
and its siblings, and Caffe's learning-rate policies (``lr_policy.py``)."""
from __future__ import annotations

from netengine.solvers.sgd import (
    SOLVERS,
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    get_solver,
)
from netengine.solvers.solver import Solver, read_solver_param

__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "NesterovSolver", "RMSPropSolver",
           "SGDSolver", "SOLVERS", "Solver", "get_solver", "read_solver_param"]
