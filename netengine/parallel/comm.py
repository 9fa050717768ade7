"""The communicator of a data-parallel run: MPI (mpi4py) between processes, NCCL (CuPy's
``cupy.cuda.nccl``) between GPUs where it is available.

A launcher (``mpiexec``/``mpirun`` of MPICH, Open MPI, MVAPICH or Intel MPI) tells each process
its rank and the job's size in environment variables; :func:`launched_size` reads them without
importing mpi4py, so a run outside a launcher (or ``mpiexec -n 1``) never loads MPI.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import numpy as np

from netengine.errors import NetEngineError
from netengine.parallel.reduce import PIECE, HostCopySum, MpiSum, NcclSum, NodeSum

# The size a launcher gives each process, by MPI implementation.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
log = logging.getLogger("netengine.parallel")
# The shared-memory files of MPICH (and of the UCX it may use) in /dev/shm.
SHARED_FILE_PREFIXES = ("mpich_", "ucx_shm_")
INSTALL_HINT = ("pip install -e '.[mpi]' (mpi4py with MPICH), or pip install mpi4py over a "
                "system MPI")


def launched_size() -> int:
    """How many ranks the launcher started (1 outside one), from its environment variables."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def one_machine_ucx() -> bool:
    """Where MPICH's launcher (hydra) put every rank on this machine, turn off UCX's own
    shared-memory transports unless the user chose UCX_TLS: MPICH carries local messages
    through its own shared memory, and UCX's unused segments cost each rank about 3 MiB."""
    local = os.environ.get("MPI_LOCALNRANKS", "").strip()
    if "UCX_TLS" in os.environ or not local.isdigit() or int(local) != launched_size():
        return False
    os.environ["UCX_TLS"] = "^sysv,posix"
    return True


def _import_mpi():
    if one_machine_ucx():  # before MPI_Init, which reads it
        log.debug("every rank on this machine: UCX_TLS=%s", os.environ["UCX_TLS"])
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise NetEngineError(f"running under mpiexec with {launched_size()} ranks needs mpi4py "
                             f"({err}): {INSTALL_HINT}") from None
    return MPI


class Communicator:
    """All ranks of the job (MPI's COMM_WORLD), plus the ranks on this machine (``local_rank``
    of ``local_size``, from MPI's shared-memory split: launcher-independent).

    ``NETENGINE_RANKS_PER_NODE=k`` groups the ranks as if each machine ran k of them (ranks
    0..k-1 on the first, ...): the path between machines, tried out on one.
    """

    def __init__(self) -> None:
        self.MPI = _import_mpi()
        self.comm = self.MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        per_node = os.environ.get("NETENGINE_RANKS_PER_NODE", "").strip()
        if per_node and not (per_node.isdigit() and int(per_node) > 0):
            raise NetEngineError(f"NETENGINE_RANKS_PER_NODE must be a whole number of ranks "
                                 f"per machine (e.g. 2), got '{per_node}'")
        if per_node:
            self.local = self.comm.Split(self.rank // int(per_node), key=self.rank)
        else:
            self.local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = self.local.Get_rank(), self.local.Get_size()
        self._nccl = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- host arrays -----------------------------------------------------------------------------
    def allreduce_(self, array: np.ndarray) -> np.ndarray:
        """Sum a contiguous host array over all ranks, in place."""
        self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        return array

    def broadcast_(self, array: np.ndarray) -> np.ndarray:
        """Rank 0's values of a contiguous host array, in place on every rank."""
        self.comm.Bcast(array, root=0)
        return array

    def broadcast_object(self, value):
        """Rank 0's ``value`` (a small Python value) on every rank."""
        return self.comm.bcast(value, root=0)

    def max_int(self, value: int) -> int:
        buf = np.array([int(value)], dtype=np.int64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MAX)
        return int(buf[0])

    # -- device arrays ---------------------------------------------------------------------------
    def use_nccl(self) -> bool:
        """Set up NCCL between the ranks' GPUs; False where CuPy has no NCCL (then device
        arrays are summed through MPI on host copies)."""
        if self._nccl is None:  # NETENGINE_NCCL=0: MPI on host copies (to compare, or debug)
            wanted = os.environ.get("NETENGINE_NCCL", "1") not in ("0", "false", "no")
            self._nccl = (wanted and _Nccl.create(self)) or False
        return bool(self._nccl)

    def gradient_sum(self, count: int, dtype, xp=np):
        """A flat buffer of ``count`` values and the fastest way to sum it over the ranks, in
        place (see :mod:`netengine.parallel.reduce`)."""
        if xp is not np and self.use_nccl():
            return NcclSum(self._nccl.nccl, self._nccl.comm, count, dtype)
        host = self.host_sum(count, dtype)
        return host if xp is np else HostCopySum(host, xp, count, dtype)

    def host_sum(self, count: int, dtype, piece: int = PIECE):
        """The host buffer's sum: shared memory where every machine runs as many ranks (more
        than one), else MPI_Allreduce."""
        sizes = self.comm.allgather(self.local_size)
        wanted = os.environ.get("NETENGINE_SHM", "1") not in ("0", "false", "no")
        if not wanted or self.local_size == 1 or len(set(sizes)) != 1:
            return MpiSum(self.MPI, self.comm, count, dtype)
        cross = None
        if self.local_size < self.size:  # one rank per machine for each local rank
            cross = self.comm.Split(self.local_rank, key=self.rank)
        try:
            node = NodeSum(self.MPI, self.local, cross, count, dtype, piece)
        except self.MPI.Exception as err:  # an MPI without shared-memory windows
            log.warning("no MPI shared-memory window (%s): gradients go through "
                        "MPI_Allreduce", str(err).splitlines()[0])
            node = None
        if self.max_int(node is None):  # every rank takes the same way
            if node is not None:  # not freed: MPI_Win_free waits for the ranks without one
                node.window.Unlock_all()
            return MpiSum(self.MPI, self.comm, count, dtype)
        return node

    # -- failure ---------------------------------------------------------------------------------
    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort): a failing rank never leaves the others
        waiting in a collective."""
        sys.stderr.flush()
        sys.stdout.flush()
        unlink_mpi_shared_files()
        self.comm.Abort(code)
        os._exit(code)  # MPI_Abort may return before the launcher ends this process


def unlink_mpi_shared_files(maps: str = "/proc/self/maps") -> list[str]:
    """Unlink the MPICH/UCX shared-memory files this process maps. MPI_Abort skips MPICH's
    clean-up, which would leave them in /dev/shm (memory) until the machine restarts; unlinked,
    they vanish when the last rank using them ends. Returns the paths unlinked."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as lines:
            paths = {line.split(maxsplit=5)[-1].strip() for line in lines if "/dev/shm/" in line}
    except OSError:
        return []
    done = []
    for path in sorted(paths):
        name = os.path.basename(path)
        if path.startswith("/dev/shm/") and name.startswith(SHARED_FILE_PREFIXES):
            with contextlib.suppress(OSError):
                os.unlink(path)
                done.append(path)
    return done


class _Nccl:
    """The NCCL communicator of the ranks' GPUs (its unique id shared over MPI)."""

    def __init__(self, nccl, communicator) -> None:
        self.nccl, self.comm = nccl, communicator

    @classmethod
    def create(cls, comm: Communicator) -> _Nccl | None:
        try:
            from cupy.cuda import nccl
        except ImportError:
            return None
        if not getattr(nccl, "available", True):
            return None
        uid = nccl.get_unique_id() if comm.is_root else None
        uid = comm.broadcast_object(uid)
        return cls(nccl, nccl.NcclCommunicator(comm.size, uid, comm.rank))


def world() -> Communicator | None:
    """The job's communicator under a launcher with more than one rank; None otherwise
    (nothing imported: one process trains as it always did)."""
    if launched_size() <= 1:
        return None
    return Communicator()
