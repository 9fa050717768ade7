"""device_query: show the GPU a run would use, as ``caffe device_query``.

    netengine device_query [--gpu ID]

Logs (glog format, stderr) the device's name and memory and the CuPy, CUDA and cuDNN versions.
Without CuPy or a GPU it says why in one line and exits 1: netengine then runs on the CPU.
"""
from __future__ import annotations

import argparse
import logging

from netengine import backend
from netengine.cli import gpu_id, parse_caffe_args, run
from netengine.errors import NetEngineError
from netengine.logging_glog import at

log = logging.getLogger("netengine.cli")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="device_query", description="Show the GPU a run would use (like `caffe "
                                         "device_query`); exit status 1 where there is none.")
    parser.add_argument("--gpu", default="0", help="the GPU id to query (default 0)")
    return parse_caffe_args(parser, argv)


def query(args) -> int:
    device = gpu_id(args.gpu) or 0
    log.info("Querying GPUs %d", device, extra=at("caffe.cpp:161"))
    reason = backend.gpu_unavailable_reason(device)
    if reason is not None:
        raise NetEngineError(f"{reason} (netengine runs on the CPU without one)")
    backend.set_device(device)
    log.info("%s", backend.device_summary(), extra=at("common.cpp:169"))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: query(args))


if __name__ == "__main__":
    raise SystemExit(main())
