"""test: score a trained model, as ``caffe test``.

    tools/test --model NET.prototxt --weights W.caffemodel [--iterations 50] [--gpu ID]
               [--level N] [--stage a,b] [--phase TEST|TRAIN]

Builds the net (TEST phase by default), copies the weights (binary or HDF5 caffemodel, several
comma-separated), runs ``--iterations`` forward passes and logs, in Caffe's format on stderr,
``Batch i, <output> = v`` for every output element of every batch, then ``Loss: L`` and each
output's mean over the batches as ``<output> = mean`` (with ``(* w = w·mean loss)`` for loss
outputs). The net reads its own data (a Data layer); Input-only nets are scored on zeros.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np

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
        prog="test", description="Score a model: mean of every net output over N batches "
                                 "(like `caffe test`).")
    parser.add_argument("--model", default="", help="the net prototxt (required)")
    parser.add_argument("--weights", default="",
                        help="trained weights (required): caffemodel(s), comma-separated")
    parser.add_argument("--iterations", type=int, default=50,
                        help="number of batches to score (default 50)")
    add_common_flags(parser, phase_default="TEST")
    args = parse_caffe_args(parser, argv)
    require(parser, args.model, "need a model definition to score: give --model")
    require(parser, args.weights, "need model weights to score: give --weights")
    if args.iterations < 1:
        parser.error(f"--iterations must be >= 1, got {args.iterations}")
    return args


def score(args) -> int:
    from netengine.net import TEST, TRAIN, Net

    use_device(gpu_id(args.gpu))
    net = Net(args.model, TEST if args.phase == "TEST" else TRAIN, level=args.level,
              stages=stages(args.stage))
    for name in filter(None, (s.strip() for s in args.weights.split(","))):
        net.copy_from(name, strict=True)
    log.info("Running for %d iterations.", args.iterations, extra=at("caffe.cpp:304"))
    sums: dict[str, np.ndarray] = {}
    loss = 0.0
    last = len(net.layers) - 1
    for i in range(args.iterations):
        loss += net.forward_from_to(0, last)
        for name in net.outputs:
            values = backend.to_host(net.blobs[name].data).astype(np.float64).reshape(-1)
            for value in values:
                log.info("Batch %d, %s = %s", i, name, fmt(float(value)),
                         extra=at("caffe.cpp:325"))
            if name in sums:
                sums[name] += values
            else:
                sums[name] = values.copy()
    log.info("Loss: %s", fmt(loss / args.iterations), extra=at("caffe.cpp:330"))
    for name, total in sums.items():
        weight = net.blob_loss_weights.get(name, 0.0)
        for mean in total / args.iterations:
            tail = f" (* {fmt(weight)} = {fmt(weight * mean)} loss)" if weight else ""
            log.info("%s = %s%s", name, fmt(float(mean)), tail, extra=at("caffe.cpp:342"))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: score(args))


if __name__ == "__main__":
    raise SystemExit(main())
