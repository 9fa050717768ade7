"""Array kernels shared by layers, written once against the array module (NumPy or CuPy)."""
from __future__ import annotations

from netengine.ops.im2col import ConvGemm, conv_output_size, deconv_output_size, window_view
from netengine.ops.pool_ops import FLT_MAX, Pool2d, pooled_size

__all__ = ["FLT_MAX", "ConvGemm", "Pool2d", "conv_output_size", "deconv_output_size",
           "pooled_size", "window_view"]
