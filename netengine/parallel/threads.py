"""Per-rank threads: the ranks on one machine share its cores (BLAS/OpenMP and Numba).

Variables the user set (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS,
NUMBA_NUM_THREADS) win; otherwise each rank takes cores // local ranks (at least 1). The BLAS
pools are resized at run time through threadpoolctl (the ``mpi`` extra installs it), since
NumPy has loaded BLAS long before a rank knows its share.
"""
from __future__ import annotations

import os

USER_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                  "NUMBA_NUM_THREADS")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def split_threads(local_size: int) -> str:
    """Limit this rank's thread pools to its share; returns a line saying what was done."""
    user = [name for name in USER_VARIABLES if os.environ.get(name)]
    if user:
        return f"threads as set by {', '.join(f'{n}={os.environ[n]}' for n in user)}"
    share = max(cores() // max(local_size, 1), 1)
    done = []
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        done.append("BLAS unchanged (no threadpoolctl: set OMP_NUM_THREADS)")
    else:
        threadpool_limits(limits=share)
        done.append("BLAS/OpenMP")
    try:
        import numba
    except ImportError:
        pass
    else:
        numba.set_num_threads(min(share, numba.config.NUMBA_NUM_THREADS))
        done.append("Numba")
    return (f"{share} thread(s) per rank ({cores()} cores / {local_size} rank(s) on this "
            f"machine): {', '.join(done)}")
