"""Compiled CPU loops (Numba) for the data movement around the GEMMs.

Optional: where Numba is installed (the ``fast`` extra) and the arrays are NumPy's, MAX
pooling (LeNet's 2x2/2 windows forward, every window geometry backward), 2-D im2col (per
item) and col2im (convolution backward, deconvolution forward) and the SGD update run as
compiled loops.
Without Numba the vectorised NumPy code in :mod:`netengine.ops.pool_ops`,
:mod:`netengine.ops.im2col` and the solver computes the same formulas. ``NETENGINE_JIT=0``
in the environment (or :func:`set_enabled`) turns the compiled loops off; the tests run both
and compare.

Why compiled loops: NumPy needs several strided passes for these (a transposing copy, a
window scan or an add per kernel offset, a zero fill and a scatter; four block passes for the
update) where one loop reads each value once.

Each kernel is compiled on first use for the dtypes it meets and cached on disk (``cache``),
so later processes start without compiling. Float arithmetic is plain IEEE (no fastmath), so a
kernel gives the same values as the NumPy formula it replaces, up to summation order.
"""
from __future__ import annotations

import os
import types

import numpy as np

_state: dict = {"enabled": os.environ.get("NETENGINE_JIT", "1") not in ("0", "false", "no")}

try:  # Numba is optional: without it every caller keeps its NumPy path
    import numba
    from numba import njit
except Exception:  # ImportError, or a Numba that does not match this NumPy
    numba = None

FLT_MAX = float(np.finfo(np.float32).max)  # Caffe's MAX-pooling start value, for any dtype


def available() -> bool:
    """True when Numba imported (the compiled loops can be used)."""
    return numba is not None


def set_enabled(flag: bool) -> None:
    """Turn the compiled loops on or off (off: the NumPy code runs everywhere)."""
    _state["enabled"] = bool(flag)


def enabled(xp: types.ModuleType | None = np) -> bool:
    """Whether the compiled loops serve arrays of module ``xp`` (NumPy only)."""
    return numba is not None and _state["enabled"] and xp is np


def suitable(*arrays) -> bool:
    """The kernels take C-contiguous arrays only: float32/float64 values, integer indices."""
    return all(a.flags.c_contiguous and (a.dtype in (np.float32, np.float64) or
                                         a.dtype.kind in "iu") for a in arrays)


if numba is not None:
    # Single-threaded on purpose: with Numba's threads beside OpenBLAS's, both pools spin on
    # the same cores and a LeNet step ran 2-3x slower (measured on 2 cores); the GEMMs keep
    # OpenBLAS's threads, the loops between them are short.
    _jit = njit(cache=True, nogil=True)

    # -- pooling -----------------------------------------------------------------------------
    @_jit
    def max_pool_2x2(x, y, choice):  # pragma: no cover - compiled
        """MAX pooling over 2x2 windows at stride 2 that lie inside the image (LeNet's), as
        Caffe scans: start from −FLT_MAX, a value wins only when strictly greater (ties keep
        the first, NaN is never taken); choice = 1 + the winner's offset in the window, 0 if
        none. Constant strides let the compiler keep the scan in registers, without branches
        (a general-window loop was slower than NumPy's strided passes, so only this one).
        The pick is carried in x's dtype and converted on store: selects of one lane width
        vectorise (0.41 → 0.30 ms on LeNet's pool1; a uint8 pick kept them scalar)."""
        n, channels, height, width = x.shape
        oh, ow = y.shape[2], y.shape[3]
        xs = x.reshape(n * channels, height, width)
        ys, cs = y.reshape(n * channels, oh, ow), choice.reshape(n * channels, oh, ow)
        low = x.dtype.type(-FLT_MAX)
        none, one, two, three, four = (x.dtype.type(0), x.dtype.type(1), x.dtype.type(2),
                                       x.dtype.type(3), x.dtype.type(4))
        for q in range(n * channels):
            for a in range(oh):
                for b in range(ow):
                    v = xs[q, 2 * a, 2 * b]
                    m = v > low
                    best = v if m else low
                    pick = one if m else none
                    v = xs[q, 2 * a, 2 * b + 1]
                    m = v > best
                    best = v if m else best
                    pick = two if m else pick
                    v = xs[q, 2 * a + 1, 2 * b]
                    m = v > best
                    best = v if m else best
                    pick = three if m else pick
                    v = xs[q, 2 * a + 1, 2 * b + 1]
                    m = v > best
                    best = v if m else best
                    pick = four if m else pick
                    ys[q, a, b] = best
                    cs[q, a, b] = choice.dtype.type(pick)

    @_jit
    def max_pool_2x2_backward(dy, choice, dx):  # pragma: no cover - compiled
        """dx for :func:`max_pool_2x2`: every covered cell is written once (its window's dy
        where chosen, else 0); cells past the last window are zeroed."""
        n, channels, height, width = dx.shape
        oh, ow = dy.shape[2], dy.shape[3]
        dxs = dx.reshape(n * channels, height, width)
        dys, cs = dy.reshape(n * channels, oh, ow), choice.reshape(n * channels, oh, ow)
        zero = dx.dtype.type(0)
        for q in range(n * channels):
            if 2 * oh < height or 2 * ow < width:
                dxs[q] = 0
            for a in range(oh):
                for b in range(ow):
                    g, k = dys[q, a, b], cs[q, a, b]
                    dxs[q, 2 * a, 2 * b] = g if k == 1 else zero
                    dxs[q, 2 * a, 2 * b + 1] = g if k == 2 else zero
                    dxs[q, 2 * a + 1, 2 * b] = g if k == 3 else zero
                    dxs[q, 2 * a + 1, 2 * b + 1] = g if k == 4 else zero

    @_jit
    def max_pool_backward(dy, choice, dx, kh, kw, sh, sw, ph, pw):  # pragma: no cover
        """dx = each dy routed to its window's chosen cell (choice = 1 + offset in the window,
        0: none), summed where windows overlap; any window geometry."""
        n, channels = dx.shape[0], dx.shape[1]
        oh, ow = dy.shape[2], dy.shape[3]
        for q in range(n * channels):
            i, c = q // channels, q % channels
            dx[i, c] = 0
            for a in range(oh):
                for b in range(ow):
                    k = choice[i, c, a, b]
                    if k > 0:
                        k -= 1
                        dx[i, c, a * sh - ph + k // kw, b * sw - pw + k % kw] += dy[i, c, a, b]

    # -- convolution -------------------------------------------------------------------------
    @_jit
    def _inside_columns(kw_n, ow_n, width, sw, pw, dw):  # pragma: no cover - compiled
        """Per kernel column b: the output columns [lo[b], hi[b]) whose input cell
        o·sw − pw + b·dw lies inside the image (lo ≤ hi; empty ranges have lo == hi)."""
        lo, hi = np.empty(kw_n, np.int64), np.empty(kw_n, np.int64)
        for b in range(kw_n):
            lo[b] = min(ow_n, max(0, -((b * dw - pw) // sw)))
            hi[b] = max(lo[b], min(ow_n, (width - 1 + pw - b * dw) // sw + 1))
        return lo, hi

    @_jit
    def im2col_planes(x, cols, kh_n, kw_n, sh, sw, ph, pw, dh, dw, oh_n, ow_n):  # pragma: no cover
        """Per-item columns: cols[i, (c, a, b), (r, o)] = x[i, c, r·sh − ph + a·dh,
        o·sw − pw + b·dw], 0 in the padding; ``cols`` (n, rows ≥ C·kh·kw, out_h·out_w), rows
        past C·kh·kw (the bias row) untouched. Reads x in place: no zero-bordered copy."""
        n, channels, height, width = x.shape
        lo, hi = _inside_columns(kw_n, ow_n, width, sw, pw, dw)
        step, zero = numba.uint64(sw), cols.dtype.type(0)
        for q in range(n * channels):
            i, c = q // channels, q % channels
            for a in range(kh_n):
                for b in range(kw_n):
                    row = (c * kh_n + a) * kw_n + b
                    # Unsigned offsets: no negative-index wrap test, so the loops vectorise.
                    first, last = numba.uint64(lo[b]), numba.uint64(hi[b])
                    start = numba.uint64(lo[b] * sw + b * dw - pw)
                    for r in range(oh_n):
                        base = numba.uint64(r * ow_n)
                        ih = r * sh - ph + a * dh
                        if ih < 0 or ih >= height:
                            first_r, last_r = numba.uint64(ow_n), numba.uint64(ow_n)
                        else:
                            first_r, last_r = first, last
                        for o in range(first_r):
                            cols[i, row, base + o] = zero
                        if sw == 1:
                            for o in range(last_r - first_r):
                                cols[i, row, base + first_r + o] = x[i, c, ih, start + o]
                        else:
                            for o in range(last_r - first_r):
                                cols[i, row, base + first_r + o] = x[i, c, ih, start + o * step]
                        for o in range(last_r, ow_n):
                            cols[i, row, base + o] = zero

    @_jit
    def col2im_offset_major(cols, acc, sh, sw, dh, dw):  # pragma: no cover - compiled
        """acc (C, H, W, n) += the item-minor columns folded back onto the image; ``cols``
        (kh, kw, C, out_h, out_w, n) has its rows in (kernel offset, channel) order. Each cell
        sums its terms in Caffe's col2im order (kernel row, then kernel column), as the
        NumPy path's one add per kernel offset does, in one pass instead of 25."""
        kh_n, kw_n, channels, oh_n, ow_n, n = cols.shape
        for a in range(kh_n):
            for b in range(kw_n):
                for c in range(channels):
                    for r in range(oh_n):
                        ih = r * sh + a * dh
                        for o in range(ow_n):
                            iw = o * sw + b * dw
                            for i in range(n):
                                acc[c, ih, iw, i] += cols[a, b, c, r, o, i]

    @_jit
    def col2im_planes(cols, dx, sh, sw, ph, pw, dh, dw):  # pragma: no cover - compiled
        """dx (n, C, H, W) = per-item columns (n, C, kh, kw, out_h, out_w) folded back onto
        the image, cells in the padding dropped; one (item, channel) plane at a time, so the
        plane stays in cache. Each cell sums its terms from 0 in Caffe's col2im order (kernel
        row, then kernel column), as the NumPy path's one add per kernel offset does."""
        n, channels, kh_n, kw_n, oh_n, ow_n = cols.shape
        height, width = dx.shape[2], dx.shape[3]
        lo, hi = _inside_columns(kw_n, ow_n, width, sw, pw, dw)
        step = numba.uint64(sw)
        for q in range(n * channels):
            i, c = q // channels, q % channels
            dx[i, c] = 0
            for a in range(kh_n):
                for b in range(kw_n):
                    if hi[b] <= lo[b]:
                        continue
                    # Unsigned offsets: no negative-index wrap test in the inner loop, which
                    # the compiler then vectorises (3-4x faster than signed indices).
                    first, count = numba.uint64(lo[b]), numba.uint64(hi[b] - lo[b])
                    start = numba.uint64(lo[b] * sw + b * dw - pw)
                    for r in range(oh_n):
                        ih = r * sh - ph + a * dh
                        if ih < 0 or ih >= height:
                            continue
                        if sw == 1:
                            for o in range(count):
                                dx[i, c, ih, start + o] += cols[i, c, a, b, r, first + o]
                        else:
                            for o in range(count):
                                dx[i, c, ih, start + o * step] += cols[i, c, a, b, r, first + o]

    # -- solver ------------------------------------------------------------------------------
    @_jit
    def sgd_update(w, g, h, scale, decay, l1, momentum, lr):  # pragma: no cover - compiled
        """Per value, in the solver's order and dtype: g *= scale (when scale != 1);
        g += decay·w (L2) or decay·sign(w) (L1); h = μ·h + lr·g; g = h; w -= g."""
        one, zero = w.dtype.type(1), w.dtype.type(0)
        for j in range(w.size):
            gj = g[j]
            if scale != one:
                gj = gj * scale
            if decay != zero:
                wj = w[j]
                if l1:  # np.sign: NaN stays NaN, ±0 gives 0
                    sign = one if wj > zero else (-one if wj < zero else wj * zero)
                    gj = gj + sign * decay
                else:
                    gj = gj + wj * decay
            hj = h[j] * momentum + gj * lr
            h[j] = hj
            g[j] = hj
            w[j] = w[j] - hj
