"""One rank of a data-parallel test run (started by tests/test_parallel.py under mpiexec, or
alone for one process): trains SOLVER in the given dtype to its max_iter, then saves

- OUT.rank<r>.npz on every rank: its own learnable params (``p0``, ``p1``, ...) before the
  final snapshot averages them, and the blobs named by --blobs (``blob_<name>``);
- the final snapshot (rank 0) through solver.snapshot(), which averages BatchNorm's
  statistics on every rank (``after_snapshot_<i>``: the params after it).

    python parallel_driver.py SOLVER OUT [--dtype float64] [--resume STATE] [--gpu|--fake-gpu]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netengine import backend, parallel  # noqa: E402
from netengine.solvers import get_solver, read_solver_param  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("solver")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--resume", default="")
    parser.add_argument("--blobs", default="")
    parser.add_argument("--gpu", action="store_true", help="one GPU per local rank")
    parser.add_argument("--fake-gpu", action="store_true",
                        help="GPU mode on tests/fake_cupy.py (CuPy's rules, NumPy underneath)")
    args = parser.parse_args()
    comm = parallel.world()
    dp = parallel.DataParallel(comm) if comm is not None else None
    try:
        return run(args, dp)
    except BaseException as err:
        if dp is None:
            raise
        dp.fail(err)
        raise


def run(args, dp) -> int:
    if args.fake_gpu:
        import fake_cupy

        backend._import_cupy = lambda: fake_cupy.cupy
        backend.set_mode_gpu()
    if args.gpu:
        import cupy

        local = dp.comm.local_rank if dp is not None else 0
        backend.set_device(local % cupy.cuda.runtime.getDeviceCount())
        backend.set_mode_gpu()
    param = read_solver_param(args.solver)
    if dp is not None:
        param.random_seed = dp.agree_seed(param.random_seed)
    solver = get_solver(param, solver_file=args.solver, dtype=np.dtype(args.dtype))
    rank = 0
    if dp is not None:
        rank = dp.rank
        dp.attach(solver)
        solver.set_action_function(dp.agree(None))
        if args.resume:
            dp.resume(solver, args.resume)
    elif args.resume:
        solver.restore(args.resume)
    solver.step(param.max_iter - solver.iter)
    own = {f"p{i}": backend.to_host(b.data).copy()
           for i, b in enumerate(solver.net.learnable_params)}
    for name in filter(None, args.blobs.split(",")):
        own[f"blob_{name}"] = backend.to_host(solver.net.blobs[name].data).copy()
    for layer in solver.net.layers:
        if getattr(layer, "mask", None) is not None:
            own[f"mask_{layer.name}"] = backend.to_host(layer.mask).copy()
    for name, value in (solver.test_results[0] if solver.test_results else {}).items():
        own[f"test_{name}"] = np.asarray(value)
    solver.snapshot()
    for i, blob in enumerate(solver.net.learnable_params):
        own[f"after_snapshot_{i}"] = backend.to_host(blob.data).copy()
    if dp is not None and dp._sum is not None:
        own["sum_kind"] = np.array(dp._sum.kind)
    np.savez(f"{args.out}.rank{rank}.npz", iter=solver.iter, **own)
    if dp is not None:
        dp.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
