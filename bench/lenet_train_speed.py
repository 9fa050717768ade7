#!/usr/bin/env python3
"""LeNet training speed: images/second of the full train step (forward + backward + SGD update)
through the solver, plus each layer's forward/backward milliseconds.

The net is Caffe's MNIST LeNet in TRAIN phase with Input layers (the golden
``lenet_train.prototxt`` when ../shared is present, else the same net built in here), batch 64,
Caffe's lenet_solver settings (SGD, momentum 0.9, weight decay 5e-4, inv policy). Random MNIST-
shaped data is written before every forward pass, so data loading is not measured.

  python bench/lenet_train_speed.py                     # CPU, 5 repeats of 10 iterations
  python bench/lenet_train_speed.py --repeats 9 --iterations 20 --gpu 0
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from netengine import backend  # noqa: E402
from netengine.cli.time import layer_times  # noqa: E402
from netengine.solvers import SGDSolver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lenet_cpu import LENET  # noqa: E402 - the one LeNet definition of the benchmarks

GOLDEN_NET = REPO.parent / "shared" / "caffe-golden" / "cases" / "lenet_train.prototxt"


SOLVER = """net: "%(net)s"
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
max_iter: 1000000
random_seed: 1701
snapshot_after_train: false
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--iterations", type=int, default=10,
                        help="train steps per timed repeat (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--gpu", type=int, default=None, help="GPU id (needs CuPy)")
    return parser.parse_args()


def build_solver(folder: Path, batch: int) -> SGDSolver:
    if batch == 64 and GOLDEN_NET.exists():
        net = GOLDEN_NET
    else:
        net = folder / "lenet_train.prototxt"
        net.write_text(LENET % {"n": batch})
    solver_path = folder / "lenet_solver.prototxt"
    solver_path.write_text(SOLVER % {"net": net})
    solver = SGDSolver(str(solver_path))
    rng = np.random.default_rng(0)
    images = (rng.integers(0, 256, size=(8, batch, 1, 28, 28)) * 0.00390625).astype(np.float32)
    labels = rng.integers(0, 10, size=(8, batch)).astype(np.float32)
    xp = solver.net.blobs["data"].xp
    images, labels = xp.asarray(images), xp.asarray(labels)
    served = [0]

    def feed(layer_index: int) -> None:
        if layer_index == 0:
            k = served[0] % len(images)
            solver.net.blobs["data"].data[...] = images[k]
            solver.net.blobs["label"].data[...] = labels[k]
            served[0] += 1

    solver.net.before_forward(feed)
    return solver


def main() -> int:
    args = parse_args()
    if args.gpu is not None:
        backend.set_device(args.gpu)
        backend.set_mode_gpu()
    with tempfile.TemporaryDirectory() as tmp:
        solver = build_solver(Path(tmp), args.batch)
        solver.step(args.warmup)
        backend.synchronize()
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            solver.step(args.iterations)
            backend.synchronize()
            rates.append(args.batch * args.iterations / (time.perf_counter() - start))
        update_ms = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            solver.apply_update()
            backend.synchronize()
            update_ms.append((time.perf_counter() - start) * 1e3)
        forward_ms, backward_ms, _ = layer_times(solver.net, args.iterations)
    device = f"GPU {args.gpu}" if args.gpu is not None else "CPU"
    median = statistics.median(rates)
    print(f"LeNet train step, batch {args.batch}, {device}: {median:.0f} images/s "
          f"(median of {args.repeats} x {args.iterations} steps; min {min(rates):.0f}, "
          f"max {max(rates):.0f}); {args.batch / median * 1e3:.2f} ms per step")
    print(f"  SGD update (all params): {statistics.median(update_ms):.3f} ms")
    print(f"  {'layer':<8} {'forward ms':>11} {'backward ms':>12}")
    for layer, fwd, bwd in zip(solver.net.layers, forward_ms, backward_ms):
        print(f"  {layer.name:<8} {fwd:>11.3f} {bwd:>12.3f}")
    print(f"  {'total':<8} {sum(forward_ms):>11.3f} {sum(backward_ms):>12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
