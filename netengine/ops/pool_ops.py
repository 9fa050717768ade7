"""2-D pooling kernels over strided window views (NumPy or CuPy).

Every kernel loops over the kh·kw offsets of the pooling window only; each step is a vectorised
operation on an (N, C, out_h, out_w) strided view of the (possibly padded) input. Windows are
laid out Caffe's way: window (ph, pw) starts at (ph·s_h − p_h, pw·s_w − p_w) in image coordinates
and may hang over the image on the far side (ceil rounding). The input is copied into a border
buffer only when a window leaves the image; the border holds the pooling's neutral value
(−inf for MAX, 0 for sums), so clipped windows need no special case.
"""
from __future__ import annotations

import math

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)  # Caffe's MAX init, whatever the dtype


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
        # Non-overlapping windows that tile the input exactly: backward may assign, not add.
        self.tiles = (self.direct and self.sh == self.kh and self.sw == self.kw
                      and oh * self.sh == height and ow * self.sw == width)
        self.offsets = [(i, j) for i in range(self.kh) for j in range(self.kw)]
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

    def max_forward(self, x, y, choice) -> None:
        """y = max over each window; choice = 1 + the kernel offset number of the first maximum.

        As in Caffe: start from −FLT_MAX with no choice (0) and take a value only when it is
        strictly greater, so ties keep the first, NaN is never taken, and a window without
        any value above −FLT_MAX (e.g. one lying wholly past the image) gives −FLT_MAX.
        Since later offsets have larger numbers, ``choice = max(choice, (k+1)·taken)``.
        """
        xp = self.xp
        src = self.source(x, -np.inf)
        mask = self._buffer("mask", self.shape[:2] + self.out_shape, dtype=bool)
        marks = self._buffer("marks", self.shape[:2] + self.out_shape, dtype=choice.dtype)
        view = self._buffer("view", self.shape[:2] + self.out_shape)
        y[...] = -FLT_MAX
        choice[...] = 0
        for k, offset in enumerate(self.offsets):
            xp.copyto(view, self.window(src, offset))  # one strided read, then contiguous ops
            xp.greater(view, y, out=mask)
            xp.fmax(y, view, out=y)  # fmax: NaN never replaces y
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
