"""MNIST's IDX files, and record sources held in memory.

``read_idx`` / ``write_idx``: a ``.gz`` file is read transparently (recognised by its magic
bytes, whatever its name) and written when the name ends in ``.gz``. Header: two zero bytes, a
type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the
number of axes, then each axis as a big-endian uint32; the values follow in C order, big-endian.

A record source (``IDXSource``, ``ArraySource``, and the databases of :mod:`netengine.data.db`)
has a length, a per-record shape (C, H, W) and ``read(indices) -> (images, labels)``; the Data
layer serves batches from it.
"""
from __future__ import annotations

import gzip
import io as _io
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from netengine.data.sources import gz_variants, read_bytes
from netengine.errors import NetEngineError
from netengine.formats.prototxt import write_atomic

IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
             0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_MAX_AXES = 32  # NumPy's array rank limit (32 before NumPy 2)
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def is_idx_images(path: str | os.PathLike) -> bool:
    """True for an MNIST-style images file name (``...-idx3-ubyte`` or ``...idx3-ubyte.gz``)."""
    return re.search(r"idx3-ubyte(\.gz)?$", Path(path).name) is not None


def idx_labels_path(images: str | os.PathLike) -> Path | None:
    """The labels file beside an IDX images file (idx3 → idx1, images → labels), or None."""
    images = Path(images)
    name = images.name.replace("idx3-ubyte", "idx1-ubyte")
    renamed = re.sub(r"images(?!.*images)", "labels", name)
    for candidate_name in dict.fromkeys([renamed, name]):
        if candidate_name == images.name:
            continue
        for candidate in gz_variants(images.with_name(candidate_name)):
            if candidate.exists():
                return candidate
    return None


def parse_idx(data: bytes, where: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes into an array (native byte order)."""
    if len(data) < 4 or data[0] or data[1]:
        raise NetEngineError(f"{where}: not an IDX file (expected 2 zero bytes, a type code "
                             f"and an axis count at the start)")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        raise NetEngineError(f"{where}: unknown IDX type code 0x{code:02X} (expected one of "
                             + ", ".join(f"0x{c:02X}" for c in IDX_TYPES) + ")")
    if ndim > _MAX_AXES:
        raise NetEngineError(f"{where}: an IDX header claiming {ndim} axes (expected at most "
                             f"{_MAX_AXES})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise NetEngineError(f"{where}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_TYPES[code]
    need = math.prod(shape) * dtype.itemsize  # Python ints: a hostile header cannot wrap
    if len(data) - header < need:
        raise NetEngineError(f"{where}: truncated IDX file: shape {shape} needs {need} bytes "
                             f"of values, found {len(data) - header}")
    array = np.frombuffer(data, dtype=dtype, count=need // dtype.itemsize, offset=header)
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array an IDX file (plain or gzipped) holds."""
    return parse_idx(read_bytes(path), str(path))


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of ``array`` (uint8, int8, int16, int32, float32 or float64)."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("=")
    if dtype not in _IDX_CODES:
        raise NetEngineError(f"IDX cannot hold {array.dtype} values (uint8, int8, int16, int32, "
                             "float32 or float64)")
    if array.ndim > 255:
        raise NetEngineError("IDX holds at most 255 axes")
    header = bytes([0, 0, _IDX_CODES[dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype.newbyteorder(">")).tobytes()


def gzip_bytes(data: bytes) -> bytes:
    """Reproducible gzip (no file name, mtime 0): the same input always gives the same bytes."""
    buffer = _io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9,
                       mtime=0) as stream:
        stream.write(data)
    return buffer.getvalue()


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as IDX (atomically); gzipped when ``compress`` or the name ends .gz."""
    data = idx_bytes(array)
    if compress or (compress is None and str(path).endswith(".gz")):
        data = gzip_bytes(data)
    write_atomic(path, data)


# -- record sources -------------------------------------------------------------------------------
class ArraySource:
    """Records held in memory: images (N, C, H, W), labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
                 name: str = "arrays") -> None:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4:
            raise NetEngineError(f"{name}: expected images of shape (N, C, H, W) or (N, H, W), "
                                 f"got {images.shape}")
        if labels is None:
            labels = np.zeros(len(images), dtype=np.int64)
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise NetEngineError(f"{name}: {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise NetEngineError(f"{name}: holds no records")
        self.images, self.labels, self.name = images, labels, name

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]

    def close(self) -> None:
        pass


class IDXSource(ArraySource):
    """An MNIST images file (…-idx3-ubyte[.gz]) with its labels file (…-idx1-ubyte[.gz]) beside
    it; without a labels file every label is 0."""

    def __init__(self, images_path: str | os.PathLike,
                 labels_path: str | os.PathLike | None = None) -> None:
        images = read_idx(images_path)
        if images.ndim not in (3, 4):
            raise NetEngineError(f"{images_path}: expected IDX images of shape (N, H, W) or "
                                 f"(N, C, H, W), got {images.shape}")
        labels_path = labels_path or idx_labels_path(images_path)
        labels = None
        if labels_path is not None:
            labels = read_idx(labels_path)
            if labels.ndim != 1:
                raise NetEngineError(f"{labels_path}: expected 1-D IDX labels, got shape "
                                     f"{labels.shape}")
            if len(labels) != len(images):
                raise NetEngineError(f"{labels_path} holds {len(labels)} labels but "
                                     f"{images_path} holds {len(images)} images")
        super().__init__(images, labels, str(images_path))
        self.labels_path = labels_path
