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
            raise ValueError(f"negative dimension in blob shape {shape}")
        count = math.prod(shape)
        self._shape, self._count = shape, count
        if self._data_buf is None or self._data_buf.size < count:
            self._data_buf = self._xp.zeros(max(count, 1), dtype=self.dtype)
            self._diff_buf = None
        elif self._diff_buf is not None and self._diff_buf.size < count:
            self._diff_buf = None
        self._data = self._data_buf[:count].reshape(shape)
        self._diff = None if self._diff_buf is None else self._diff_buf[:count].reshape(shape)

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
