"""Caffe-compatible protobuf schema; ``caffe_pb2`` is generated from proto/caffe.proto."""

import importlib

__all__ = ["caffe_pb2"]


def __getattr__(name):
    # Lazy so that ``python -m netengine.proto.generate`` works even when
    # caffe_pb2.py is missing or stale.
    if name == "caffe_pb2":
        return importlib.import_module(f"{__name__}.caffe_pb2")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
