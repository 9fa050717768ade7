"""Data-parallel training (Caffe's multi-GPU training, PyTorch's DDP): one process per rank
under ``mpiexec``, gradients summed across ranks once per step.

``comm.py`` is the communicator (MPI through mpi4py; NCCL through CuPy between GPUs),
``shard.py`` the sharding plan (which records and test batches a rank takes), ``threads.py``
the per-rank thread split, ``trainer.py`` the hooks a solver calls (:class:`DataParallel`).
Importing this package imports no MPI: :func:`world` does, and only under a launcher.
"""
from __future__ import annotations

from netengine.parallel.comm import Communicator, launched_size, world
from netengine.parallel.shard import Shard
from netengine.parallel.trainer import DataParallel

__all__ = ["Communicator", "DataParallel", "Shard", "launched_size", "world"]
