"""Upgrades of legacy net and solver formats to the current one (Caffe's upgrade_proto).

Each step checks whether it applies, rewrites the message, and reports a one-line notice.
"""
from __future__ import annotations

import logging

from netengine.errors import NetEngineError
from netengine.proto import caffe_pb2

log = logging.getLogger("netengine")


def _upgrade_net_input(param, lines: list) -> list:
    """Net-level input / input_shape / input_dim → an Input layer named 'input' in front."""
    if not param.input:
        return lines
    if param.input_dim and len(param.input_dim) != 4 * len(param.input):
        raise NetEngineError(f"input_dim must give 4 values per input: {len(param.input)} "
                             f"input(s), {len(param.input_dim)} input_dim value(s)")
    if param.input_shape and len(param.input_shape) not in (1, len(param.input)):
        raise NetEngineError(f"input_shape must be given once per input: {len(param.input)} "
                             f"input(s), {len(param.input_shape)} input_shape(s)")
    layer = caffe_pb2.LayerParameter(name="input", type="Input")
    for i, name in enumerate(param.input):
        layer.top.append(name)
        shape = layer.input_param.shape.add()
        if param.input_shape:
            shape.CopyFrom(param.input_shape[i if len(param.input_shape) > 1 else 0])
        elif param.input_dim:
            shape.dim.extend(param.input_dim[4 * i:4 * i + 4])
    existing = list(param.layer)
    del param.layer[:]
    param.layer.append(layer)
    param.layer.extend(existing)
    del param.input[:]
    del param.input_shape[:]
    del param.input_dim[:]
    log.info("upgraded net-level inputs to an Input layer")
    return [None] + list(lines)


def upgrade_net(param, lines: list, file: str | None = None):
    """Bring ``param`` to the current format; returns (param, layer lines)."""
    if len(param.layers):
        raise NetEngineError("this net uses the legacy V1 'layers' format, which is not "
                             "supported yet", file=file)
    lines = _upgrade_net_input(param, lines)
    return param, lines
