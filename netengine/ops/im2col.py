"""im2col / col2im and the GEMM plumbing behind Convolution, Deconvolution and Im2col.

A chunk of ``n`` items x (n, C, *S) (any number D of spatial axes) is unrolled into columns:
for each item, a (C·K, P) matrix, K = prod(kernel), P = prod(out), whose row (c, k_1..k_D) and
column (o_1..o_D) hold x_pad[item, c, o_1·s_1 + k_1·d_1, ..., o_D·s_D + k_D·d_D] (Caffe's
order). The whole chunk is built at once, in one of two layouts chosen per shape:

- per-item (n, C·K, P), the default: the products are batched matmuls over the items
  (y_i = W·cols_i lands directly in the top's layout). Inner loops run along output rows.
- item-minor (C·K, P·n), when the output grid is small and the batch large (LeNet's conv2:
  8x8 outputs): the batch becomes the fastest axis, so every strided copy and col2im add runs
  over long contiguous stretches, and each product is ONE large GEMM per group. The input and
  the y-side diffs are transposed once per pass for it.

- im2col is one copy out of a strided window view of the (padded) input (no Python loop).
- col2im is a loop over the K kernel offsets only; each step is one vectorised add. (The
  backward of an item-minor, one-group convolution orders its product's rows by kernel
  offset first, so each add reads one contiguous block.) For 2-D kernels on NumPy with Numba
  present it is one compiled pass instead (:mod:`netengine.ops.jit`), bitwise the same sums;
  so is the per-item im2col, which then reads the input without a zero-bordered copy.
- Work buffers live in :class:`ConvGemm` and are reallocated only when the shapes change.
- 1x1 kernels with stride 1 and pad 0 skip im2col/col2im: the input is its own column matrix.
- With a bias (and one group, columns built), the columns carry one extra row of ones and the
  weights one extra column holding the bias: the forward GEMM adds the bias and the weight
  gradient GEMM yields the bias gradient (Σ dy) as its last column, with no separate pass.
- Batches whose buffers would exceed ``COL_BUDGET`` elements are processed in chunks of items.

Everything is written against the array module ``xp`` (NumPy or CuPy).
"""
from __future__ import annotations

import itertools
import math

from netengine.ops import jit

# Largest work buffer (in elements) one convolution keeps; bigger batches are chunked.
COL_BUDGET = 1 << 22  # 16 MiB of float32: larger column matrices fall out of the cache
# Item-minor columns pay off when output rows are shorter than this and the batch is this big.
ITEM_MINOR_MAX_WIDTH = 16
ITEM_MINOR_MIN_ITEMS = 8


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Caffe's convolution output size: floor((size + 2p - (d(k-1)+1)) / s) + 1."""
    extent = dilation * (kernel - 1) + 1
    return (size + 2 * pad - extent) // stride + 1


def deconv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Caffe's deconvolution output size: s(size-1) + d(k-1)+1 - 2p."""
    return stride * (size - 1) + dilation * (kernel - 1) + 1 - 2 * pad


def window_view(xp, padded, kernel, stride, dilation, out_shape, item_minor: bool = False):
    """Strided view of the windows of ``padded``: no copy.

    Per-item: ``padded`` (n, C, *S) gives (n, C, *kernel, *out); item-minor: ``padded``
    (C, *S, n) gives (C, *kernel, *out, n). Element [i, c, k, o] = padded[i, c, o·s + k·d].
    """
    if item_minor:
        s_chan, *s_space, s_item = padded.strides
        channels, items = padded.shape[0], padded.shape[-1]
    else:
        s_item, s_chan, *s_space = padded.strides
        channels, items = padded.shape[1], padded.shape[0]
    k_strides = tuple(d * st for d, st in zip(dilation, s_space))
    o_strides = tuple(s * st for s, st in zip(stride, s_space))
    if item_minor:
        shape = (channels, *kernel, *out_shape, items)
        strides = (s_chan, *k_strides, *o_strides, s_item)
    else:
        shape = (items, channels, *kernel, *out_shape)
        strides = (s_item, s_chan, *k_strides, *o_strides)
    return xp.lib.stride_tricks.as_strided(padded, shape=shape, strides=strides)


def col2im_add(cols, acc, kernel, stride, dilation, out_shape, first_spatial: int) -> None:
    """acc += the columns folded back onto the image, one vectorised add per kernel offset.

    ``cols`` has the kernel axes at ``first_spatial`` (lead axes, *kernel, *out, trailing axes)
    and ``acc`` has its spatial axes there (lead axes, *S, trailing axes).
    """
    lead = (slice(None),) * first_spatial
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = lead + tuple(slice(k * d, k * d + s * (o - 1) + 1, s)
                              for k, s, d, o in zip(offset, stride, dilation, out_shape))
        acc[window] += cols[lead + offset]


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
        self._pad_state = None  # (items, layout) the zero-bordered input buffer is ready for
        self._ones_state = None  # column shape whose bias row of ones is in place

    # -- geometry and buffers ----------------------------------------------------------------
    def configure(self, xp, dtype, num: int, c_x: int, x_shape, c_y: int, y_shape,
                  item_minor: bool | None = None, bias: bool = False) -> None:
        """Set the shapes (cheap when unchanged). ``item_minor`` None: pick the layout.
        ``bias``: :meth:`conv` will get a bias (folded into the GEMM where it can be)."""
        key = (xp, dtype, num, c_x, tuple(x_shape), c_y, tuple(y_shape), item_minor, bias)
        if key == self._key:
            return
        self._key = key
        self.xp, self.dtype = xp, dtype
        self.num, self.c_x, self.c_y = num, c_x, c_y
        self.x_shape, self.y_shape = tuple(x_shape), tuple(y_shape)
        self.x_padded = tuple(s + 2 * p for s, p in zip(self.x_shape, self.pad))
        self.k_size = math.prod(self.kernel)
        self.p_size = math.prod(self.y_shape)
        self.k_rows = c_x * self.k_size  # rows of one item's column matrix
        per_item = max(self.k_rows * self.p_size, c_y * self.p_size,
                       c_y * self.k_rows // self.group, math.prod(self.x_padded) * c_x)
        self.chunk = max(1, min(num, COL_BUDGET // max(per_item, 1)))
        if item_minor is None:
            item_minor = (not self.is_1x1 and self.chunk >= ITEM_MINOR_MIN_ITEMS
                          and self.y_shape[-1] < ITEM_MINOR_MAX_WIDTH)
        self.item_minor = item_minor
        # The bias rides in the GEMM as a row of ones under the columns (one group only).
        self.bias_row = bool(bias) and self.group == 1 and not self.is_1x1
        self._bufs = {}
        self.cols_owner = None
        self._pad_state = None
        self._ones_state = None

    def chunks(self):
        """Slices of the batch processed together (one, unless the buffers would be huge)."""
        return [slice(n, min(n + self.chunk, self.num)) for n in range(0, self.num, self.chunk)]

    @property
    def single_chunk(self) -> bool:
        return self.chunk >= self.num

    def _buffer(self, name: str, shape):
        size = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.size < size:
            buf = self.xp.empty(size, dtype=self.dtype)
            self._bufs[name] = buf
            if name == "cols":
                self._ones_state = None
        return buf[:size].reshape(shape)

    def _cols_shape(self, n: int, rows: int | None = None) -> tuple:
        rows = self.k_rows if rows is None else rows
        if self.item_minor:
            return (rows, self.p_size * n)
        return (n, rows, self.p_size)

    def _bias_cols(self, n: int):
        """The column buffer with its extra row of ones: (n, C·K + 1, P) or (C·K + 1, P·n)."""
        shape = self._cols_shape(n, self.k_rows + 1)
        cols = self._buffer("cols", shape)
        if self._ones_state != shape:
            if self.item_minor:
                cols[self.k_rows] = 1
            else:
                cols[:, self.k_rows] = 1
            self._ones_state = shape
        return cols

    def _image_buffer(self, n: int, padded: bool):
        """An x-side work array of n items in the current layout ((n, C, *S) or (C, *S, n),
        zero-bordered when ``padded``) and the index of its image part."""
        space = self.x_padded if padded else self.x_shape
        inner = tuple(slice(p, p + s) for p, s in zip(self.pad, self.x_shape)) if padded else \
            (slice(None),) * len(space)
        if self.item_minor:
            return self._buffer("xbuf", (self.c_x, *space, n)), (slice(None), *inner,
                                                                  slice(None))
        return self._buffer("xbuf", (n, self.c_x, *space)), (slice(None), slice(None), *inner)

    def _layout_input(self, x):
        """x in the column builder's layout: x itself, or a (zero-bordered) copy of it."""
        padded = any(self.pad)
        if not (padded or self.item_minor):
            return x
        n = x.shape[0]
        buf, inner = self._image_buffer(n, padded)
        if padded and self._pad_state != (n, self.item_minor):
            buf[...] = 0
            self._pad_state = (n, self.item_minor)
        src = x.transpose((*range(1, x.ndim), 0)) if self.item_minor else x
        self.xp.copyto(buf[inner], src)
        return buf

    def _compiled(self, *arrays) -> bool:
        """Whether the compiled 2-D im2col/col2im loops (netengine.ops.jit) serve these."""
        return len(self.kernel) == 2 and jit.enabled(self.xp) and jit.suitable(*arrays)

    # -- im2col / col2im (one chunk) ---------------------------------------------------------
    def im2col(self, x, owner=None, out=None):
        """Columns of x (n, C_x, *S_x): (n, C_x·K, P) or, item-minor, (C_x·K, P·n). Written
        into ``out`` when given, else into the shared column buffer (1x1: x itself); with
        ``bias_row`` the shared buffer has one more row, of ones, below the columns."""
        n = x.shape[0]
        if self.is_1x1 and out is None:
            return x.reshape(self._cols_shape(n))
        if out is not None:
            cols = target = out
        elif self.bias_row:
            cols = self._bias_cols(n)
            target = cols[:self.k_rows] if self.item_minor else cols[:, :self.k_rows]
        else:
            cols = target = self._buffer("cols", self._cols_shape(n))
        self.cols_owner = owner
        if not self.item_minor and self._compiled(x, cols):
            # Compiled, reading x in place (no zero-bordered copy). The item-minor layout has
            # no compiled twin: its NumPy copy runs in 64-value stretches and a compiled one
            # was no faster inside a LeNet step.
            jit.im2col_planes(x, cols, *self.kernel, *self.stride, *self.pad, *self.dilation,
                              *self.y_shape)
            return cols
        view = window_view(self.xp, self._layout_input(x), self.kernel, self.stride,
                           self.dilation, self.y_shape, self.item_minor)
        self.xp.copyto(target.reshape(view.shape), view)
        return cols

    def col2im(self, cols, dx) -> None:
        """dx (n, C_x, *S_x) = the columns folded back onto the image (overwrites dx)."""
        n = dx.shape[0]
        if self.item_minor:
            cols = cols.reshape((self.c_x, *self.kernel, *self.y_shape, n))
            first = 1
        elif self._compiled(cols, dx):
            jit.col2im_planes(cols.reshape((n, self.c_x, *self.kernel, *self.y_shape)), dx,
                              *self.stride, *self.pad, *self.dilation)
            return
        else:
            cols = cols.reshape((n, self.c_x, *self.kernel, *self.y_shape))
            first = 2
        if not (any(self.pad) or self.item_minor):
            dx[...] = 0  # per-item layout without padding: accumulate in place
            col2im_add(cols, dx, self.kernel, self.stride, self.dilation, self.y_shape, first)
            return
        acc, inner = self._image_buffer(n, any(self.pad))
        acc[...] = 0
        self._pad_state = None  # the border is no longer zero
        col2im_add(cols, acc, self.kernel, self.stride, self.dilation, self.y_shape, first)
        if self.item_minor:
            self._image_to_dx(acc, inner, dx)
        else:
            self.xp.copyto(dx, acc[inner])

    # -- products (one chunk) ----------------------------------------------------------------
    def _items_first(self, src, dst, bias=None) -> None:
        """dst (n, a, b) = src (a, b, n) with the item axis moved first (+ bias[a] if given),
        in two copies with long runs: one copy gathering at stride n is ~1.6x slower."""
        a, b, n = src.shape
        tmp = self._buffer("items_first", (a, n, b))
        self.xp.copyto(tmp, src.transpose(0, 2, 1))
        if bias is None:
            self.xp.copyto(dst, tmp.transpose(1, 0, 2))
        else:
            self.xp.add(tmp.transpose(1, 0, 2), bias.reshape(a, 1), out=dst)

    def _image_to_dx(self, acc, inner, dx) -> None:
        """dx (n, C, *S) = the image part of an item-minor accumulator (C, *S', n)."""
        d, n = len(self.kernel), dx.shape[0]
        if any(self.pad):
            self.xp.copyto(dx, acc[inner].transpose((d + 1, *range(d + 1))))
        else:
            self._items_first(acc.reshape(self.c_x, -1, n), dx.reshape(n, self.c_x, -1))

    def _w3(self, w):
        g = self.group
        return w.reshape(g, self.c_y // g, -1)

    def _w_bias(self, w, bias):
        """[W | b]: (C_y, C_x·K + 1), the weights beside the bias (``bias_row`` GEMMs)."""
        wb = self._buffer("wbias", (self.c_y, self.k_rows + 1))
        self.xp.copyto(wb[:, :self.k_rows], w.reshape(self.c_y, self.k_rows))
        self.xp.copyto(wb[:, self.k_rows], bias)
        return wb

    def y_operand(self, y):
        """y (n, C_y, *S_y) as the products need it: itself, or item-minor (C_y, P·n)."""
        n = y.shape[0]
        if not self.item_minor:
            return y.reshape(n, self.c_y, self.p_size)
        yt = self._buffer("yt", (self.c_y, self.p_size * n))
        self.xp.copyto(yt.reshape(self.c_y, self.p_size, n),
                       y.reshape(n, self.c_y, self.p_size).transpose(1, 2, 0))
        return yt

    def y_from_cols(self, cols, w, y, bias=None) -> None:
        """y (n, C_y, *S_y) = W · cols (+ bias; folded in when ``cols`` has the ones row)."""
        xp, g, n = self.xp, self.group, y.shape[0]
        fold = bias is not None and self.bias_row and cols.shape[-2 if not self.item_minor
                                                              else 0] == self.k_rows + 1
        if not self.item_minor:
            y3 = y.reshape(n, self.c_y, self.p_size)
            if fold:
                xp.matmul(self._w_bias(w, bias), cols, out=y3)
                return
            y4 = y.reshape(n, g, self.c_y // g, self.p_size)
            xp.matmul(self._w3(w), cols.reshape(n, g, -1, self.p_size), out=y4)
            if bias is not None:
                y4 += bias.reshape(g, self.c_y // g, 1)
            return
        prod = self._buffer("prod", (self.c_y, self.p_size * n))
        if fold:
            xp.matmul(self._w_bias(w, bias), cols, out=prod)
        else:
            xp.matmul(self._w3(w), cols.reshape(g, -1, self.p_size * n),
                      out=prod.reshape(g, self.c_y // g, -1))
        self._items_first(prod.reshape(self.c_y, self.p_size, n),
                          y.reshape(n, self.c_y, self.p_size), None if fold else bias)

    def x_from_y(self, yop, w, dx) -> None:
        """dx (n, C_x, *S_x) = col2im(Wᵀ · y), ``yop`` from :meth:`y_operand`."""
        xp, g, n = self.xp, self.group, dx.shape[0]
        wt = self._w3(w).transpose(0, 2, 1)
        if self.is_1x1:
            xp.matmul(wt, yop.reshape(n, g, self.c_y // g, self.p_size),
                      out=dx.reshape(n, g, self.c_x // g, self.p_size))
            return
        cols = self._buffer("cols", self._cols_shape(n))
        self.cols_owner = None
        self._ones_state = None
        if self.item_minor and g == 1:
            # Rows in (kernel offset, channel) order: each offset's block of the product is
            # then one contiguous (C_x, *S_y, n) array for its col2im add.
            d = len(self.kernel)
            wt_kc = self._buffer("wt_kc", (*self.kernel, self.c_x, self.c_y))
            xp.copyto(wt_kc, w.transpose((*range(2, d + 2), 1, 0)))
            xp.matmul(wt_kc.reshape(-1, self.c_y), yop, out=cols)
            self._col2im_offset_major(cols, dx)
            return
        if self.item_minor:
            xp.matmul(wt, yop.reshape(g, self.c_y // g, -1),
                      out=cols.reshape(g, -1, n * self.p_size))
        else:
            xp.matmul(wt, yop.reshape(n, g, self.c_y // g, self.p_size),
                      out=cols.reshape(n, g, -1, self.p_size))
        self.col2im(cols, dx)

    def _col2im_offset_major(self, cols, dx) -> None:
        """col2im for item-minor columns whose rows run (kernel offset, channel), i.e.
        (*K, C_x, *S_y, n): one add of a contiguous block per kernel offset."""
        n = dx.shape[0]
        cols = cols.reshape((*self.kernel, self.c_x, *self.y_shape, n))
        acc, inner = self._image_buffer(n, any(self.pad))
        acc[...] = 0
        self._pad_state = None  # the border is no longer zero
        if self._compiled(cols, acc):
            jit.col2im_offset_major(cols, acc, *self.stride, *self.dilation)
        else:
            for offset in itertools.product(*(range(k) for k in self.kernel)):
                window = tuple(slice(k * dl, k * dl + s * (o - 1) + 1, s) for k, s, dl, o in
                               zip(offset, self.stride, self.dilation, self.y_shape))
                acc[(slice(None), *window)] += cols[offset]
        self._image_to_dx(acc, inner, dx)

    def weight_grad(self, cols, yop, dw, db=None) -> None:
        """dw += Σ_items y · colsᵀ per group; with ``db`` (``cols`` carrying the ones row)
        also db += Σ y, read off the same product."""
        xp, g, mg = self.xp, self.group, self.c_y // self.group
        rows = self.k_rows + (db is not None)
        if self.item_minor:  # one GEMM per group, as (cols · ytᵀ)ᵀ (the faster BLAS shape)
            grad = self._buffer("wgrad", (g, rows // g if db is None else rows, mg))
            xp.matmul(cols[:rows].reshape(g, -1, cols.shape[-1]),
                      yop.reshape(g, mg, -1).transpose(0, 2, 1), out=grad)
            grad = grad.transpose(0, 2, 1)  # (g, mg, rows/g)
        else:  # one GEMM per item (no transposed copies), then the sum over items
            n = yop.shape[0]
            per_item = self._buffer("wgrad_items", (n, g, mg, rows // g if db is None else rows))
            xp.matmul(yop.reshape(n, g, mg, self.p_size),
                      cols[:, :rows].reshape(n, g, -1, self.p_size).transpose(0, 1, 3, 2),
                      out=per_item)
            grad = self._buffer("wgrad", per_item.shape[1:])
            per_item.sum(axis=0, out=grad)
        if db is None:
            dw.reshape(g, mg, -1)[...] += grad
        else:
            dw.reshape(self.c_y, -1)[...] += grad[0, :, :self.k_rows]
            db += grad[0, :, self.k_rows]

    # -- whole-batch operations --------------------------------------------------------------
    def _cached_cols(self, owner):
        if owner is not None and self.cols_owner == owner and self.single_chunk:
            rows = self.k_rows + self.bias_row
            return self._buffer("cols", self._cols_shape(self.num, rows))
        return None

    def conv(self, x, w, y, bias=None, owner=None) -> None:
        """y = W ⋆ x (+ bias). ``owner`` tags the columns so ``conv_backward`` can reuse them."""
        for part in self.chunks():
            cols = self.im2col(x[part], owner if self.single_chunk else None)
            self.y_from_cols(cols, w, y[part], bias)

    def conv_backward(self, x, dy, w, dx=None, dw=None, owner=None, db=None) -> None:
        """dw += ∂/∂W and dx = ∂/∂x (each only when given) for y = W ⋆ x; ``db`` (only with
        ``bias_row`` and ``dw``) += ∂/∂b from the same GEMM."""
        if db is not None and not (self.bias_row and dw is not None):
            raise ValueError("db is computed with dw, and only for a bias_row configuration")
        for part in self.chunks():
            yop = self.y_operand(dy[part])
            if dw is not None:
                cols = self._cached_cols(owner)
                if cols is None:
                    cols = self.im2col(x[part])
                self.weight_grad(cols, yop, dw, db)
            if dx is not None:
                self.x_from_y(yop, w, dx[part])

    def conv_transpose(self, y, w, x) -> None:
        """x = Wᵀ ⋆ y (the adjoint of ``conv``: Deconvolution's forward, without bias)."""
        for part in self.chunks():
            self.x_from_y(self.y_operand(y[part]), w, x[part])

    def conv_transpose_backward(self, y, dx, w, dy=None, dw=None) -> None:
        """For x = Wᵀ ⋆ y: dy = W ⋆ dx and dw += y ⊗ columns(dx) (each only when given)."""
        for part in self.chunks():
            cols = self.im2col(dx[part])
            if dy is not None:
                self.y_from_cols(cols, w, dy[part])
            if dw is not None:
                self.weight_grad(cols, self.y_operand(y[part]), dw)
