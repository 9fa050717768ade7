"""Starting a data-parallel run: Caffe's ``--gpu 0,1`` (one rank per listed GPU) and the
re-launch under ``mpiexec`` when a list is given to a single process.
"""
from __future__ import annotations

import os
import shutil
import sys

from netengine import backend
from netengine.errors import NetEngineError


def gpu_list(flag: str) -> list[int] | None:
    """The ids a ``--gpu`` flag lists (``all``: every visible GPU); None for no flag."""
    flag = flag.strip()
    if not flag:
        return None
    if flag == "all":
        reason = backend.gpu_unavailable_reason()
        if reason:
            raise NetEngineError(f"--gpu all: {reason}")
        import cupy

        return list(range(cupy.cuda.runtime.getDeviceCount()))
    ids = [part.strip() for part in flag.split(",") if part.strip()]
    if not ids or not all(part.isdigit() for part in ids):
        raise NetEngineError(f"--gpu takes device ids separated by commas (e.g. 0,1) or 'all', "
                             f"got '{flag}'")
    if len(set(ids)) != len(ids):
        raise NetEngineError(f"--gpu lists a device twice: '{flag}'")
    return [int(part) for part in ids]


def rank_gpu(ids: list[int], local_rank: int, local_size: int) -> int:
    """The GPU this rank binds: the local_rank-th listed one."""
    if local_size > len(ids):
        raise NetEngineError(f"{local_size} ranks on this machine but --gpu lists {len(ids)} "
                             f"device(s) ({','.join(map(str, ids))}): list one per rank")
    return ids[local_rank]


def check_gpus(flag: str, ids: list[int]) -> None:
    """One line where CuPy or a listed GPU is missing (before any re-launch)."""
    for device in ids:
        reason = backend.gpu_unavailable_reason(device)
        if reason:
            raise NetEngineError(f"--gpu {flag}: {reason}")


def relaunch(count: int) -> None:
    """Run this same command again as ``mpiexec -n count``: one rank per GPU (Caffe's
    ``caffe train --gpu 0,1``). Does not return."""
    mpiexec = shutil.which("mpiexec") or shutil.which("mpirun")
    if mpiexec is None:
        raise NetEngineError(f"--gpu lists {count} GPUs: one rank per GPU needs mpiexec (pip "
                             "install -e '.[mpi]'), or start it yourself: mpiexec -n "
                             f"{count} tools/train ... --gpu all")
    argv = [mpiexec, "-n", str(count), sys.executable, *sys.argv]
    sys.stderr.flush()
    os.execv(mpiexec, argv)
