"""Blob: an N-d array of data paired with its gradient (diff), as in Caffe.

Storage is a flat buffer with a capacity; ``data`` and ``diff`` are views of it in the current
shape, so ``blob.data[...] = x`` writes into the net (pycaffe's idiom). Growing past the
capacity allocates anew; shrinking keeps the buffer, as Caffe's Reshape does.
"""
from __future__ import annotations

import math
import types

import numpy as np

from netengine import backend
from netengine.errors import NetEngineError
from netengine.proto import caffe_pb2

MAX_BLOB_AXES = 32


class Blob:
    """Data + diff of one shape, on the array module chosen when it was made."""

    __slots__ = ("_xp", "dtype", "_shape", "_count", "_data_buf", "_diff_buf", "_data", "_diff")

    def __init__(self, shape: tuple | list = (), dtype=np.float32,
                 xp: types.ModuleType | None = None) -> None:
        self._xp = xp if xp is not None else backend.xp()
        self.dtype = np.dtype(dtype)
        self._shape: tuple[int, ...] = ()
        self._count = 1
        self._data_buf = None
        self._diff_buf = None
        self._data = None
        self._diff = None
        self.reshape(tuple(shape))

    # -- shape -------------------------------------------------------------------------------
    @property
    def xp(self) -> types.ModuleType:
        return self._xp

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def count(self) -> int:
        return self._count

    @property
    def num_axes(self) -> int:
        return len(self._shape)

    def count_range(self, start: int, end: int | None = None) -> int:
        """Product of the dimensions in [start, end)."""
        return math.prod(self._shape[start:end])

    def canonical_axis(self, axis: int) -> int:
        """Caffe's CanonicalAxisIndex: negative axes count from the end."""
        n = len(self._shape)
        if not -n <= axis < max(n, 1):
            raise IndexError(f"axis {axis} out of range for a {n}-axis blob of shape {self._shape}")
        return axis + n if axis < 0 else axis

    def legacy_shape(self, axis: int) -> int:
        """Caffe's LegacyShape(axis): axes past the blob's own count read as 1."""
        if len(self._shape) > 4:
            raise ValueError(f"num/channels/height/width need at most 4 axes, "
                             f"shape is {self._shape}")
        return self._shape[axis] if axis < len(self._shape) else 1

    # pycaffe's 4-D accessors (blob.num, blob.channels, blob.height, blob.width)
    num = property(lambda self: self.legacy_shape(0))
    channels = property(lambda self: self.legacy_shape(1))
    height = property(lambda self: self.legacy_shape(2))
    width = property(lambda self: self.legacy_shape(3))

    def shape_string(self) -> str:
        return " ".join(str(d) for d in self._shape) + f" ({self._count})"

    def reshape(self, *shape) -> None:
        """Change the shape; keeps the storage when the new count fits in it."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if shape == self._shape and self._data_buf is not None:
            return  # unchanged: the views stay as they are (the common case, every forward)
        if len(shape) > MAX_BLOB_AXES:
            raise ValueError(f"a blob has at most {MAX_BLOB_AXES} axes, got {len(shape)}")
        if any(d < 0 for d in shape):
            raise NetEngineError(f"negative dimension in blob shape {shape}")
        count = math.prod(shape)
        if self._data_buf is None or self._data_buf.size < count:
            self._check_size(shape, count)
            self._shape, self._count = shape, count
            self._data_buf = self._xp.zeros(max(count, 1), dtype=self.dtype)
            self._diff_buf = None
        else:
            self._shape, self._count = shape, count
            if self._diff_buf is not None and self._diff_buf.size < count:
                self._diff_buf = None
        self._data = self._data_buf[:count].reshape(shape)
        self._diff = None if self._diff_buf is None else self._diff_buf[:count].reshape(shape)

    def _check_size(self, shape: tuple[int, ...], count: int) -> None:
        """Refuse, before allocating, a shape whose data and diff cannot fit in memory (a
        hostile or mistyped size would otherwise ask NumPy for exabytes)."""
        need = 2 * count * self.dtype.itemsize  # data now, diff at the first backward
        if not backend.fits_in_memory(count, 2 * self.dtype.itemsize, self._xp):
            limit = backend.memory_limit(self._xp)
            raise NetEngineError(f"blob shape {shape} ({count} values) needs {need / 2**30:.3g} "
                                 f"GiB for data and diff, more than the {limit / 2**30:.3g} GiB "
                                 "of memory here (check batch_size, num_output, kernel, stride "
                                 "and pad)")

    def reshape_like(self, other: Blob) -> None:
        self.reshape(other.shape)

    # -- data and diff -----------------------------------------------------------------------
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value) -> None:
        self._data[...] = value

    @property
    def diff(self):
        if self._diff is None:
            self._diff_buf = self._xp.zeros(max(self._data_buf.size, 1), dtype=self.dtype)
            self._diff = self._diff_buf[:self._count].reshape(self._shape)
        return self._diff

    @diff.setter
    def diff(self, value) -> None:
        self.diff[...] = value

    def host_data(self) -> np.ndarray:
        """A NumPy copy of ``data`` (on GPU ``data`` is a CuPy array on the device)."""
        return backend.host_copy(self._data)

    def host_diff(self) -> np.ndarray:
        """A NumPy copy of ``diff``."""
        return backend.host_copy(self.diff)

    def share_data(self, other: Blob) -> None:
        """Use ``other``'s data storage (counts must agree), as Flatten/Split/sharing do."""
        if other.count != self._count:
            raise ValueError(f"cannot share data of count {other.count} with count {self._count}")
        self._data_buf = other._data_buf
        self._data = self._data_buf[:self._count].reshape(self._shape)

    def share_diff(self, other: Blob) -> None:
        if other.count != self._count:
            raise ValueError(f"cannot share diff of count {other.count} with count {self._count}")
        other.diff  # noqa: B018 - makes sure the storage exists before it is shared
        self._diff_buf = other._diff_buf
        self._diff = self._diff_buf[:self._count].reshape(self._shape)

    def update(self) -> None:
        """data -= diff (the solver's final step)."""
        self._data -= self.diff

    def to(self, xp: types.ModuleType) -> None:
        """Move data and diff to ``xp``'s device, keeping shape and contents."""
        if xp is self._xp:
            return
        data = backend.to_module(self._data, xp)
        diff = None if self._diff is None else backend.to_module(self._diff, xp)
        self._xp = xp
        self._data_buf = self._diff_buf = None
        self.reshape(self._shape)
        self._data[...] = data
        if diff is not None:
            self.diff[...] = diff

    def __repr__(self) -> str:
        return f"Blob(shape={self._shape}, dtype={self.dtype.name})"


# -- Blob <-> BlobProto ----------------------------------------------------------------------------
def blob_from_proto(proto, dtype=np.float32) -> np.ndarray:
    """The values of a BlobProto as a host array in its own shape (legacy 4-D or BlobShape)."""
    if proto.HasField("shape"):
        shape = tuple(proto.shape.dim)
    elif any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (proto.num, proto.channels, proto.height, proto.width)
    else:
        shape = (len(proto.data) or len(proto.double_data),)
    if any(dim < 0 for dim in shape):
        raise NetEngineError(f"blob shape {shape} has a negative dimension")
    values = proto.double_data if len(proto.double_data) else proto.data
    need = math.prod(shape)  # Python ints: huge dimensions cannot wrap around
    if len(values) != need:
        raise NetEngineError(f"blob has {len(values)} values but its shape {shape} needs "
                             f"{need}")
    array = np.asarray(values, dtype=dtype)
    return array.reshape(shape)


def proto_shape_matches(blob: Blob, proto) -> bool:
    """Caffe's ShapeEquals: legacy 4-D protos match the blob's shape right-aligned in 4 axes."""
    if proto.HasField("shape") or not any(
            proto.HasField(f) for f in ("num", "channels", "height", "width")):
        return tuple(proto.shape.dim) == blob.shape
    if blob.num_axes > 4:
        return False
    legacy = (1,) * (4 - blob.num_axes) + blob.shape
    return legacy == (proto.num, proto.channels, proto.height, proto.width)


def blob_to_proto(blob: Blob, write_diff: bool = False):
    """The blob as a BlobProto, byte-compatible with Caffe's Blob::ToProto."""
    return blob_proto(blob.data, blob.shape, blob.diff if write_diff else None)


# Blobs are encoded straight from the array's bytes (packed floats): the same bytes as
# protobuf's own serializer, without a Python list per blob.
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _packed(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def blob_proto(array, shape: tuple | None = None, diff=None) -> caffe_pb2.BlobProto:
    """A BlobProto with ``shape`` and float ``data`` (and ``diff``), like Caffe's Blob::ToProto."""
    host = np.ascontiguousarray(backend.to_host(array), dtype="<f4")
    shape = host.shape if shape is None else tuple(shape)
    payload = b""
    if host.size:
        payload += _packed(0x2A, host.tobytes())  # field 5, data
    if diff is not None:
        host_diff = np.ascontiguousarray(backend.to_host(diff), dtype="<f4")
        if host_diff.size:
            payload += _packed(0x32, host_diff.tobytes())  # field 6, diff
    if shape:  # a 0-axis blob has no shape field, as Caffe writes it
        dims = b"".join(_varint(int(d)) for d in shape)
        payload += _packed(0x3A, _packed(0x0A, dims))  # field 7, shape {dim}
    return caffe_pb2.BlobProto.FromString(payload)


def blob_array(proto) -> np.ndarray:
    """The values of a BlobProto in its own shape (BlobShape or legacy num/channels/h/w)."""
    return blob_from_proto(proto, np.float32)
