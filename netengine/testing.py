"""Test utilities: build a single layer from prototxt text and check its gradients numerically.

The checker uses central differences in float64 on a random linear objective
``f = sum_t <R_t, top_t>`` (so loss layers and ordinary layers are checked the same way):
the analytic gradient comes from ``backward`` with ``top.diff = R``. The random seed is
re-applied before every forward so layers that draw random numbers (Dropout) repeat their
draw. Kinks (ReLU at 0, max ties) can be skipped with ``kink``/``kink_range`` as in Caffe.
"""
from __future__ import annotations

import types
from collections.abc import Sequence

import numpy as np
from google.protobuf import text_format

from netengine import backend
from netengine.blob import Blob
from netengine.layers import Layer, create_layer
from netengine.proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def make_layer(text: str, phase: int = TRAIN) -> Layer:
    """A layer from the body of a prototxt ``layer { ... }`` block (name defaults to type)."""
    param = caffe_pb2.LayerParameter()
    text_format.Merge(text, param)
    param.phase = phase
    if not param.name:
        param.name = param.type.lower() or "layer"
    return create_layer(param)


def make_blobs(shapes: Sequence[Sequence[int]], xp: types.ModuleType = np, dtype=np.float64,
               seed: int = 0, scale: float = 1.0) -> list[Blob]:
    """Blobs of the given shapes holding N(0, scale²) data."""
    rng = np.random.default_rng(seed)
    blobs = []
    for shape in shapes:
        blob = Blob(tuple(shape), dtype=dtype, xp=xp)
        blob.data[...] = backend.to_module(rng.normal(0.0, scale, size=tuple(shape)).astype(dtype),
                                           xp)
        blobs.append(blob)
    return blobs


def setup_layer(layer: Layer, bottom: list[Blob], num_tops: int = 1) -> list[Blob]:
    """Create ``num_tops`` top blobs like the bottoms and run the layer's setup."""
    ref = bottom[0] if bottom else None
    dtype = ref.dtype if ref is not None else np.float64
    xp = ref.xp if ref is not None else np
    top = [Blob((), dtype=dtype, xp=xp) for _ in range(num_tops)]
    layer.setup(bottom, top)
    return top


def forward(layer: Layer, bottom: list[Blob], top: list[Blob], seed: int = 1701) -> float:
    backend.set_random_seed(seed)
    return layer.forward(bottom, top)


def _objective(top: list[Blob], weights: list[np.ndarray]) -> float:
    return float(sum(np.sum(backend.to_host(t.data).astype(np.float64) * w)
                     for t, w in zip(top, weights)))


def _flat_set(array, index: int, value: float) -> None:
    array.reshape(-1)[index] = value


def check_gradient(layer: Layer, bottom: list[Blob], top: list[Blob], *,
                   check_bottom: Sequence[int] | None = None, check_params: bool = True,
                   stepsize: float = 1e-3, threshold: float = 1e-4, kink: float | None = None,
                   kink_range: float = -1.0, elementwise: bool = False,
                   seed: int = 1701) -> None:
    """Compare backward's gradients with central differences; AssertionError on mismatch.

    ``check_bottom``: indices of bottoms to check (default: all). ``threshold`` is relative to
    max(|analytic|, |numeric|, 1). ``elementwise``: every top element depends only on the
    same element of bottom 0 (neuron layers), so one perturbation of all elements suffices.
    """
    if check_bottom is None:
        check_bottom = list(range(len(bottom)))
    if any(t is b for t in top for b in bottom):
        raise ValueError("check_gradient needs separate top and bottom blobs (not in place)")
    rng = np.random.default_rng(seed)
    forward(layer, bottom, top, seed)
    weights = [rng.normal(size=t.shape) for t in top]
    for t, w in zip(top, weights):
        t.diff[...] = backend.to_module(w.astype(t.dtype), t.xp)
    for blob in layer.blobs:
        blob.diff[...] = 0
    propagate = [i in check_bottom for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)

    targets: list[tuple[str, Blob]] = [(f"bottom {i}", bottom[i]) for i in check_bottom]
    if check_params:
        targets += [(f"param {j}", b) for j, b in enumerate(layer.blobs)
                    if j >= len(layer.param_propagate_down) or layer.param_propagate_down[j]]
    analytic = {name: backend.to_host(blob.diff).astype(np.float64).copy()
                for name, blob in targets}

    failures = []
    for name, blob in targets:
        numeric = _numeric_gradient(layer, bottom, top, blob, weights, stepsize, seed,
                                     elementwise and name == "bottom 0")
        values = backend.to_host(blob.data).reshape(-1)
        grad = analytic[name].reshape(-1)
        for i in range(values.size):
            if kink is not None and abs(float(values[i]) - kink) < kink_range:
                continue
            scale = max(abs(grad[i]), abs(numeric[i]), 1.0)
            if abs(grad[i] - numeric[i]) > threshold * scale:
                failures.append(f"{name} element {np.unravel_index(i, blob.shape)}: "
                                f"analytic {grad[i]:.6g} vs numeric {numeric[i]:.6g}")
    if failures:
        raise AssertionError(f"{layer!r}: {len(failures)} gradient mismatch(es); first: "
                             + "; ".join(failures[:5]))


def _numeric_gradient(layer, bottom, top, blob, weights, h, seed, elementwise) -> np.ndarray:
    data = blob.data
    original = backend.to_host(data).copy().reshape(-1)
    if elementwise:
        data[...] = backend.to_module((original + h).reshape(blob.shape).astype(blob.dtype),
                                      blob.xp)
        forward(layer, bottom, top, seed)
        plus = backend.to_host(top[0].data).astype(np.float64).reshape(-1).copy()
        data[...] = backend.to_module((original - h).reshape(blob.shape).astype(blob.dtype),
                                      blob.xp)
        forward(layer, bottom, top, seed)
        minus = backend.to_host(top[0].data).astype(np.float64).reshape(-1)
        data[...] = backend.to_module(original.reshape(blob.shape), blob.xp)
        return weights[0].reshape(-1) * (plus - minus) / (2 * h)
    grad = np.zeros(original.size)
    for i in range(original.size):
        _flat_set(data, i, original[i] + h)
        forward(layer, bottom, top, seed)
        plus = _objective(top, weights)
        _flat_set(data, i, original[i] - h)
        forward(layer, bottom, top, seed)
        minus = _objective(top, weights)
        _flat_set(data, i, original[i])
        grad[i] = (plus - minus) / (2 * h)
    forward(layer, bottom, top, seed)
    return grad
