"""im2col / col2im and the GEMM plumbing behind Convolution, Deconvolution and Im2col.

Column layout. A chunk of ``n`` items ``x`` of shape (n, C, *S) (any number D of spatial axes)
is unrolled into a column matrix of shape (C·K, n·P), K = prod(kernel), P = prod(out):

    cols[(c, k_1..k_D), (i, o_1..o_D)] = x_pad[i, c, o_1·s_1 + k_1·d_1, ..., o_D·s_D + k_D·d_D]

i.e. Caffe's row order (channel, kernel offsets) with the whole batch chunk side by side in the
columns, so the forward product, the weight gradient and the column gradient are each ONE large
BLAS call per group for the whole chunk instead of one small call per image.

- im2col is one copy out of a strided window view of the padded input (no Python loop at all).
- col2im is a loop over the K kernel offsets only; each step is one vectorised add.
- Work buffers (padded input, columns, transposed outputs) live in :class:`ConvGemm` and are
  reallocated only when the shapes change.
- 1x1 kernels with stride 1 and pad 0 skip im2col/col2im: a batched matmul on the input.
- Batches whose columns would exceed ``COL_BUDGET`` elements are processed in chunks of items.

Everything is written against the array module ``xp`` (NumPy or CuPy).
"""
from __future__ import annotations

import itertools
import math

# Largest column buffer (in elements) one convolution keeps; bigger batches are chunked.
COL_BUDGET = 1 << 23


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Caffe's convolution output size: floor((size + 2p - (d(k-1)+1)) / s) + 1."""
    extent = dilation * (kernel - 1) + 1
    return (size + 2 * pad - extent) // stride + 1


def deconv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Caffe's deconvolution output size: s(size-1) + d(k-1)+1 - 2p."""
    return stride * (size - 1) + dilation * (kernel - 1) + 1 - 2 * pad


def window_view(xp, padded, kernel, stride, dilation, out_shape):
    """Strided (C, *kernel, n, *out) view of ``padded`` (n, C, *S): element
    [c, k..., i, o...] = padded[i, c, o·s + k·d ...]. No copy."""
    s_item, s_chan, *s_space = padded.strides
    shape = (padded.shape[1], *kernel, padded.shape[0], *out_shape)
    strides = (s_chan, *(d * st for d, st in zip(dilation, s_space)), s_item,
               *(s * st for s, st in zip(stride, s_space)))
    return xp.lib.stride_tricks.as_strided(padded, shape=shape, strides=strides)


def offset_slices(offset, stride, dilation, out_shape) -> tuple:
    """Index of the (n, C, *out) sub-grid of a padded array touched by kernel offset ``offset``."""
    return (slice(None), slice(None)) + tuple(
        slice(k * d, k * d + s * (o - 1) + 1, s)
        for k, s, d, o in zip(offset, stride, dilation, out_shape))


def col2im_add(cols, acc, kernel, stride, dilation, out_shape) -> None:
    """acc (n, C, *S_pad) += the columns ``cols`` (viewable as (C, *kernel, n, *out)) folded
    back onto the image: a loop over the kernel offsets, each one vectorised add."""
    channels, items = acc.shape[1], acc.shape[0]
    cols = cols.reshape((channels, *kernel, items, *out_shape))
    for offset in itertools.product(*(range(k) for k in kernel)):
        acc[offset_slices(offset, stride, dilation, out_shape)] += cols[(slice(None), *offset)] \
            .swapaxes(0, 1)


class ConvGemm:
    """Convolution of x (n, C_x, *S_x) into y (n, C_y, *S_y) with weights (C_y, C_x/g, *k).

    ``conv``/``conv_backward`` are the convolution and its gradients; ``conv_transpose`` and
    ``conv_transpose_backward`` run the same weights the other way (Deconvolution: its bottom
    is ``y``, its top is ``x``). Call :meth:`configure` whenever the shapes may have changed.
    """

    def __init__(self, kernel, stride, pad, dilation, group: int = 1) -> None:
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.pad = tuple(pad)
        self.dilation = tuple(dilation)
        self.group = int(group)
        self.is_1x1 = (all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride)
                       and all(p == 0 for p in self.pad))
        self._key = None
        self._bufs: dict = {}
        self.cols_owner = None  # what the column buffer currently holds (for reuse in backward)
        self._pad_dirty = False

    # -- geometry and buffers ----------------------------------------------------------------
    def configure(self, xp, dtype, num: int, c_x: int, x_shape, c_y: int, y_shape) -> None:
        key = (xp, dtype, num, c_x, tuple(x_shape), c_y, tuple(y_shape))
        if key == self._key:
            return
        self._key = key
        self.xp, self.dtype = xp, dtype
        self.num, self.c_x, self.c_y = num, c_x, c_y
        self.x_shape, self.y_shape = tuple(x_shape), tuple(y_shape)
        self.x_padded = tuple(s + 2 * p for s, p in zip(self.x_shape, self.pad))
        self.k_size = math.prod(self.kernel)
        self.p_size = math.prod(self.y_shape)
        per_item = max(c_x * self.k_size, c_y) * self.p_size
        self.chunk = max(1, min(num, COL_BUDGET // max(per_item, 1)))
        self._bufs = {}
        self.cols_owner = None

    def chunks(self):
        """Slices of the batch processed together (one, unless the columns would be huge)."""
        return [slice(n, min(n + self.chunk, self.num)) for n in range(0, self.num, self.chunk)]

    @property
    def single_chunk(self) -> bool:
        return self.chunk >= self.num

    def _buffer(self, name: str, shape, zero: bool = False):
        size = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.size < size:
            buf = self.xp.zeros(size, dtype=self.dtype) if zero else \
                self.xp.empty(size, dtype=self.dtype)
            self._bufs[name] = buf
        return buf[:size].reshape(shape)

    def _padded_input(self, x):
        """x itself (no padding) or a zero-bordered copy of it."""
        if not any(self.pad):
            return x
        n = x.shape[0]
        buf = self._buffer("pad", (self.chunk, self.c_x, *self.x_padded), zero=True)[:n]
        if self._pad_dirty:
            buf[...] = 0
            self._pad_dirty = False
        inner = (slice(None), slice(None)) + tuple(slice(p, p + s)
                                                   for p, s in zip(self.pad, self.x_shape))
        buf[inner] = x
        return buf

    # -- building blocks (one chunk) ---------------------------------------------------------
    def im2col(self, x, owner=None):
        """Columns (C_x·K, n·P) of x (n, C_x, *S_x), in the shared column buffer."""
        xp, n = self.xp, x.shape[0]
        cols = self._buffer("cols", (self.c_x * self.k_size, n * self.p_size))
        view = window_view(xp, self._padded_input(x), self.kernel, self.stride, self.dilation,
                           self.y_shape)
        xp.copyto(cols.reshape(view.shape), view)
        self.cols_owner = owner
        return cols

    def col2im(self, cols, dx) -> None:
        """dx (n, C_x, *S_x) = columns folded back (overwrites dx)."""
        if not any(self.pad):
            dx[...] = 0
            col2im_add(cols, dx, self.kernel, self.stride, self.dilation, self.y_shape)
            return
        n = dx.shape[0]
        acc = self._buffer("pad", (self.chunk, self.c_x, *self.x_padded), zero=True)[:n]
        acc[...] = 0
        self._pad_dirty = True
        col2im_add(cols, acc, self.kernel, self.stride, self.dilation, self.y_shape)
        inner = (slice(None), slice(None)) + tuple(slice(p, p + s)
                                                   for p, s in zip(self.pad, self.x_shape))
        dx[...] = acc[inner]

    def _w3(self, w):
        g = self.group
        return w.reshape(g, self.c_y // g, -1)

    def _transpose_y(self, y):
        """(C_y, n·P) contiguous copy of y (n, C_y, *S_y), in the transposed-output buffer."""
        n = y.shape[0]
        out = self._buffer("yt", (self.c_y, n * self.p_size))
        self.xp.copyto(out.reshape(self.c_y, n, self.p_size),
                       y.reshape(n, self.c_y, self.p_size).transpose(1, 0, 2))
        return out

    def _y_from_cols(self, cols, w, y, bias=None) -> None:
        """y (n, C_y, *S_y) = W · cols (+ bias)."""
        xp, g, n = self.xp, self.group, y.shape[0]
        prod = self._buffer("yt", (self.c_y, n * self.p_size))
        xp.matmul(self._w3(w), cols.reshape(g, -1, n * self.p_size),
                  out=prod.reshape(g, self.c_y // g, n * self.p_size))
        src = prod.reshape(self.c_y, n, self.p_size).transpose(1, 0, 2)
        dst = y.reshape(n, self.c_y, self.p_size)
        if bias is None:
            xp.copyto(dst, src)
        else:
            xp.add(src, bias.reshape(self.c_y, 1), out=dst)

    def _x_from_yt(self, yt, w, dx) -> None:
        """dx (n, C_x, *S_x) = col2im(Wᵀ · yt), yt the (C_y, n·P) transposed y."""
        xp, g, n = self.xp, self.group, dx.shape[0]
        cols = self._buffer("cols", (self.c_x * self.k_size, n * self.p_size))
        self.cols_owner = None
        xp.matmul(self._w3(w).transpose(0, 2, 1), yt.reshape(g, self.c_y // g, -1),
                  out=cols.reshape(g, -1, n * self.p_size))
        self.col2im(cols, dx)

    def _weight_grad(self, cols, yt, dw) -> None:
        """dw += yt · colsᵀ per group (computed as (cols · ytᵀ)ᵀ, the faster BLAS shape)."""
        g = self.group
        grad = self.xp.matmul(cols.reshape(g, cols.shape[0] // g, -1),
                              yt.reshape(g, self.c_y // g, -1).transpose(0, 2, 1))
        dw.reshape(g, self.c_y // g, -1)[...] += grad.transpose(0, 2, 1)

    # 1x1 / stride 1 / pad 0: x and y share their spatial grid; no columns needed.
    def _y_from_x_1x1(self, x, w, y, bias=None) -> None:
        g, n, p = self.group, x.shape[0], self.p_size
        y4 = y.reshape(n, g, self.c_y // g, p)
        self.xp.matmul(self._w3(w), x.reshape(n, g, self.c_x // g, p), out=y4)
        if bias is not None:
            y4 += bias.reshape(g, self.c_y // g, 1)

    def _x_from_y_1x1(self, y, w, x) -> None:
        g, n, p = self.group, y.shape[0], self.p_size
        self.xp.matmul(self._w3(w).transpose(0, 2, 1), y.reshape(n, g, self.c_y // g, p),
                       out=x.reshape(n, g, self.c_x // g, p))

    # -- whole-batch operations --------------------------------------------------------------
    def conv(self, x, w, y, bias=None, owner=None) -> None:
        """y = W ⋆ x (+ bias). ``owner`` tags the columns so ``conv_backward`` can reuse them."""
        for part in self.chunks():
            if self.is_1x1:
                self._y_from_x_1x1(x[part], w, y[part], bias)
            else:
                cols = self.im2col(x[part], owner if self.single_chunk else None)
                self._y_from_cols(cols, w, y[part], bias)

    def conv_backward(self, x, dy, w, dx=None, dw=None, owner=None) -> None:
        """dw += ∂/∂W and dx = ∂/∂x (each only when given) for y = W ⋆ x."""
        for part in self.chunks():
            if self.is_1x1 and dw is None:
                self._x_from_y_1x1(dy[part], w, dx[part])
                continue
            yt = self._transpose_y(dy[part])
            if dw is not None:
                if owner is not None and self.cols_owner == owner and self.single_chunk:
                    cols = self._buffer("cols", (self.c_x * self.k_size, self.num * self.p_size))
                else:
                    cols = self.im2col(x[part])
                self._weight_grad(cols, yt, dw)
            if dx is not None:
                if self.is_1x1:
                    self._x_from_y_1x1(dy[part], w, dx[part])
                else:
                    self._x_from_yt(yt, w, dx[part])

    def conv_transpose(self, y, w, x) -> None:
        """x = Wᵀ ⋆ y (the adjoint of ``conv``: Deconvolution's forward, without bias)."""
        for part in self.chunks():
            if self.is_1x1:
                self._x_from_y_1x1(y[part], w, x[part])
            else:
                self._x_from_yt(self._transpose_y(y[part]), w, x[part])

    def conv_transpose_backward(self, y, dx, w, dy=None, dw=None) -> None:
        """For x = Wᵀ ⋆ y: dy = W ⋆ dx and dw += y ⊗ columns(dx) (each only when given)."""
        for part in self.chunks():
            if self.is_1x1 and dw is None:
                self._y_from_x_1x1(dx[part], w, dy[part])
                continue
            cols = self.im2col(dx[part])
            if dy is not None:
                if self.is_1x1:
                    self._y_from_x_1x1(dx[part], w, dy[part])
                else:
                    self._y_from_cols(cols, w, dy[part])
            if dw is not None:
                self._weight_grad(cols, self._transpose_y(y[part]), dw)
