"""The hooks that make a solver one rank of a data-parallel run (Caffe's P2PSync, PyTorch's
DDP): :class:`DataParallel` is handed to ``solver.sync`` by :meth:`DataParallel.attach`.

Per step: every rank computes gradients on its shard; one fused all-reduce over all learnable
params sums them and divides by N, before clipping, regularization and the update, so every
rank applies the same update to the same weights. Losses and outputs shown are global means.
Before each test and snapshot, params the solver does not train (lr_mult 0: BatchNorm's
running statistics, which each rank updates from its own batches) are averaged. Rank 0 alone
writes snapshots and logs; signal actions are agreed (the strongest wins), so SIGINT or SIGHUP
on any rank acts on all.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from netengine import backend
from netengine.errors import NetEngineError
from netengine.logging_glog import emit_error
from netengine.parallel.comm import Communicator
from netengine.parallel.shard import Shard, shard_data_layers

log = logging.getLogger("netengine.parallel")
ACTION_ORDER = ("none", "snapshot", "stop")


def _seekable(net) -> list:
    return [layer for layer in net.layers if callable(getattr(type(layer), "seek", None))]


class DataParallel:
    """One rank's side of a data-parallel run over ``comm``."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.rank, self.size, self.is_root = comm.rank, comm.size, comm.is_root
        self.shard = Shard(comm.rank, comm.size)
        self._sum = None
        self._slices: list[tuple[int, int]] = []
        self._test_count = 0
        self.allreduce_seconds = 0.0
        self.allreduce_steps = 0

    # -- setting up --------------------------------------------------------------------------
    def quiet_other_ranks(self) -> None:
        """Rank 0 alone logs; the others keep only errors (their failures still print)."""
        if not self.is_root:
            logging.getLogger("netengine").setLevel(logging.ERROR)

    def agree_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank; a fresh one from rank 0 where ``seed`` < 0, so data
        order and rand_skip agree across ranks."""
        if self.is_root and seed < 0:
            seed = int(np.random.SeedSequence().entropy % (1 << 31))
        return int(self.comm.broadcast_object(int(seed)))

    def attach(self, solver) -> None:
        """Make ``solver`` one rank: shard its train data, start from rank 0's weights."""
        sharded = shard_data_layers(solver.net, self.shard)
        self.broadcast_params(solver.net)
        solver.sync = self
        log.info("Data-parallel: %d ranks, per-rank batch as in the net (global batch = %d x "
                 "batch_size); %d data layer(s) sharded", self.size, self.size, sharded)
        if not sharded:
            log.warning("no data layer of the train net takes a shard (Data, ImageData, "
                        "WindowData, HDF5Data, MemoryData): every rank reads the same records")

    def broadcast_params(self, net) -> None:
        """Every learnable blob (BatchNorm's statistics included) takes rank 0's values."""
        for blob in net.learnable_params:
            host = np.ascontiguousarray(backend.to_host(blob.data))
            self.comm.broadcast_(host)
            backend.copy_into(blob.data, host)

    def resume(self, solver, state_file: str) -> None:
        """Rank 0 reads the solverstate (it holds no rank count); the others take its weights,
        history, iteration and step, then every rank moves its data to the next batch."""
        if self.is_root:
            log.info("Restoring previous solver status from %s", state_file)
            solver.restore(state_file)
        solver.iter, solver.current_step = self.comm.broadcast_object(
            (solver.iter, solver.current_step))
        self.broadcast_params(solver.net)
        for blob in solver.history:
            host = np.ascontiguousarray(backend.to_host(blob.data))
            self.comm.broadcast_(host)
            backend.copy_into(blob.data, host)
        solver._last_snapshot_iter = solver.iter
        solver.seek_data()

    def agree(self, action_function):
        """Wrap a signal action function so that all ranks act on the strongest request."""
        def agreed() -> str:
            local = action_function() if action_function is not None else "none"
            return ACTION_ORDER[self.comm.max_int(ACTION_ORDER.index(local or "none"))]
        return agreed

    def fail(self, err: BaseException, code: int = 1) -> None:
        """Print this rank's one-line error and end the whole job (never a silent hang)."""
        text = str(err) if isinstance(err, NetEngineError) else f"{type(err).__name__}: {err}"
        emit_error(RuntimeError(f"rank {self.rank} of {self.size}: {text}"))
        self.comm.abort(code)

    # -- the solver's hooks --------------------------------------------------------------------
    def reduce_loss(self, loss: float) -> float:
        value = np.array([loss], dtype=np.float64)
        return float(self.comm.allreduce_(value)[0]) / self.size

    def _gradient_sum(self, params):
        if self._sum is None:
            total, self._slices = 0, []
            for blob in params:
                self._slices.append((total, total + blob.count))
                total += blob.count
            self._sum = self.comm.gradient_sum(total, params[0].dtype, params[0].xp)
            log.info("gradient all-reduce: %d values, %s", total, self._sum.kind)
        return self._sum

    def reduce_gradients(self, net) -> None:
        """One fused all-reduce of every learnable param's diff; then diff = sum / N."""
        params = net.learnable_params
        if not params:
            return
        fused = self._gradient_sum(params)
        flat = fused.buffer
        for blob, (start, stop) in zip(params, self._slices):
            flat[start:stop] = blob.diff.reshape(-1)
        began = time.perf_counter()
        flat = fused.sum_()
        backend.synchronize()
        self.allreduce_seconds += time.perf_counter() - began
        self.allreduce_steps += 1
        scale, xp = flat.dtype.type(1.0 / self.size), params[0].xp
        for blob, (start, stop) in zip(params, self._slices):
            xp.multiply(flat[start:stop], scale, out=blob.diff.reshape(blob.count))

    def close(self) -> None:
        """Free the shared-memory window (before MPI ends)."""
        if self._sum is not None:
            self._sum.close()
            self._sum = None

    def reduce_outputs(self, net) -> dict:
        """The train net's outputs, averaged over the ranks (for the display)."""
        names = list(net.outputs)
        parts = [backend.to_host(net.blobs[n].data).astype(np.float64).ravel() for n in names]
        total = self.comm.allreduce_(np.concatenate(parts) if parts else np.zeros(0))
        out, start = {}, 0
        for name, part in zip(names, parts):
            out[name] = total[start:start + part.size] / self.size
            start += part.size
        return out

    def test_batches(self, net, first: int, count: int) -> list[bool]:
        """Seek this rank's test data to its run of the test's batches; one flag per round."""
        mine = self.shard.test_batches(count)
        for layer in _seekable(net):
            layer.seek(first + mine.start)
        self._test_count = count
        return [i < len(mine) for i in range(self.shard.test_rounds(count))]

    def reduce_test(self, net, sums: dict, loss: float) -> tuple[dict, float]:
        """Sum the ranks' output sums and loss (the solver divides by test_iter)."""
        if not self._test_count:
            return sums, loss
        names = list(net.outputs)
        parts = [sums.get(n, np.zeros(net.blobs[n].count, dtype=np.float64)) for n in names]
        packed = self.comm.allreduce_(np.concatenate([*parts, np.array([loss])]))
        out, start = {}, 0
        for name, part in zip(names, parts):
            out[name] = packed[start:start + part.size]
            start += part.size
        return out, float(packed[-1])

    def average_stats(self, net) -> None:
        """Average the params the solver leaves alone (lr_mult 0) over the ranks, as
        x0 + sum(x_r - x0)/N so that values equal on every rank stay exactly as they are."""
        blobs = [b for b, lr in zip(net.learnable_params, net.params_lr) if lr == 0]
        if not blobs:
            return
        mine = np.concatenate([backend.to_host(b.data).astype(np.float64).ravel()
                               for b in blobs])
        first = self.comm.broadcast_(mine.copy())
        spread = self.comm.allreduce_(mine - first)
        mean = first + spread / self.size
        start = 0
        for blob in blobs:
            part = mean[start:start + blob.count].reshape(blob.shape).astype(blob.dtype)
            backend.copy_into(blob.data, part)
            start += blob.count

    def allreduce_summary(self) -> str:
        steps = max(self.allreduce_steps, 1)
        return (f"gradient all-reduce: {1e3 * self.allreduce_seconds / steps:.3f} ms per step "
                f"over {self.allreduce_steps} steps, {self.size} ranks")
