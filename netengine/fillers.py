"""Caffe's seven weight fillers, drawn from netengine's seedable generator.

Each filler reads its FillerParameter (the proto holds the defaults) and writes into a blob's
data. Values are drawn on the host in float64 and cast, then copied to the blob's device.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import numpy as np

from netengine import backend
from netengine.blob import Blob
from netengine.errors import LayerError

_SKIP = contextvars.ContextVar("netengine_skip_fillers", default=False)


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
    count = int(np.prod(shape)) if shape else 1
    fan_in = count / shape[0] if shape and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _norm_n(param, shape) -> float:
    fan_in, fan_out = _fans(shape)
    mode = param.VarianceNorm.Name(param.variance_norm)
    n = fan_out if mode == "FAN_OUT" else (fan_in + fan_out) / 2.0 if mode == "AVERAGE" \
        else fan_in
    if n <= 0:  # Caffe CHECKs the blob's count: an input with 0 channels, num_output 0, ...
        raise LayerError(f"the {param.type} filler scales by the blob's fan ({mode}), which is "
                         f"0 for shape {shape}: expected no zero dimension (an input with 0 "
                         "channels?)")
    return n


def _constant(param, shape, rng):
    return np.full(shape, param.value, dtype=np.float64)


def _uniform(param, shape, rng):
    return rng.uniform(param.min, param.max, size=shape)


def _gaussian(param, shape, rng):
    values = rng.normal(param.mean, param.std, size=shape)
    if param.sparse >= 0:
        # Caffe keeps each weight with probability sparse / num_outputs (shape[0]).
        keep = param.sparse / float(shape[0]) if shape else 1.0
        values *= rng.random(size=shape) < keep
    return values


def _positive_unitball(param, shape, rng):
    values = rng.uniform(0.0, 1.0, size=shape)
    rows = values.reshape(shape[0] if shape else 1, -1)
    rows /= rows.sum(axis=1, keepdims=True)
    return rows.reshape(shape)


def _xavier(param, shape, rng):
    scale = math.sqrt(3.0 / _norm_n(param, shape))
    return rng.uniform(-scale, scale, size=shape)


def _msra(param, shape, rng):
    return rng.normal(0.0, math.sqrt(2.0 / _norm_n(param, shape)), size=shape)


def _bilinear(param, shape, rng):
    if len(shape) != 4 or shape[2] != shape[3]:
        raise LayerError(f"the bilinear filler needs a 4-D blob with square kernels, got {shape}")
    k = shape[3]
    f = math.ceil(k / 2.0)
    # Caffe's centre uses its integer f, which makes odd kernels slightly asymmetric.
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    x = np.arange(k, dtype=np.float64)
    weights_1d = 1.0 - np.abs(x / f - c)
    kernel = np.outer(weights_1d, weights_1d)
    return np.broadcast_to(kernel, shape).copy()


FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def filler_values(param, shape: tuple[int, ...]) -> np.ndarray:
    """Values of ``shape`` drawn as FillerParameter ``param`` asks (float64, on the host)."""
    try:
        fill = FILLERS[param.type]
    except KeyError:
        raise LayerError(f"unknown filler type '{param.type}'; expected one of "
                         + ", ".join(sorted(FILLERS))) from None
    return fill(param, tuple(shape), backend.rng())


@contextlib.contextmanager
def skipped() -> Iterator[None]:
    """Within this block ``fill`` runs the filler's checks but leaves blobs at zero: a net built
    only for its shapes (tools/summarize) then neither draws random numbers nor touches the
    pages of huge weight blobs (AlexNet's fc6 at 1000x1000 input: 3.8 GB)."""
    token = _SKIP.set(True)
    try:
        yield
    finally:
        _SKIP.reset(token)


def fill(blob: Blob, param) -> None:
    """Fill ``blob.data`` as FillerParameter ``param`` asks."""
    if _SKIP.get():
        # The filler's type and shape checks still run, on a few values: kernel axes kept
        # (the bilinear filler checks them), every other axis cut to at most 2.
        shape = blob.shape
        kept = 2 if len(shape) == 4 else 0
        filler_values(param, tuple(min(d, 2) for d in shape[:len(shape) - kept])
                      + shape[len(shape) - kept:])
        return
    values = filler_values(param, blob.shape)
    blob.data[...] = backend.to_module(values.astype(blob.dtype, copy=False), blob.xp)
