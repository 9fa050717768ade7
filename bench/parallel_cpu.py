#!/usr/bin/env python3
"""Data-parallel LeNet on CPU: 1 process x 2 threads (and x 1 thread) vs ``mpiexec -n 2`` x 1
thread vs PyTorch DDP (gloo, 2 processes x 1 thread), same net (Caffe's LeNet, the embedded MNIST
through a Data layer for netengine, random MNIST-shaped tensors for PyTorch), same global
batch, same SGD settings (lr 0.01, momentum 0.9, weight decay 5e-4).

    python bench/parallel_cpu.py                       # global batch 64 and 256, 1000 iterations
    python bench/parallel_cpu.py --iters 200 --rounds 3 --batches 64

Each measurement runs in fresh processes (after 10 warm-up iterations), alternating between
the modes round after round; the table gives the median iterations/second per mode, the
speed-ups, the gradient all-reduce time per step seen by the solver (waits included), a bare
sum of LeNet's 431,080 float32 params as the solver does it and through MPI_Allreduce (after a
barrier: the transfer alone), and each process's peak RSS during training next to one process
trained with the per-rank batch. PyTorch's column
is left out (said so) where torch is not installed (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")
WARMUP = 10


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- workers ---------------------------------------------------------------------------------------
def worker_netengine(batch: int, iters: int) -> None:
    """Train LeNet with per-rank ``batch``; rank 0 prints one JSON line."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from netengine import parallel
    from netengine.solvers import get_solver, read_solver_param

    comm = parallel.world()
    dp = parallel.DataParallel(comm) if comm is not None else None
    net_text = (REPO / "nets" / "mnist_train_test.prototxt").read_text()
    net_text = net_text.replace('"data/mnist/', f'"{REPO}/data/mnist/')
    net_text = net_text.replace("batch_size: 64", f"batch_size: {batch}")
    with tempfile.TemporaryDirectory() as tmp:
        net_path = Path(tmp) / "net.prototxt"
        net_path.write_text(net_text)
        param = read_solver_param(REPO / "nets" / "mnist_solver.prototxt")
        param.net = str(net_path)
        param.ClearField("test_iter")
        param.test_interval = 0
        param.display = 0
        param.snapshot = 0
        solver = get_solver(param, solver_file=str(REPO / "nets" / "mnist_solver.prototxt"))
        if dp is not None:
            dp.attach(solver)
        solver.step(WARMUP)
        if dp is not None:
            dp.allreduce_seconds, dp.allreduce_steps = 0.0, 0
            comm.comm.Barrier()
        began = time.perf_counter()
        solver.step(iters)
        if dp is not None:
            comm.comm.Barrier()
        seconds = time.perf_counter() - began
    result = {"iters_per_s": iters / seconds, "peak_mib": [_peak_mib()]}
    if dp is not None:
        result["allreduce_ms"] = 1e3 * dp.allreduce_seconds / max(dp.allreduce_steps, 1)
        result["peak_mib"] = comm.comm.gather(_peak_mib(), root=0)  # training's, not the below
        count = sum(b.count for b in solver.net.learnable_params)
        fused = comm.gradient_sum(count, np.float32)
        flat = np.ones(count, dtype=np.float32)
        result["sum_kind"] = fused.kind
        result["bare_allreduce_ms"] = _bare_ms(comm, fused.sum_)
        result["bare_mpi_allreduce_ms"] = _bare_ms(comm, lambda: comm.allreduce_(flat))
        fused.close()
        dp.close()
        result["params"] = int(flat.size)
        if not dp.is_root:
            return
    print("RESULT " + json.dumps(result), flush=True)


def _bare_ms(comm, sum_) -> float:
    """Median time of 50 sums, each after a barrier (the transfer alone, no waiting)."""
    times = []
    for _ in range(50):
        comm.comm.Barrier()
        began = time.perf_counter()
        sum_()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def _torch_rank(rank: int, size: int, port: int, batch: int, iters: int, queue) -> None:
    """One process of the PyTorch DDP run (module level: spawn pickles it by name)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.manual_seed(1701)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 20, 5), torch.nn.MaxPool2d(2, 2, ceil_mode=True),
        torch.nn.Conv2d(20, 50, 5), torch.nn.MaxPool2d(2, 2, ceil_mode=True),
        torch.nn.Flatten(), torch.nn.Linear(800, 500), torch.nn.ReLU(),
        torch.nn.Linear(500, 10))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()

    for _ in range(WARMUP):
        step()
    dist.barrier()
    began = time.perf_counter()
    for _ in range(iters):
        step()
    dist.barrier()
    seconds = time.perf_counter() - began
    peaks = [None] * size
    dist.all_gather_object(peaks, _peak_mib())
    if rank == 0:
        queue.put({"iters_per_s": iters / seconds, "peak_mib": peaks})
    dist.destroy_process_group()


def worker_torch(batch: int, iters: int) -> None:
    """PyTorch DDP (gloo), 2 processes x 1 thread, per-rank ``batch``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_torch_rank, args=(r, 2, port, batch, iters, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent --------------------------------------------------------------------------------
def _launch(mode: str, global_batch: int, iters: int) -> dict | None:
    threads = {"one": 2, "one1": 1, "mpi": 1, "ddp": 1, "memory": 1}[mode]
    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    me = [sys.executable, str(Path(__file__).resolve())]
    if mode in ("one", "one1"):
        cmd = [*me, "--worker", "netengine", "--batch", str(global_batch)]
    elif mode == "memory":  # one process with the per-rank batch: the memory reference
        cmd = [*me, "--worker", "netengine", "--batch", str(global_batch // 2)]
    elif mode == "mpi":
        cmd = [_mpiexec(), "-n", "2", *me, "--worker", "netengine",
               "--batch", str(global_batch // 2)]
    else:
        cmd = [*me, "--worker", "torch", "--batch", str(global_batch // 2)]
    cmd += ["--iters", str(iters if mode != "memory" else max(iters // 10, 20))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  {mode} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}",
          file=sys.stderr)
    return None


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent
    return next((str(here / n) for n in ("mpiexec", "mpirun") if (here / n).exists()),
                shutil.which("mpiexec") or shutil.which("mpirun"))


def _has(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"],
                          capture_output=True).returncode == 0


def _table(batch: int, runs: dict[str, list[dict]], iters: int, rounds: int) -> None:
    rate = {m: statistics.median(r["iters_per_s"] for r in rs) for m, rs in runs.items() if rs}
    print(f"\nLeNet, global batch {batch}, {iters} iterations, median of {rounds} round(s):")
    print(f"  {'mode':34s} {'iter/s':>8s} {'img/s':>8s}  peak RSS MiB per process")
    names = {"one": "1 process x 2 threads", "one1": "1 process x 1 thread",
             "mpi": "mpiexec -n 2 x 1 thread",
             "ddp": "PyTorch DDP gloo, 2 x 1 thread",
             "memory": f"1 process, batch {batch // 2} (memory ref.)"}
    for mode in ("one", "one1", "mpi", "ddp", "memory"):
        if mode not in rate:
            continue
        peaks = runs[mode][-1]["peak_mib"]
        print(f"  {names[mode]:34s} {rate[mode]:8.1f} {rate[mode] * batch:8.0f}  "
              f"{', '.join(f'{p:.0f}' for p in peaks)}")
    if "one" in rate and "mpi" in rate:
        print(f"  speed-up mpiexec -n 2 / 1 process x 2 threads: {rate['mpi'] / rate['one']:.2f}x")
    if "one1" in rate and "mpi" in rate:
        print(f"  speed-up mpiexec -n 2 / 1 process x 1 thread:  {rate['mpi'] / rate['one1']:.2f}x")
    if "ddp" in rate and "mpi" in rate:
        print(f"  mpiexec -n 2 / PyTorch DDP:        {rate['mpi'] / rate['ddp']:.2f}x")
    if "mpi" in rate:
        mpi = runs["mpi"]
        step_ms = statistics.median(r["allreduce_ms"] for r in mpi)
        bare_ms = statistics.median(r["bare_allreduce_ms"] for r in mpi)
        mpi_ms = statistics.median(r["bare_mpi_allreduce_ms"] for r in mpi)
        print(f"  all-reduce per step in the solver (waits included): {step_ms:.3f} ms")
        print(f"  bare sum of {mpi[-1]['params']} float32 ({mpi[-1]['sum_kind']}): "
              f"{bare_ms:.3f} ms; MPI_Allreduce of the same: {mpi_ms:.3f} ms")
    if "memory" in rate and "mpi" in rate:
        ref = runs["memory"][-1]["peak_mib"][0]
        worst = max(runs["mpi"][-1]["peak_mib"])
        print(f"  peak RSS per rank / one process with the per-rank batch: {worst / ref:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("netengine", "torch"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.worker == "netengine":
        worker_netengine(args.batch, args.iters)
        return 0
    if args.worker == "torch":
        worker_torch(args.batch, args.iters)
        return 0
    modes = ["one", "one1"]
    if _mpiexec() and _has("mpi4py"):
        modes.append("mpi")
    else:
        print("no mpiexec/mpi4py (pip install -e '.[mpi]'): the mpiexec column is left out")
    if _has("torch"):
        modes.append("ddp")
    else:
        print("no torch (pip install -e '.[bench]'): the PyTorch DDP column is left out")
    modes.append("memory")
    for batch in (int(b) for b in args.batches.split(",")):
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                result = _launch(mode, batch, args.iters)
                if result is not None:
                    runs[mode].append(result)
        _table(batch, runs, args.iters, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
