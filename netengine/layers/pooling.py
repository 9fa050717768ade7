"""Pooling (MAX, AVE, STOCHASTIC) and SPP (a pyramid of poolings), Caffe's rules exactly.

Window (ph, pw) covers rows [ph·s − p, ph·s − p + k) (columns alike). Output size per axis:
ceil((H + 2p − k)/s) + 1 (``round_mode: FLOOR`` takes the floor); then, if the layer has any
padding, the last window is dropped when it would start in the far padding: (out−1)·s ≥ H + p.
"""
from __future__ import annotations

import numpy as np

from netengine import backend
from netengine.blob import Blob
from netengine.layers.base import Layer, register
from netengine.ops.pool_ops import Pool2d, pooled_size
from netengine.proto import caffe_pb2

_P = caffe_pb2.PoolingParameter
_FLT_MIN = float(np.finfo(np.float32).tiny)  # Caffe's STOCHASTIC TEST kernel starts its sum here


@register
class Pooling(Layer):
    """MAX / AVE / STOCHASTIC pooling over 2-D windows of a 4-D (N, C, H, W) bottom.

    - MAX: windows are clipped to the image; start at −FLT_MAX and keep a value only if strictly
      greater, so the first maximum (raster order) wins ties and a window with nothing above
      −FLT_MAX outputs −FLT_MAX. An optional second top is the argmax as a float index h·W + w
      within the channel plane (−1 for none). Backward routes each diff to its argmax.
    - AVE: sum over the window clipped to the image, divided by the window clipped to the
      padded extent (end = min(start + k, H + p)): padded cells count, overhang beyond does not.
    - STOCHASTIC (no padding): TRAIN samples one element with probability ∝ its value
      (activations must be non-negative) and backward routes the diff to it; TEST outputs
      Σx²/Σx (Caffe implements both on GPU only; here they run everywhere). TEST has no
      backward in Caffe, so it is refused.
    - global_pooling: the kernel is the whole H×W, recomputed on every reshape; pad 0, stride 1.
    - pad must be smaller than the kernel; padding only for MAX and AVE.
    """

    type = "Pooling"
    exact_bottoms = 1
    min_tops = 1
    max_tops = 2
    allows_inplace = False

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.layer_param.pooling_param
        self.method = p.pool
        if len(top) > 1 and self.method != _P.MAX:
            raise self.fail(f"a second top (the argmax mask) needs pool: MAX, got pool: "
                            f"{_P.PoolMethod.Name(self.method)}")
        self.global_pooling = p.global_pooling
        has_kernel = p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w")
        if self.global_pooling:
            if has_kernel:
                raise self.fail("global_pooling takes the kernel from the input; do not give "
                                "kernel_size or kernel_h/kernel_w")
        else:
            if p.HasField("kernel_size") and (p.HasField("kernel_h") or p.HasField("kernel_w")):
                raise self.fail("give either kernel_size or kernel_h and kernel_w, not both")
            if not p.HasField("kernel_size") and not (p.HasField("kernel_h")
                                                       and p.HasField("kernel_w")):
                raise self.fail("pooling_param needs kernel_size, or both kernel_h and kernel_w "
                                "(or global_pooling: true)")
        self.kernel = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else \
            (p.kernel_size, p.kernel_size)
        for name in ("pad", "stride"):
            has_h, has_w = p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
            if (has_h or has_w) and (p.HasField(name) or not (has_h and has_w)):
                raise self.fail(f"give either {name}, or both {name}_h and {name}_w")
        self.pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        self.stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else \
            (p.stride, p.stride)
        if self.global_pooling and (any(self.pad) or self.stride != (1, 1)):
            raise self.fail(f"global_pooling needs pad 0 and stride 1, got pad {self.pad} and "
                            f"stride {self.stride}")
        if not self.global_pooling and min(self.kernel) <= 0:
            raise self.fail(f"kernel size must be positive, got {self.kernel}")
        if min(self.stride) <= 0:
            raise self.fail(f"stride must be positive, got {self.stride}")
        if any(self.pad):
            if self.method not in (_P.MAX, _P.AVE):
                raise self.fail("padding is implemented only for MAX and AVE pooling")
            if not self.global_pooling and (self.pad[0] >= self.kernel[0]
                                            or self.pad[1] >= self.kernel[1]):
                raise self.fail(f"pad {self.pad} must be smaller than the kernel {self.kernel}")
        self.ceil_mode = p.round_mode == _P.CEIL
        self.pool = Pool2d()

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.fail(f"input must have 4 axes (num, channels, height, width), got shape "
                            f"{shape}")
        if self.global_pooling:
            self.kernel = shape[2:]
        clip = any(self.pad)
        out = tuple(pooled_size(size, k, s, p, self.ceil_mode, clip) for size, k, s, p in
                    zip(shape[2:], self.kernel, self.stride, self.pad))
        if min(out) <= 0:
            raise self.fail(f"kernel {tuple(self.kernel)} does not fit the padded input "
                            f"{shape[2:]} (pad {self.pad}): output size would be {out}")
        self.out_shape = out
        top_shape = shape[:2] + out
        for blob in top:
            blob.reshape(top_shape)
        xp, dtype = bottom[0].xp, bottom[0].dtype
        # A kernel wider than the padded input pools the same cells as one just as wide
        # (Caffe clips every window to the padded extent): the loops then stay that small.
        kernel = tuple(min(k, size + 2 * p) for k, size, p in
                       zip(self.kernel, shape[2:], self.pad))
        self.pool.configure(xp, dtype, shape, kernel, self.stride, self.pad, out)
        if getattr(self, "_choice_key", None) != (xp, top_shape):
            self._choice_key = (xp, top_shape)
            self.choice = xp.empty(top_shape, dtype=self.pool.index_dtype())

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x, y = bottom[0].data, top[0].data
        if self.method == _P.MAX:
            self.pool.max_forward(x, y, self.choice)
            if len(top) > 1:
                self.pool.top_mask(self.choice, top[1].data)
        elif self.method == _P.AVE:
            self.pool.window_sums(x, y)
            y *= self.pool.inverse_divisor()
        elif self.phase == caffe_pb2.TRAIN:
            uniform = backend.random_uniform(bottom[0].xp, y.shape, y.dtype)
            self.pool.sample_forward(x, y, self.choice, uniform)
        else:
            xp = bottom[0].xp
            total = xp.empty_like(y)
            self.pool.window_sums(x, total)
            self.pool.window_sums(x, y, square=True)
            y /= total + _FLT_MIN

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.method == _P.AVE:
            self.pool.spread_backward(dy * self.pool.inverse_divisor(), dx)
        elif self.method == _P.STOCHASTIC and self.phase != caffe_pb2.TRAIN:
            raise self.fail("STOCHASTIC pooling back-propagates only in the TRAIN phase "
                            "(its TEST output Σx²/Σx has no backward in Caffe)")
        else:
            self.pool.route_backward(dy, self.choice, dx)


@register
class SPP(Layer):
    """Spatial pyramid pooling: levels l = 0..pyramid_height−1 pool into 2^l × 2^l bins.

    Level l uses kernel ceil(H / 2^l), stride = kernel, pad = (kernel·2^l − H + 1) // 2 (the
    same rule for W); each level's output is flattened to (N, C·bins) and the levels are
    concatenated along axis 1. With pyramid_height 1 the top is the single pooling's 4-D output.
    The pooling parameters are recomputed whenever H or W changes.
    """

    type = "SPP"
    exact_bottoms = 1
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.layer_param.spp_param
        if not p.HasField("pyramid_height") or p.pyramid_height <= 0:
            raise self.fail("spp_param.pyramid_height must be given and positive")
        self.height = p.pyramid_height
        self._size = None

    def _build(self, bottom: list[Blob]) -> None:
        height, width = bottom[0].shape[2:]
        self.levels = []
        for level in range(self.height):
            bins = 2 ** level
            kh, kw = -(-height // bins), -(-width // bins)
            param = caffe_pb2.LayerParameter(name=f"{self.name}_level{level}", type="Pooling",
                                             phase=self.phase)
            pp = param.pooling_param
            pp.pool = self.layer_param.spp_param.pool  # same enum numbers as PoolingParameter
            pp.kernel_h, pp.kernel_w, pp.stride_h, pp.stride_w = kh, kw, kh, kw
            pp.pad_h, pp.pad_w = (kh * bins - height + 1) // 2, (kw * bins - width + 1) // 2
            layer = Pooling(param)
            out = Blob((), dtype=bottom[0].dtype, xp=bottom[0].xp)
            try:
                layer.setup(bottom, [out])
            except Exception as err:  # a LayerError naming the inner level: name ours
                raise self.fail(f"pyramid level {level} ({bins}x{bins} bins) cannot pool a "
                                f"{height}x{width} input: {err}") from None
            self.levels.append((layer, out))
        self._size = (height, width)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.fail(f"input must have 4 axes (num, channels, height, width), got shape "
                            f"{shape}")
        if self._size != shape[2:]:
            self._build(bottom)
        for layer, out in self.levels:
            layer.reshape(bottom, [out])
        if self.height == 1:
            top[0].reshape(self.levels[0][1].shape)
        else:
            top[0].reshape((shape[0], sum(out.count // shape[0] for _, out in self.levels)))

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        n, start = bottom[0].shape[0], 0
        y = top[0].data.reshape(n, -1)
        for layer, out in self.levels:
            layer.compute_forward(bottom, [out])
            width = out.count // n
            y[:, start:start + width] = out.data.reshape(n, width)
            start += width

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        n, start = bottom[0].shape[0], 0
        dy = top[0].diff.reshape(n, -1)
        total = None
        for layer, out in self.levels:  # each level overwrites the bottom diff: sum them
            width = out.count // n
            out.diff[...] = dy[:, start:start + width].reshape(out.shape)
            start += width
            layer.compute_backward([out], [True], bottom)
            if len(self.levels) > 1:
                total = bottom[0].diff.copy() if total is None else total + bottom[0].diff
        if total is not None:
            bottom[0].diff[...] = total
