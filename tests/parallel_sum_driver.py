"""One rank of the gradient-sum check (tests/test_parallel.py, under mpiexec): sums seeded
random buffers of several sizes through Communicator.gradient_sum and compares every result
with MPI_Allreduce's; rank 0 prints the sums' kinds and the largest difference seen.

    mpiexec -n N python parallel_sum_driver.py [float32|float64] [nowindow]

``nowindow``: no rank can allocate a shared-memory window (as under an MPI without them):
every rank must then take MPI_Allreduce.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netengine import parallel  # noqa: E402
from netengine.parallel import comm as comm_module  # noqa: E402
from netengine.parallel.reduce import HostCopySum  # noqa: E402


def main() -> int:
    dtype = np.dtype(sys.argv[1] if len(sys.argv) > 1 else "float64")
    comm = parallel.world()
    if "nowindow" in sys.argv[2:]:
        def node_sum(*args):
            raise comm.MPI.Exception(comm.MPI.ERR_WIN)

        comm_module.NodeSum = node_sum
    worst, kinds, same = 0.0, set(), True
    sums = (lambda n: comm.gradient_sum(n, dtype),
            lambda n: comm.host_sum(n, dtype, piece=max(n // 4, 3)),  # a big net: in pieces
            lambda n: HostCopySum(comm.host_sum(n, dtype), np, n, dtype))  # GPUs', on NumPy
    for count, make in itertools.product((1, 10, 6370, 431080), sums):
        fused = make(count)
        kinds.add(fused.kind)
        for step in range(5):  # the buffer is packed again each step
            values = np.random.default_rng([count, step, comm.rank]).standard_normal(count)
            fused.buffer[...] = values.astype(dtype)
            got = fused.sum_().astype(np.float64)
            want = values.astype(dtype).astype(np.float64)
            comm.allreduce_(want)
            worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1)))
            first = comm.broadcast_(got.copy())  # every rank must hold the very same sums
            same &= bool(np.array_equal(first, got))
        fused.close()
    if comm.is_root:
        print(f"KIND {'|'.join(sorted(kinds))}\nWORST {worst:.3e}\nSAME {comm.max_int(not same) == 0}")
    else:
        comm.max_int(not same)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
