"""Named CuPy kernels: one-launch GPU versions of the hot loops, and cuDNN convolution.

The generic layer code runs unchanged on CuPy; some of it is a Python loop of small vectorised
steps (col2im and pooling loop over the kernel offsets: kh·kw launches and more per pass). The
kernels here do the same arithmetic in one launch, in the same order, so results match the
generic path (to float rounding). They are *beside* the generic code, never a second copy of a
layer's logic: a caller uses one only where :func:`available` says CuPy is in use, and keeps
the generic path otherwise.

- ``im2col_2d`` / ``col2im_2d``: ConvGemm's column layouts (per item or item-minor), padding
  and dilation folded in (no padded copy of the input); col2im gathers, so it is deterministic.
- ``max_pool_2d`` / ``pool_route_backward_2d`` / ``ave_pool_2d`` / ``ave_pool_backward_2d``:
  Caffe's pooling exactly as netengine.ops.pool_ops does it (first maximum wins, −FLT_MAX and
  index −1 for an empty window, AVE divisor clipped to the padded extent).
- ``sgd_update``: the SGD step fused (L2 decay, momentum, the update value) in one kernel.
- ``cudnn_conv_*``: convolution through CuPy's cuDNN wrappers (``cupyx.cudnn``), where this
  CuPy has them (CuPy 14 removed cuDNN; then these report False and the caller keeps
  im2col + cuBLAS).

Kernels are compiled lazily, once per (name, dtype), and cached. The CUDA sources are plain C
with two macros so the tests can also compile them with a host C compiler and check the index
arithmetic against the NumPy reference on a machine without a GPU (``kernel_source``).
"""
from __future__ import annotations

import functools
import math

import numpy as np

_BLOCK = 256
_MAX_BLOCKS = 1 << 20  # the loops are grid-stride, so any size fits

_PRELUDE = r"""
#ifdef NE_CPU
#define NE_GLOBAL extern "C"
#define NE_LOOP(i, n) for (long long i = 0; i < (long long)(n); ++i)
#else
#define NE_GLOBAL extern "C" __global__
#define NE_LOOP(i, n) \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
       i += (long long)blockDim.x * gridDim.x)
#endif
#define NE_FLT_MAX 3.402823466e+38f
"""

# Geometry arguments shared by every 2-D kernel, in this order.
_GEOMETRY = ("int n, int C, int H, int W, int kh, int kw, int sh, int sw, int ph, int pw, "
             "int oh, int ow")

_SOURCES = {
    # cols[row = (c, ki, kj), item i, p = (oy, ox)] = x[i, c, oy*sh - ph + ki*dh, ...] or 0, at
    # cols + row*s_row + i*s_item + p*s_p. Threads walk cols in memory order: memory axis j
    # (sizes m0 > m1 > m2 in stride order) is logical axis r_j (0 row, 1 item, 2 p).
    "im2col": r"""
NE_GLOBAL void NAME(const T* x, T* cols, long long total, GEOMETRY, int dh, int dw,
                    long long m1, long long m2, int r0, int r1, int r2) {
  NE_LOOP(idx, total) {
    long long q[3], v[3];
    q[2] = idx % m2; q[1] = (idx / m2) % m1; q[0] = idx / m2 / m1;
    v[r0] = q[0]; v[r1] = q[1]; v[r2] = q[2];
    long long row = v[0], p = v[2];
    int i = (int)v[1];
    int ox = (int)(p % ow), oy = (int)(p / ow);
    int kj = (int)(row % kw); long long r = row / kw;
    int ki = (int)(r % kh); int c = (int)(r / kh);
    int y = oy * sh - ph + ki * dh, xx = ox * sw - pw + kj * dw;
    cols[idx] = (y >= 0 && y < H && xx >= 0 && xx < W)
        ? x[(((long long)i * C + c) * H + y) * W + xx] : (T)0;
  }
}
""",
    # dx[i, c, y, x] = sum over the (ki, kj) whose window cell lands on (y, x), in (ki, kj) order,
    # reading cols laid out as for im2col (element strides s_row, s_item, s_p).
    "col2im": r"""
NE_GLOBAL void NAME(const T* cols, T* dx, long long total, GEOMETRY, int dh, int dw,
                    long long s_row, long long s_item, long long s_p) {
  NE_LOOP(idx, total) {
    int xx = (int)(idx % W); long long t = idx / W;
    int y = (int)(t % H); t /= H;
    int c = (int)(t % C); int i = (int)(t / C);
    const T* base = cols + (long long)i * s_item;
    T acc = (T)0;
    for (int ki = 0; ki < kh; ++ki) {
      int ty = y + ph - ki * dh;
      if (ty < 0 || ty % sh != 0) continue;
      int oy = ty / sh;
      if (oy >= oh) continue;
      for (int kj = 0; kj < kw; ++kj) {
        int tx = xx + pw - kj * dw;
        if (tx < 0 || tx % sw != 0) continue;
        int ox = tx / sw;
        if (ox >= ow) continue;
        acc += base[(((long long)c * kh + ki) * kw + kj) * s_row
                    + ((long long)oy * ow + ox) * s_p];
      }
    }
    dx[idx] = acc;
  }
}
""",
    # y = first strict maximum above -FLT_MAX over the window's in-image cells;
    # choice = base + ki*kw + kj (base - 1 where no cell was taken).
    "max_pool": r"""
NE_GLOBAL void NAME(const T* x, T* y, I* choice, long long total, GEOMETRY, int base) {
  NE_LOOP(idx, total) {
    int px = (int)(idx % ow); long long t = idx / ow;
    int py = (int)(t % oh); long long plane = t / oh;
    int hs = py * sh - ph, ws = px * sw - pw;
    const T* src = x + plane * H * W;
    T best = (T)(-NE_FLT_MAX);
    int pick = -1;
    for (int ki = 0; ki < kh; ++ki) {
      int yy = hs + ki;
      if (yy < 0 || yy >= H) continue;
      for (int kj = 0; kj < kw; ++kj) {
        int xx = ws + kj;
        if (xx < 0 || xx >= W) continue;
        T v = src[(long long)yy * W + xx];
        if (v > best) { best = v; pick = ki * kw + kj; }
      }
    }
    y[idx] = best;
    choice[idx] = (I)(pick + base);
  }
}
""",
    # dx[y, x] = sum of dy over the windows whose recorded choice is (y, x); windows visited in
    # the order of their kernel offset (the generic code's order).
    "pool_route_backward": r"""
NE_GLOBAL void NAME(const T* dy, const I* choice, T* dx, long long total, GEOMETRY, int base) {
  NE_LOOP(idx, total) {
    int xx = (int)(idx % W); long long t = idx / W;
    int yy = (int)(t % H); long long plane = t / H;
    int py_hi = (yy + ph) / sh, px_hi = (xx + pw) / sw;
    if (py_hi > oh - 1) py_hi = oh - 1;
    if (px_hi > ow - 1) px_hi = ow - 1;
    T acc = (T)0;
    for (int py = py_hi; py >= 0 && py * sh - ph + kh > yy; --py) {
      int ki = yy - (py * sh - ph);
      for (int px = px_hi; px >= 0 && px * sw - pw + kw > xx; --px) {
        int kj = xx - (px * sw - pw);
        long long o = (plane * oh + py) * ow + px;
        if ((int)choice[o] == ki * kw + kj + base) acc += dy[o];
      }
    }
    dx[idx] = acc;
  }
}
""",
    # y = (sum over the window's in-image cells) * 1/pool_size, pool_size clipped to H+ph, W+pw.
    "ave_pool": r"""
NE_GLOBAL void NAME(const T* x, T* y, long long total, GEOMETRY) {
  NE_LOOP(idx, total) {
    int px = (int)(idx % ow); long long t = idx / ow;
    int py = (int)(t % oh); long long plane = t / oh;
    int hs = py * sh - ph, ws = px * sw - pw;
    int he = hs + kh < H + ph ? hs + kh : H + ph, we = ws + kw < W + pw ? ws + kw : W + pw;
    T inv = (T)(1.0 / (double)((he - hs) * (we - ws)));
    const T* src = x + plane * H * W;
    T acc = (T)0;
    for (int ki = 0; ki < kh; ++ki) {
      int yy = hs + ki;
      for (int kj = 0; kj < kw; ++kj) {
        int xx = ws + kj;
        if (yy >= 0 && yy < H && xx >= 0 && xx < W) acc += src[(long long)yy * W + xx];
      }
    }
    y[idx] = acc * inv;
  }
}
""",
    # dx[y, x] = sum of dy * 1/pool_size over the windows covering (y, x), in offset order.
    "ave_pool_backward": r"""
NE_GLOBAL void NAME(const T* dy, T* dx, long long total, GEOMETRY) {
  NE_LOOP(idx, total) {
    int xx = (int)(idx % W); long long t = idx / W;
    int yy = (int)(t % H); long long plane = t / H;
    int py_hi = (yy + ph) / sh, px_hi = (xx + pw) / sw;
    if (py_hi > oh - 1) py_hi = oh - 1;
    if (px_hi > ow - 1) px_hi = ow - 1;
    T acc = (T)0;
    for (int py = py_hi; py >= 0 && py * sh - ph + kh > yy; --py) {
      int hs = py * sh - ph;
      int he = hs + kh < H + ph ? hs + kh : H + ph;
      for (int px = px_hi; px >= 0 && px * sw - pw + kw > xx; --px) {
        int ws = px * sw - pw;
        int we = ws + kw < W + pw ? ws + kw : W + pw;
        T inv = (T)(1.0 / (double)((he - hs) * (we - ws)));
        acc += dy[(plane * oh + py) * ow + px] * inv;
      }
    }
    dx[idx] = acc;
  }
}
""",
}

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
           np.dtype(np.int8): "signed char", np.dtype(np.int32): "int"}


def kernel_source(name: str, dtype, index_dtype=None) -> tuple[str, str]:
    """(C source, function name) of kernel ``name`` for ``dtype`` (and the pooling index
    dtype); compile with NVRTC as is, or with a host compiler after ``#define NE_CPU``."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"netengine kernels support float32 and float64, not {dtype}")
    func = f"ne_{name}_{dtype.name}"
    typedefs = f"typedef {_CTYPES[dtype]} T;\n"
    if index_dtype is not None:
        func += f"_{np.dtype(index_dtype).name}"
        typedefs += f"typedef {_CTYPES[np.dtype(index_dtype)]} I;\n"
    body = _SOURCES[name].replace("NAME", func).replace("GEOMETRY", _GEOMETRY)
    return _PRELUDE + typedefs + body, func


def available(xp) -> bool:
    """True when ``xp`` is the real CuPy (kernels can be launched)."""
    return getattr(xp, "RawKernel", None) is not None and xp.__name__ == "cupy"


@functools.cache
def _raw_kernel(name: str, dtype: str, index_dtype: str | None = None):
    import cupy

    source, func = kernel_source(name, dtype, index_dtype)
    return cupy.RawKernel(source, func)


def _launch(name: str, total: int, args: tuple, dtype, index_dtype=None) -> None:
    if total <= 0:
        return
    kernel = _raw_kernel(name, np.dtype(dtype).name,
                         None if index_dtype is None else np.dtype(index_dtype).name)
    blocks = min((total + _BLOCK - 1) // _BLOCK, _MAX_BLOCKS)
    kernel((blocks,), (_BLOCK,), args)


def _geometry(n, c, h, w, kernel, stride, pad, out_shape) -> tuple:
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, pad, out_shape
    return tuple(np.int32(v) for v in (n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))


def _contiguous(xp, a):
    return a if a.flags.c_contiguous else xp.ascontiguousarray(a)


def _check_out(out, shape, dtype) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"output must be a C-contiguous {np.dtype(dtype).name} array of shape "
                         f"{tuple(shape)}, got {out.dtype} {tuple(out.shape)}")


# -- convolution columns ---------------------------------------------------------------------------
# Column layouts (row = (c, ki, kj) of C·K rows, p = (oy, ox) of P outputs, i = item of n):
#   "item_major": (n, C·K, P), ConvGemm's default (one Caffe column matrix per item);
#   "item_minor": (C·K, P·n), ConvGemm's item-minor layout (the item is the fastest axis);
#   "batch_columns": (C·K, n·P), the items' column matrices side by side.
_LAYOUTS = {"item_major": (1, 0, 2), "item_minor": (0, 2, 1), "batch_columns": (0, 1, 2)}


def _layout(layout: str, rows: int, n: int, p: int):
    """(memory-order sizes m1, m2; roles r0..r2; element strides s_row, s_item, s_p)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown column layout '{layout}'; expected one of {sorted(_LAYOUTS)}")
    roles = _LAYOUTS[layout]
    sizes = {0: rows, 1: n, 2: p}
    mem = [sizes[r] for r in roles]
    strides = {roles[2]: 1, roles[1]: mem[2], roles[0]: mem[1] * mem[2]}
    return (mem[1], mem[2]), roles, (strides[0], strides[1], strides[2])


def im2col_2d(x, cols, kernel, stride, pad, dilation, out_shape,
              layout: str = "item_major") -> None:
    """cols = the columns of x (n, C, H, W) in ``layout`` (see _LAYOUTS), one launch; padding
    and dilation are folded in (no padded copy of x)."""
    import cupy as xp

    x = _contiguous(xp, x)
    n, c, h, w = x.shape
    rows, p = c * math.prod(kernel), math.prod(out_shape)
    if cols.size != rows * n * p or cols.dtype != x.dtype or not cols.flags.c_contiguous:
        raise ValueError(f"cols must be a C-contiguous {x.dtype} array of {rows * n * p} "
                         f"elements, got {cols.dtype} {tuple(cols.shape)}")
    (m1, m2), roles, _ = _layout(layout, rows, n, p)
    _launch("im2col", cols.size, (x, cols, np.int64(cols.size),
                                  *_geometry(n, c, h, w, kernel, stride, pad, out_shape),
                                  np.int32(dilation[0]), np.int32(dilation[1]),
                                  np.int64(m1), np.int64(m2), *(np.int32(r) for r in roles)),
            x.dtype)


def col2im_2d(cols, dx, kernel, stride, pad, dilation, out_shape,
              layout: str = "item_major") -> None:
    """dx (n, C, H, W) = the columns (``layout``) folded back onto the image; overwrites dx,
    one launch, each pixel summed in the kernel-offset order of the generic code."""
    import cupy as xp

    cols = _contiguous(xp, cols)
    n, c, h, w = dx.shape
    _check_out(dx, dx.shape, cols.dtype)
    _, _, (s_row, s_item, s_p) = _layout(layout, c * math.prod(kernel), n, math.prod(out_shape))
    _launch("col2im", dx.size, (cols, dx, np.int64(dx.size),
                                *_geometry(n, c, h, w, kernel, stride, pad, out_shape),
                                np.int32(dilation[0]), np.int32(dilation[1]),
                                np.int64(s_row), np.int64(s_item), np.int64(s_p)), cols.dtype)


# -- pooling -------------------------------------------------------------------------------------
def max_pool_2d(x, y, choice, kernel, stride, pad, base: int = 1) -> None:
    """y, choice (n, C, oh, ow) = Caffe's MAX pooling of x and ``base`` + the kernel offset
    number (ki·kw + kj) of the first maximum (``base`` − 1 where the window took nothing)."""
    import cupy as xp

    x = _contiguous(xp, x)
    n, c, h, w = x.shape
    _check_out(y, y.shape, x.dtype)
    _check_out(choice, y.shape, choice.dtype)
    _launch("max_pool", y.size, (x, y, choice, np.int64(y.size),
                                 *_geometry(n, c, h, w, kernel, stride, pad, y.shape[2:]),
                                 np.int32(base)), x.dtype, choice.dtype)


def pool_route_backward_2d(dy, choice, dx, kernel, stride, pad, base: int = 1) -> None:
    """dx = dy routed to the recorded offsets (MAX and STOCHASTIC backward; ``choice`` as
    :func:`max_pool_2d` writes it); overwrites dx."""
    import cupy as xp

    dy, choice = _contiguous(xp, dy), _contiguous(xp, choice)
    n, c, h, w = dx.shape
    _check_out(dx, dx.shape, dy.dtype)
    _launch("pool_route_backward", dx.size,
            (dy, choice, dx, np.int64(dx.size),
             *_geometry(n, c, h, w, kernel, stride, pad, dy.shape[2:]), np.int32(base)),
            dy.dtype, choice.dtype)


def ave_pool_2d(x, y, kernel, stride, pad) -> None:
    """y = Caffe's AVE pooling of x (window sum times 1/divisor)."""
    import cupy as xp

    x = _contiguous(xp, x)
    n, c, h, w = x.shape
    _check_out(y, y.shape, x.dtype)
    _launch("ave_pool", y.size, (x, y, np.int64(y.size),
                                 *_geometry(n, c, h, w, kernel, stride, pad, y.shape[2:])),
            x.dtype)


def ave_pool_backward_2d(dy, dx, kernel, stride, pad) -> None:
    """dx = AVE pooling's gradient (overwrites dx)."""
    import cupy as xp

    dy = _contiguous(xp, dy)
    n, c, h, w = dx.shape
    _check_out(dx, dx.shape, dy.dtype)
    _launch("ave_pool_backward", dx.size,
            (dy, dx, np.int64(dx.size), *_geometry(n, c, h, w, kernel, stride, pad,
                                                   dy.shape[2:])), dy.dtype)


# -- solver ----------------------------------------------------------------------------------------
@functools.cache
def _sgd_kernel():
    import cupy

    return cupy.ElementwiseKernel(
        "T w, T decay, T rate, T momentum", "T g, T h",
        "T grad = g + decay * w; h = rate * grad + momentum * h; g = h;",
        "netengine_sgd_update")


def sgd_update(data, diff, history, local_rate: float, momentum: float,
               decay: float = 0.0) -> None:
    """Caffe's SGD step for one blob in one launch: diff += decay·data (L2),
    history = local_rate·diff + momentum·history, diff = history (then ``blob.update()``)."""
    t = data.dtype.type
    _sgd_kernel()(data, t(decay), t(local_rate), t(momentum), diff, history)


# -- cuDNN -----------------------------------------------------------------------------------------
@functools.cache
def _cudnn_modules():
    """(cupyx.cudnn, cupy.cuda.cudnn) where this CuPy ships cuDNN support, else None."""
    try:
        import cupyx.cudnn as high
        from cupy.cuda import cudnn as low

        low.getVersion()
    except Exception:  # CuPy 14 removed cuDNN; older ones need the cuDNN library installed
        return None
    return high, low


def cudnn_version() -> int | None:
    """cuDNN's version number as CuPy reports it, or None where CuPy offers no cuDNN."""
    modules = _cudnn_modules()
    return None if modules is None else int(modules[1].getVersion())


def cudnn_conv_supported(xp, x, w, stride, pad, dilation, group: int) -> bool:
    """True when cuDNN (through CuPy) computes exactly Caffe's convolution for these operands:
    real CuPy with cuDNN, 2-D or 3-D, float32/float64 in both, cross-correlation with the same
    stride/pad/dilation/group (cuDNN and Caffe agree on all of them, output size included)."""
    if not available(xp) or _cudnn_modules() is None:
        return False
    spatial = x.ndim - 2
    return (spatial in (2, 3) and x.dtype == w.dtype and x.dtype in (np.float32, np.float64)
            and len(stride) == len(pad) == len(dilation) == spatial and group >= 1)


def _conv_args(stride, pad, dilation, group) -> tuple:
    return tuple(int(p) for p in pad), tuple(int(s) for s in stride), \
        tuple(int(d) for d in dilation), int(group)


def cudnn_conv_forward(x, w, b, y, stride, pad, dilation, group: int = 1) -> None:
    """y = w ⋆ x (+ b): Caffe's Convolution forward on cuDNN (check cudnn_conv_supported)."""
    high, _ = _cudnn_modules()
    pad, stride, dilation, group = _conv_args(stride, pad, dilation, group)
    high.convolution_forward(x, w, b, y, pad, stride, dilation, group, auto_tune=False,
                             tensor_core="never")


def cudnn_conv_backward(x, w, dy, dx=None, dw=None, db=None, stride=(1, 1), pad=(0, 0),
                        dilation=(1, 1), group: int = 1) -> None:
    """Caffe's Convolution backward on cuDNN: dx = ∂/∂x (overwritten), dw += ∂/∂w,
    db += ∂/∂b (each only when given)."""
    import cupy

    high, _ = _cudnn_modules()
    pad, stride, dilation, group = _conv_args(stride, pad, dilation, group)
    if dw is not None:
        grad = cupy.empty_like(dw)
        high.convolution_backward_filter(x, dy, grad, pad, stride, dilation, group,
                                         deterministic=False, auto_tune=False,
                                         tensor_core="never")
        dw += grad
    if db is not None:
        db += dy.sum(axis=(0,) + tuple(range(2, dy.ndim)))
    if dx is not None:
        high.convolution_backward_data(w, dy, None, dx, pad, stride, dilation, group,
                                       deterministic=False, auto_tune=False,
                                       tensor_core="never")


def cudnn_deconv_forward(x, w, b, y, stride, pad, dilation, group: int = 1) -> None:
    """y = wᵀ ⋆ x (+ b): Caffe's Deconvolution forward (cuDNN's backward-data)."""
    high, _ = _cudnn_modules()
    pad, stride, dilation, group = _conv_args(stride, pad, dilation, group)
    high.convolution_backward_data(w, x, b, y, pad, stride, dilation, group,
                                   deterministic=False, auto_tune=False, tensor_core="never")


def cudnn_deconv_backward(x, w, dy, dx=None, dw=None, db=None, stride=(1, 1), pad=(0, 0),
                          dilation=(1, 1), group: int = 1) -> None:
    """Deconvolution backward: dx = w ⋆ dy (overwritten), dw += ∂/∂w, db += ∂/∂b."""
    import cupy

    high, _ = _cudnn_modules()
    pad, stride, dilation, group = _conv_args(stride, pad, dilation, group)
    if dw is not None:
        grad = cupy.empty_like(dw)
        # The deconvolution is the adjoint of a convolution whose input is the deconvolution's
        # top: its filter gradient pairs that input (dy) with that output (x).
        high.convolution_backward_filter(dy, x, grad, pad, stride, dilation, group,
                                         deterministic=False, auto_tune=False,
                                         tensor_core="never")
        dw += grad
    if db is not None:
        db += dy.sum(axis=(0,) + tuple(range(2, dy.ndim)))
    if dx is not None:
        high.convolution_forward(dy, w, None, dx, pad, stride, dilation, group,
                                 auto_tune=False, tensor_core="never")
