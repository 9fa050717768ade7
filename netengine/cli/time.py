"""time: benchmark a net's layers, as ``caffe time``.

    tools/time --model NET.prototxt [--iterations 50] [--weights W.caffemodel] [--gpu ID]
               [--level N] [--stage a,b] [--phase TRAIN|TEST]

One warm-up forward and backward, then ``--iterations`` timed passes; logs (Caffe's format, on
stderr) each iteration's forward-backward time, every layer's mean forward and backward time,
the average forward, backward and forward-backward passes and the total. Layers that need no
backward are not called in the backward pass (their time is 0). On a GPU each measurement waits
for the device to finish.
"""
from __future__ import annotations

import argparse
import logging
import time

from netengine import backend
from netengine.cli import (
    add_common_flags,
    gpu_id,
    parse_caffe_args,
    require,
    run,
    stages,
    use_device,
)
from netengine.logging_glog import at, fmt

log = logging.getLogger("netengine.cli")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="time", description="Time a net's forward and backward passes layer by layer "
                                 "(like `caffe time`).")
    parser.add_argument("--model", default="", help="the net prototxt (required)")
    parser.add_argument("--iterations", type=int, default=50,
                        help="number of timed forward-backward passes (default 50)")
    parser.add_argument("--weights", default="",
                        help="optional weights to load first (caffemodel, comma-separated)")
    add_common_flags(parser, phase_default="TRAIN")
    args = parse_caffe_args(parser, argv)
    require(parser, args.model, "need a model definition to time: give --model")
    if args.iterations < 1:
        parser.error(f"--iterations must be >= 1, got {args.iterations}")
    return args


def layer_times(net, iterations: int, report=None) -> tuple[list[float], list[float], float]:
    """Mean forward and backward ms per layer over ``iterations`` passes, and the total ms.

    ``report(j, ms)`` is told each pass's forward-backward time.
    """
    n = len(net.layers)
    forward_ms, backward_ms = [0.0] * n, [0.0] * n
    clock = time.perf_counter
    total_start = clock()
    for j in range(iterations):
        start = clock()
        for i in range(n):
            t = clock()
            net.forward_from_to(i, i)
            backend.synchronize()
            forward_ms[i] += (clock() - t) * 1e3
        for i in range(n - 1, -1, -1):
            if not net.layer_need_backward[i]:
                continue
            t = clock()
            net.backward_from_to(i, i)
            backend.synchronize()
            backward_ms[i] += (clock() - t) * 1e3
        if report is not None:
            report(j, (clock() - start) * 1e3)
    total = (clock() - total_start) * 1e3
    return ([t / iterations for t in forward_ms], [t / iterations for t in backward_ms], total)


def benchmark(args) -> int:
    from netengine.net import TEST, TRAIN, Net

    use_device(gpu_id(args.gpu))
    net = Net(args.model, TRAIN if args.phase == "TRAIN" else TEST, level=args.level,
              stages=stages(args.stage))
    for name in filter(None, (s.strip() for s in args.weights.split(","))):
        net.copy_from(name)
    where = at("caffe.cpp:360")
    log.info("Performing Forward", extra=where)
    loss = net.forward_from_to(0, len(net.layers) - 1)
    log.info("Initial loss: %s", fmt(loss), extra=where)
    log.info("Performing Backward", extra=where)
    net.backward_from_to(len(net.layers) - 1, 0)
    backend.synchronize()
    log.info("*** Benchmark begins ***", extra=where)
    log.info("Testing for %d iterations.", args.iterations, extra=where)
    forward_ms, backward_ms, total = layer_times(
        net, args.iterations,
        lambda j, ms: log.info("Iteration: %d forward-backward time: %s ms.", j + 1, fmt(ms),
                               extra=at("caffe.cpp:397")))
    log.info("Average time per layer: ", extra=at("caffe.cpp:400"))
    for layer, fwd, bwd in zip(net.layers, forward_ms, backward_ms):
        log.info("%10s\tforward: %s ms.", layer.name, fmt(fwd), extra=at("caffe.cpp:404"))
        log.info("%10s\tbackward: %s ms.", layer.name, fmt(bwd), extra=at("caffe.cpp:406"))
    log.info("Average Forward pass: %s ms.", fmt(sum(forward_ms)), extra=at("caffe.cpp:409"))
    log.info("Average Backward pass: %s ms.", fmt(sum(backward_ms)), extra=at("caffe.cpp:411"))
    log.info("Average Forward-Backward: %s ms.", fmt(total / args.iterations),
             extra=at("caffe.cpp:413"))
    log.info("Total Time: %s ms.", fmt(total), extra=at("caffe.cpp:415"))
    log.info("*** Benchmark ends ***", extra=at("caffe.cpp:416"))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: benchmark(args))


if __name__ == "__main__":
    raise SystemExit(main())
