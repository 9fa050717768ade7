"""transform_param: Caffe's DataTransformer for a whole batch, and mean files.

``y = (x - mean) * scale`` then crop (TRAIN: random offset, TEST: centre) and mirror (a coin
flip per image in both phases); the mean is taken at the source pixel, so crop/mirror commute
with it as in Caffe.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from netengine.blob import blob_from_proto
from netengine.errors import NetEngineError
from netengine.formats.prototxt import read_binary_proto
from netengine.proto import caffe_pb2


# -- transform_param ------------------------------------------------------------------------------
def read_mean_file(path: str | os.PathLike) -> np.ndarray:
    """A mean image from a binaryproto BlobProto, as a (C, H, W) float32 array."""
    try:
        array = blob_from_proto(read_binary_proto(path, caffe_pb2.BlobProto()))
    except NetEngineError as err:
        raise NetEngineError(f"mean file {path}: {err.message}") from None
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise NetEngineError(f"{path}: a mean file holds one (1, C, H, W) image, got shape "
                             f"{array.shape}")
    return array


class Transformer:
    """Caffe's DataTransformer over a batch: ``(x - mean) * scale``, crop, mirror.

    ``param`` is a TransformationParameter; ``mean`` a (C, H, W) array from mean_file (None:
    use mean_value, if any). Randomness (mirror coins, TRAIN crop offsets) comes from the
    generator given to ``apply``, so a caller that seeds it per batch gets repeatable batches.
    """

    def __init__(self, param: caffe_pb2.TransformationParameter, phase: int,
                 mean: np.ndarray | None = None) -> None:
        if param.HasField("mean_file") and len(param.mean_value):
            raise NetEngineError("transform_param: give mean_file or mean_value, not both")
        self.param, self.phase = param, phase
        self.scale = param.scale
        self.crop = param.crop_size
        self.mirror = param.mirror
        self.mean_file = mean
        self.mean_value = np.asarray(param.mean_value, dtype=np.float32)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of a transformed record of input ``shape``; checks the mean and crop."""
        channels, height, width = shape
        if self.mean_file is not None and tuple(self.mean_file.shape) != tuple(shape):
            named = f" {self.param.mean_file}" if self.param.mean_file else ""
            raise NetEngineError(f"transform_param: the mean file{named} has "
                                 f"shape {tuple(self.mean_file.shape)}, the records' is "
                                 f"{tuple(shape)}")
        if len(self.mean_value) not in (0, 1, channels):
            raise NetEngineError(f"transform_param: give 1 mean_value or one per channel "
                                 f"({channels}), got {len(self.mean_value)}")
        if self.crop:
            if self.crop > height or self.crop > width:
                raise NetEngineError(f"transform_param: crop_size {self.crop} exceeds the "
                                     f"records' {height}x{width}")
            return channels, self.crop, self.crop
        return channels, height, width

    def apply(self, batch: np.ndarray, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
        """Transform (N, C, H, W) records into a new (N, C, h, w) array of ``dtype`` (host).
        ``batch`` may also be a list of (C, H_i, W_i) records of different sizes when a crop
        is set: each is cropped (as Caffe transforms each datum by itself)."""
        if isinstance(batch, list):
            return self._apply_ragged(batch, rng, dtype)
        n, channels, height, width = batch.shape
        out_c, out_h, out_w = self.output_shape(batch.shape[1:])
        # Draw order per batch: mirror coins, then TRAIN crop offsets (rows, then columns).
        flips = rng.integers(0, 2, size=n).astype(bool) if self.mirror else None
        x = batch.astype(dtype, copy=True)
        if self.mean_file is not None:
            x -= self.mean_file.astype(dtype)
        elif len(self.mean_value):
            x -= self.mean_value.astype(dtype).reshape(-1, 1, 1)
        if self.scale != 1:
            x *= x.dtype.type(self.scale)
        if not self.crop and flips is None:
            return x
        if self.crop and self.phase == caffe_pb2.TRAIN:
            h_off = rng.integers(0, height - out_h + 1, size=n)
            w_off = rng.integers(0, width - out_w + 1, size=n)
        else:
            h_off = np.full(n, (height - out_h) // 2)
            w_off = np.full(n, (width - out_w) // 2)
        rows = h_off[:, None] + np.arange(out_h)
        cols = w_off[:, None] + np.arange(out_w)
        if flips is not None:
            cols = np.where(flips[:, None], cols[:, ::-1], cols)
        items = np.arange(n)[:, None, None, None]
        chans = np.arange(out_c)[None, :, None, None]
        return x[items, chans, rows[:, None, :, None], cols[:, None, None, :]]

    def _apply_ragged(self, records: list, rng: np.random.Generator, dtype) -> np.ndarray:
        """Records of different sizes, each cropped to crop_size (same draw order as
        ``apply``: the mirror coins, then row offsets, then column offsets)."""
        n, crop = len(records), self.crop
        if not crop:
            raise NetEngineError("records of different sizes need transform_param.crop_size")
        for record in records:
            self.output_shape(record.shape)  # mean and crop checks, per record
        flips = rng.integers(0, 2, size=n).astype(bool) if self.mirror else np.zeros(n, bool)
        heights = np.array([r.shape[1] for r in records])
        widths = np.array([r.shape[2] for r in records])
        if self.phase == caffe_pb2.TRAIN:
            h_off = rng.integers(0, heights - crop + 1)
            w_off = rng.integers(0, widths - crop + 1)
        else:
            h_off, w_off = (heights - crop) // 2, (widths - crop) // 2
        out = np.empty((n, records[0].shape[0], crop, crop), dtype=dtype)
        for i, record in enumerate(records):
            x = record[:, h_off[i]:h_off[i] + crop, w_off[i]:w_off[i] + crop].astype(dtype)
            if self.mean_file is not None:
                x -= self.mean_file[:, h_off[i]:h_off[i] + crop,
                                    w_off[i]:w_off[i] + crop].astype(dtype)
            elif len(self.mean_value):
                x -= self.mean_value.astype(dtype).reshape(-1, 1, 1)
            if self.scale != 1:
                x *= x.dtype.type(self.scale)
            out[i] = x[:, :, ::-1] if flips[i] else x
        return out
