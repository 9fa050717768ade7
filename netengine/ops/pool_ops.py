"""2-D pooling kernels over strided window views (NumPy or CuPy).

Every kernel loops over the kh·kw offsets of the pooling window only; each step is a vectorised
operation on an (N, C, out_h, out_w) strided view of the (possibly padded) input. Windows are
laid out Caffe's way: window (ph, pw) starts at (ph·s_h − p_h, pw·s_w − p_w) in image coordinates
and may hang over the image on the far side (ceil rounding). The input is copied into a border
buffer only when a window leaves the image; the border holds the pooling's neutral value
(−inf for MAX, 0 for sums), so clipped windows need no special case.

Windows that tile the input exactly (stride = kernel, no padding, no overhang: LeNet's 2x2/2)
take a faster route for MAX: one transposing copy splits the input into kh·kw contiguous
planes (every later step is a contiguous vector op, where a strided view costs ~10x more per
element), and backward scatters dy onto the chosen cells by flat index (one zero-fill and one
scatter instead of kh·kw strided writes).
"""
from __future__ import annotations

import math

import numpy as np

from netengine import backend
from netengine.errors import NetEngineError
from netengine.ops import jit

FLT_MAX = float(np.finfo(np.float32).max)  # Caffe's MAX init, whatever the dtype
# Tiled MAX pooling works through the batch in item ranges of about this many input bytes.
TILE_CHUNK_BYTES = 1 << 19


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool,
                clip: bool) -> int:
    """Caffe's pooled extent: ceil (or floor) of (size + 2p − k)/s, plus 1; then, when the
    layer has any padding (``clip``), drop the last window if it would start in the far pad."""
    span = (size + 2 * pad - kernel) / stride
    out = (math.ceil(span) if ceil_mode else math.floor(span)) + 1
    if clip and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class Pool2d:
    """Window geometry and work buffers of one Pooling layer; :meth:`configure` each reshape."""

    def __init__(self) -> None:
        self._key = None
        self._bufs: dict = {}

    def configure(self, xp, dtype, shape, kernel, stride, pad, out_shape) -> None:
        key = (xp, dtype, tuple(shape), tuple(kernel), tuple(stride), tuple(pad), tuple(out_shape))
        if key == self._key:
            return
        self._key = key
        self.xp, self.dtype = xp, dtype
        self.shape = tuple(shape)
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel, stride, pad
        self.out_shape = tuple(out_shape)
        height, width = self.shape[2:]
        oh, ow = self.out_shape
        # Extent (in padded coordinates) that the windows reach, and whether a buffer is needed.
        self.ext_h = max(height + self.ph, (oh - 1) * self.sh + self.kh)
        self.ext_w = max(width + self.pw, (ow - 1) * self.sw + self.kw)
        self.direct = (self.ph == 0 and self.pw == 0 and self.ext_h == height
                       and self.ext_w == width)
        padded = math.prod(self.shape[:2]) * self.ext_h * self.ext_w
        if not self.direct and not backend.fits_in_memory(padded, np.dtype(dtype).itemsize, xp):
            raise NetEngineError(f"pooling windows reaching {self.ext_h}x{self.ext_w} cells "
                                 f"(kernel {kernel}, stride {stride}, pad {pad}) need a padded "
                                 f"copy of {padded} values, more than the memory here")
        # Non-overlapping windows that tile the input exactly: backward may assign, not add.
        self.tiles = (self.direct and self.sh == self.kh and self.sw == self.kw
                      and oh * self.sh == height and ow * self.sw == width)
        self.offsets = [(i, j) for i in range(self.kh) for j in range(self.kw)]
        # 2x2 windows at stride 2, all inside the image: the compiled pair kernels apply.
        self.pairs = ((self.kh, self.kw, self.sh, self.sw, self.ph, self.pw) == (2, 2, 2, 2, 0, 0)
                      and 2 * oh <= height and 2 * ow <= width)
        self._bufs = {}

    # -- buffers and views -------------------------------------------------------------------
    def _buffer(self, name: str, shape, dtype=None, fill=None):
        buf = self._bufs.get(name)
        if buf is None:
            dtype = self.dtype if dtype is None else dtype
            buf = self.xp.empty(shape, dtype=dtype)
            if fill is not None:
                buf[...] = fill
            self._bufs[name] = buf
        return buf

    def _interior(self):
        height, width = self.shape[2:]
        return (slice(None), slice(None), slice(self.ph, self.ph + height),
                slice(self.pw, self.pw + width))

    def source(self, x, border: float):
        """x itself, or x copied into a buffer whose border holds ``border``."""
        if self.direct:
            return x
        n, c = self.shape[:2]
        buf = self._buffer(f"x{border}", (n, c, self.ext_h, self.ext_w), fill=border)
        buf[self._interior()] = x
        return buf

    def window(self, src, offset):
        """(N, C, oh, ow) view of ``src`` at kernel offset (i, j)."""
        i, j = offset
        oh, ow = self.out_shape
        return src[:, :, i:i + self.sh * (oh - 1) + 1:self.sh, j:j + self.sw * (ow - 1) + 1:self.sw]

    def index_dtype(self):
        return self.xp.int8 if self.kh * self.kw < 127 else self.xp.int32

    def tile_chunks(self):
        """Tiles only: slices of the batch sized so that one item range's input, planes and
        outputs stay in the L2 cache (the ops then run from cache, not memory)."""
        n, c, height, width = self.shape
        per_item = c * height * width * np.dtype(self.dtype).itemsize
        step = max(1, min(n, TILE_CHUNK_BYTES // max(per_item, 1)))
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def tile_planes(self, x):
        """Tiles only: x (a chunk of items) split into its kh·kw window planes,
        (kh·kw, n, C, oh, ow), in one transposing copy."""
        n, c = x.shape[:2]
        oh, ow = self.out_shape
        size = self.kh * self.kw * n * c * oh * ow
        buf = self._bufs.get("planes")
        if buf is None or buf.size < size:
            buf = self._bufs["planes"] = self.xp.empty(size, dtype=self.dtype)
        planes = buf[:size].reshape(self.kh * self.kw, n, c, oh, ow)
        src = x.reshape(n, c, oh, self.kh, ow, self.kw).transpose(3, 5, 0, 1, 2, 4)
        self.xp.copyto(planes.reshape(self.kh, self.kw, n, c, oh, ow), src)
        return planes

    def max_forward(self, x, y, choice) -> None:
        """y = max over each window; choice = 1 + the kernel offset number of the first maximum.

        As in Caffe: start from −FLT_MAX with no choice (0) and take a value only when it is
        strictly greater, so ties keep the first, NaN is never taken, and a window without
        any value above −FLT_MAX (e.g. one lying wholly past the image) gives −FLT_MAX.
        Since later offsets have larger numbers, ``choice = max(choice, (k+1)·taken)``.
        """
        if self.pairs and self._compiled(x, y, choice):
            jit.max_pool_2x2(x, y, choice)
            return
        if self.tiles:
            for part in self.tile_chunks():
                planes = self.tile_planes(x[part])
                self._max_scan(planes.__getitem__, y[part], choice[part])
            return
        # Other windows: (item, channel) planes in chunks of about TILE_CHUNK_BYTES, so the
        # window copies and the scan work in cache.
        xp = self.xp
        n, c, height, width = self.shape
        oh, ow = self.out_shape
        planes = (x.reshape(n * c, 1, height, width), y.reshape(n * c, 1, oh, ow),
                  choice.reshape(n * c, 1, oh, ow))
        per_plane = self.ext_h * self.ext_w * np.dtype(self.dtype).itemsize
        step = max(1, min(n * c, TILE_CHUNK_BYTES // max(per_plane, 1)))
        for start in range(0, n * c, step):
            part = slice(start, min(start + step, n * c))
            xs, ys, cs = (a[part] for a in planes)
            src = xs if self.direct else self._chunk_source(xs, -np.inf, step)
            view = self._flat("view", ys.size).reshape(ys.shape)

            def values(k, src=src, view=view):  # one strided read, then contiguous ops
                xp.copyto(view, self.window(src, self.offsets[k]))
                return view
            self._max_scan(values, ys, cs)

    def _compiled(self, *arrays) -> bool:
        """Whether the compiled loops (:mod:`netengine.ops.jit`) take these arrays."""
        return jit.enabled(self.xp) and jit.suitable(*arrays)

    def _geometry(self) -> tuple:
        return self.kh, self.kw, self.sh, self.sw, self.ph, self.pw

    def _flat(self, name: str, size: int, dtype=None):
        """A kept flat work array of at least ``size`` values."""
        buf = self._bufs.get(name)
        if buf is None or buf.size < size:
            buf = self._bufs[name] = self.xp.empty(size, dtype=self.dtype if dtype is None
                                                   else dtype)
        return buf[:size]

    def _chunk_source(self, xs, border: float, step: int):
        """A chunk of planes (p, 1, H, W) copied into a kept buffer whose border holds
        ``border`` (the border is filled once; only the interior is rewritten)."""
        key = f"chunk{border}"
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = self.xp.empty((step, 1, self.ext_h, self.ext_w),
                                                  dtype=self.dtype)
            buf[...] = border
        buf = buf[:xs.shape[0]]
        buf[self._interior()] = xs
        return buf

    def _max_scan(self, values, y, choice) -> None:
        """The strictly-greater scan over the window values ``values(k)`` (contiguous)."""
        xp = self.xp
        mask = self._flat("scan_mask", y.size, bool).reshape(y.shape)
        marks = self._flat("scan_marks", y.size, choice.dtype).reshape(y.shape)
        first = values(0)
        xp.fmax(first, -FLT_MAX, out=y)  # fmax: NaN and -inf give -FLT_MAX, the start value
        xp.greater(first, -FLT_MAX, out=mask)
        xp.copyto(choice, mask)
        for k in range(1, len(self.offsets)):
            v = values(k)
            xp.greater(v, y, out=mask)
            xp.fmax(y, v, out=y)  # fmax: NaN never replaces y
            xp.multiply(mask, choice.dtype.type(k + 1), out=marks)
            xp.maximum(choice, marks, out=choice)

    def window_sums(self, x, y, square: bool = False) -> None:
        """y = Σ over each window of x (or of x²); cells outside the image count as 0."""
        src = self.source(x, 0.0)
        if square:
            src = src * src
        self.xp.copyto(y, self.window(src, self.offsets[0]))
        for offset in self.offsets[1:]:
            y += self.window(src, offset)

    def select_forward(self, x, y, choice) -> None:
        """y = the window element at kernel offset number choice − 1 (0 where choice is 0)."""
        xp = self.xp
        src = self.source(x, 0.0)
        mask = self._buffer("mask", self.shape[:2] + self.out_shape, dtype=bool)
        y[...] = 0
        for k, offset in enumerate(self.offsets):
            xp.equal(choice, k + 1, out=mask)
            xp.copyto(y, self.window(src, offset), where=mask)

    def sample_forward(self, x, y, choice, uniform) -> None:
        """Stochastic pooling (TRAIN): in each window pick the first element at which the running
        sum reaches ``uniform``·(window sum); y = that element, choice = 1 + its offset."""
        xp = self.xp
        src = self.source(x, 0.0)
        total = xp.zeros_like(y)
        for offset in self.offsets:
            total += self.window(src, offset)
        threshold = uniform * total
        running = xp.zeros_like(y)
        mask = self._buffer("mask", self.shape[:2] + self.out_shape, dtype=bool)
        choice[...] = 0
        for k, offset in enumerate(self.offsets):
            running += self.window(src, offset)
            xp.greater_equal(running, threshold, out=mask)
            mask &= choice == 0
            xp.copyto(choice, k + 1, where=mask)
        self.select_forward(x, y, choice)

    # -- backward ----------------------------------------------------------------------------
    def _grad_target(self, dx):
        if self.direct:
            return dx
        n, c = self.shape[:2]
        return self._buffer("g", (n, c, self.ext_h, self.ext_w))

    def _finish(self, acc, dx) -> None:
        if not self.direct:
            dx[...] = acc[self._interior()]

    def route_backward(self, dy, choice, dx) -> None:
        """dx = dy routed to the chosen kernel offsets (MAX, STOCHASTIC); overwrites dx."""
        xp = self.xp
        if self._compiled(dy, choice, dx):
            if self.pairs:
                jit.max_pool_2x2_backward(dy, choice, dx)
            else:
                jit.max_pool_backward(dy, choice, dx, *self._geometry())
            return
        if self.tiles and dx.flags.c_contiguous and bool(choice.all()):
            # Scatter by flat index: the indices for the whole batch in a few passes, then a
            # zero fill and a scatter per chunk of items (each chunk of dx stays in cache).
            index = self._tile_index(choice)
            flat_dx, flat_dy = dx.reshape(-1), dy.reshape(-1)
            per_in, per_out = dx[0].size, dy[0].size
            for part in self.tile_chunks():
                flat_dx[part.start * per_in:part.stop * per_in] = 0
                out = slice(part.start * per_out, part.stop * per_out)
                flat_dx[index[out]] = flat_dy[out]
            return
        acc = self._grad_target(dx)
        mask = self._buffer("mask", self.shape[:2] + self.out_shape, dtype=bool)
        if not self.tiles:
            acc[...] = 0
        for k, offset in enumerate(self.offsets):
            xp.equal(choice, k + 1, out=mask)
            if self.tiles:
                xp.multiply(dy, mask, out=self.window(acc, offset))
            else:
                self.window(acc, offset)[...] += dy * mask
        self._finish(acc, dx)

    def _tile_index(self, choice):
        """Tiles only: flat index into x of each window's chosen cell (choice >= 1).

        Offset number k = choice − 1 sits at row k // kw, column k % kw of its window, i.e.
        k + (k // kw)·(W − kw) cells after the window's first cell.
        """
        xp = self.xp
        if "origin" not in self._bufs:  # flat index of every window's first cell
            n, c, height, width = self.shape
            oh, ow = self.out_shape
            plane = (xp.arange(oh).reshape(oh, 1) * (self.sh * width)
                     + xp.arange(ow).reshape(1, ow) * self.sw)
            origin = xp.arange(n * c).reshape(n * c, 1, 1) * (height * width) + plane
            self._bufs["origin"] = origin.reshape(-1).astype(xp.intp)
            self._bufs["index"] = xp.empty(choice.size, dtype=xp.intp)
            span = (self.kh - 1) * width + self.kw
            small = xp.int16 if span < np.iinfo(np.int16).max else xp.int32
            self._bufs["k"] = xp.empty(choice.size, dtype=small)
            self._bufs["row"] = xp.empty(choice.size, dtype=small)
        k, row, index = self._bufs["k"], self._bufs["row"], self._bufs["index"]
        width = self.shape[3]
        xp.subtract(choice.reshape(-1), 1, out=k, casting="unsafe")
        xp.floor_divide(k, self.kw, out=row)
        xp.multiply(row, width - self.kw, out=row)
        xp.add(row, k, out=row)
        xp.add(self._bufs["origin"], row, out=index)
        return index

    def spread_backward(self, g, dx) -> None:
        """dx = each g value added to every cell of its window (AVE after the 1/divisor)."""
        acc = self._grad_target(dx)
        if self.tiles:
            for offset in self.offsets:
                self.window(acc, offset)[...] = g
        else:
            acc[...] = 0
            for offset in self.offsets:
                self.window(acc, offset)[...] += g
        self._finish(acc, dx)

    def inverse_divisor(self):
        """1 / :meth:`ave_divisor` as an (out_h, out_w) device array, kept until reshaped."""
        inv = self._bufs.get("inv_divisor")
        if inv is None:
            inv = self.xp.asarray(1.0 / self.ave_divisor(), dtype=self.dtype)
            self._bufs["inv_divisor"] = inv
        return inv

    def ave_divisor(self):
        """Caffe's AVE divisor per output cell: the window clipped to the padded extent
        (end = min(start + k, size + pad)) before it is clipped to the image."""
        height, width = self.shape[2:]
        oh, ow = self.out_shape
        start_h = np.arange(oh) * self.sh - self.ph
        start_w = np.arange(ow) * self.sw - self.pw
        size_h = np.minimum(start_h + self.kh, height + self.ph) - start_h
        size_w = np.minimum(start_w + self.kw, width + self.pw) - start_w
        return np.outer(size_h, size_w).astype(np.float64)

    def top_mask(self, choice, out) -> None:
        """out = the argmax as Caffe's float index h·W + w within the channel plane, −1 if none."""
        xp = self.xp
        width = self.shape[3]
        oh, ow = self.out_shape
        rows = xp.arange(oh, dtype=out.dtype).reshape(oh, 1) * self.sh - self.ph
        cols = xp.arange(ow, dtype=out.dtype).reshape(1, ow) * self.sw - self.pw
        k = choice.astype(out.dtype) - 1
        di, dj = xp.floor_divide(k, self.kw), xp.remainder(k, self.kw)
        out[...] = (rows + di) * width + cols + dj
        xp.copyto(out, -1.0, where=choice == 0)
