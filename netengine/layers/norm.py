"""Normalisation and affine layers: BatchNorm, Scale, Bias, LRN, MVN.

Scale and Bias broadcast an operand (a learned blob or a second bottom) over bottom 0: the
operand covers the axes [axis, axis + operand.num_axes) and is repeated over the axes before
("outer") and after ("inner"), so both layers compute on an (outer, dim, inner) view.
"""
from __future__ import annotations

from netengine.blob import Blob
from netengine.layers.base import Layer, register
from netengine.proto import caffe_pb2


def _axis(layer: Layer, blob: Blob, axis: int, field: str) -> int:
    """Caffe's CanonicalAxisIndex with a layer error instead of an IndexError."""
    try:
        return blob.canonical_axis(axis)
    except IndexError:
        raise layer.fail(f"{field} {axis} is out of range for a bottom of shape "
                         f"{blob.shape}") from None


def _learned_shape(layer: Layer, bottom: Blob, param, field: str) -> tuple[int, ...]:
    """Shape of a learned Scale/Bias operand: bottom.shape[axis : axis + num_axes]."""
    axis = _axis(layer, bottom, param.axis, f"{field}.axis")
    if param.num_axes < -1:
        raise layer.fail(f"{field}.num_axes must be >= 0, or -1 for all remaining axes; "
                         f"got {param.num_axes}")
    if param.num_axes == -1:
        return bottom.shape[axis:]
    if axis + param.num_axes > bottom.num_axes:
        raise layer.fail(f"{field}: axis {axis} + num_axes {param.num_axes} exceeds the "
                         f"{bottom.num_axes} axes of bottom {bottom.shape}")
    return bottom.shape[axis:axis + param.num_axes]


def _broadcast_dims(layer: Layer, bottom: Blob, operand: Blob, axis: int,
                    field: str) -> tuple[int, int, int]:
    """(outer, dim, inner) for applying ``operand`` to ``bottom`` from ``axis`` on.

    A scalar operand (0 axes) ignores ``axis`` (Caffe uses axis 0 then).
    """
    k = operand.num_axes
    start = 0 if k == 0 else _axis(layer, bottom, axis, f"{field}.axis")
    if bottom.shape[start:start + k] != operand.shape:
        raise layer.fail(f"operand of shape {operand.shape} must match the axes {start}.."
                         f"{start + k - 1} of bottom {bottom.shape}")
    return bottom.count_range(0, start), operand.count, bottom.count_range(start + k)


@register
class BatchNorm(Layer):
    """y = (x − mean) / sqrt(var + eps), per channel (axis 1) over N and all spatial positions.

    No affine part (follow it with Scale bias_term: true). Three blobs: S0 (C) mean sum,
    S1 (C) variance sum, S2 (1) scale factor. ``use_global_stats`` unset means phase == TEST,
    decided once at setup. TRAIN with batch statistics normalises with the batch mean and the
    BIASED batch variance σ², then updates S2 = λ·S2 + 1, S0 = λ·S0 + μ and
    S1 = λ·S1 + m/(m−1)·σ² (m = N·spatial; factor 1 when m == 1). Global statistics use
    mean = S0/S2, var = S1/S2 (both 0 when S2 == 0). The blobs get lr_mult 0 forced (a
    non-zero lr_mult is refused) and never receive gradients. Backward:
    global dx = dy/sqrt(var+eps); batch dx = (dy − mean(dy) − mean(dy·x̂)·x̂)/sqrt(var+eps).
    x̂ and 1/sqrt(var+eps) are cached so the layer works in place.
    """

    type = "BatchNorm"
    rewrites_in_place = True
    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.batch_norm_param
        self.use_global_stats = (param.use_global_stats if param.HasField("use_global_stats")
                                 else self.phase == caffe_pb2.TEST)
        if bottom[0].num_axes < 1:
            raise self.fail("needs a bottom with at least 1 axis (N, C, ...), got a scalar")
        channels = self._channels(bottom[0])
        if not self.has_given_blobs(3):
            self.blobs = [self.make_blob((channels,)), self.make_blob((channels,)),
                          self.make_blob((1,))]
        specs = self.layer_param.param
        for i in range(3):
            if len(specs) == i:
                spec = specs.add()
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
            elif specs[i].lr_mult != 0:
                raise self.fail(f"the statistics blobs cannot be learned: param {i} has lr_mult "
                                f"{specs[i].lr_mult:g}, expected 0 (or no param block)")
        self.param_propagate_down = [False, False, False]

    @staticmethod
    def _channels(blob: Blob) -> int:
        return 1 if blob.num_axes == 1 else blob.shape[1]

    def reshape(self, bottom, top) -> None:
        if bottom[0].num_axes < 1:
            raise self.fail("needs a bottom with at least 1 axis (N, C, ...), got a scalar")
        channels = self._channels(bottom[0])
        if channels != self.blobs[0].count:
            raise self.fail(f"bottom {bottom[0].shape} has {channels} channels, the statistics "
                            f"blobs have {self.blobs[0].count}")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def compute_forward(self, bottom, top) -> None:
        xp = bottom[0].xp
        param = self.layer_param.batch_norm_param
        x = bottom[0].data.reshape(bottom[0].shape[0], self.blobs[0].count, -1)
        if self.use_global_stats:
            s2 = self.blobs[2].data.reshape(())
            factor = (s2 != 0) / xp.where(s2 == 0, 1, s2)
            mean = self.blobs[0].data.reshape(-1) * factor
            var = self.blobs[1].data.reshape(-1) * factor
        else:
            mean = x.mean(axis=(0, 2))
            var = ((x - mean[:, None]) ** 2).mean(axis=(0, 2))
            m = x.shape[0] * x.shape[2]
            correction = m / (m - 1) if m > 1 else 1.0
            lam = param.moving_average_fraction
            self.blobs[2].data[...] = lam * self.blobs[2].data + 1
            self.blobs[0].data[...] = (lam * self.blobs[0].data.reshape(-1)
                                       + mean).reshape(self.blobs[0].shape)
            self.blobs[1].data[...] = (lam * self.blobs[1].data.reshape(-1)
                                       + correction * var).reshape(self.blobs[1].shape)
        self._inv_std = (1 / xp.sqrt(var + param.eps))[:, None]
        self._x_hat = (x - mean[:, None]) * self._inv_std
        top[0].data[...] = self._x_hat.reshape(top[0].shape)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(self._x_hat.shape)
        if self.use_global_stats:
            dx = dy * self._inv_std
        else:
            x_hat = self._x_hat
            mean_dy = dy.mean(axis=(0, 2), keepdims=True)
            mean_dy_xhat = (dy * x_hat).mean(axis=(0, 2), keepdims=True)
            dx = (dy - mean_dy - mean_dy_xhat * x_hat) * self._inv_std
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)


@register
class Scale(Layer):
    """y = x · s (+ b), s broadcast over bottom 0 from ``axis`` on.

    s is bottom 1 (its shape gives the covered axes; a 0-axis bottom is a scalar) or a learned
    blob of shape bottom.shape[axis : axis+num_axes] (num_axes −1: all remaining, 0: scalar),
    filled with constant 1 when scale_param has no filler (Caffe's rule). ``bias_term`` adds a
    learned b of the same shape (bias_filler), stored after s (or first, with two bottoms).
    Gradients: dx = dy·s; ds = Σ_{outer, inner} dy·x; db = Σ dy. In place, x is cached.
    """

    type = "Scale"
    rewrites_in_place = True
    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.scale_param
        learned_scale = len(bottom) == 1
        if self.has_given_blobs(int(learned_scale) + int(param.bias_term)):
            return
        scale_shape = (_learned_shape(self, bottom[0], param, "scale_param") if learned_scale
                       else bottom[1].shape)
        if learned_scale:
            filler = param.filler
            if not param.HasField("filler"):
                filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
            self.blobs.append(self.make_blob(scale_shape, filler))
        if param.bias_term:
            self.blobs.append(self.make_blob(scale_shape, param.bias_filler))

    def _scale(self, bottom) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top) -> None:
        param = self.layer_param.scale_param
        self._dims = _broadcast_dims(self, bottom[0], self._scale(bottom), param.axis,
                                     "scale_param")
        if param.bias_term:
            bias = self.blobs[-1]
            if bias.count != self._dims[1]:
                raise self.fail(f"the bias blob has shape {bias.shape}, the scale covers "
                                f"{self._dims[1]} values")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def compute_forward(self, bottom, top) -> None:
        outer, dim, inner = self._dims
        x = bottom[0].data.reshape(outer, dim, inner)
        self._x_cache = x.copy() if top[0] is bottom[0] else None
        y = top[0].data.reshape(outer, dim, inner)
        bottom[0].xp.multiply(x, self._scale(bottom).data.reshape(1, dim, 1), out=y)
        if self.layer_param.scale_param.bias_term:
            y += self.blobs[-1].data.reshape(1, dim, 1)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        outer, dim, inner = self._dims
        dy = top[0].diff.reshape(outer, dim, inner)
        nblobs = len(self.blobs)
        if self.layer_param.scale_param.bias_term and self.param_propagate_down[nblobs - 1]:
            self.blobs[-1].diff[...] += dy.sum(axis=(0, 2)).reshape(self.blobs[-1].shape)
        learned = len(bottom) == 1
        if (self.param_propagate_down[0] if learned else propagate_down[1]):
            x = self._x_cache if self._x_cache is not None else bottom[0].data.reshape(dy.shape)
            grad = (dy * x).sum(axis=(0, 2)).reshape(self._scale(bottom).shape)
            if learned:
                self.blobs[0].diff[...] += grad
            else:
                bottom[1].diff[...] = grad
        if propagate_down[0]:
            dx = dy * self._scale(bottom).data.reshape(1, dim, 1)
            bottom[0].diff[...] = dx.reshape(bottom[0].shape)


@register
class Bias(Layer):
    """y = x + b, b broadcast over bottom 0 from ``axis`` on (same rules as Scale).

    b is bottom 1 or a learned blob of shape bottom.shape[axis : axis+num_axes] filled by
    bias_param.filler (default constant 0). Gradients: dx = dy; db = Σ_{outer, inner} dy.
    """

    type = "Bias"
    rewrites_in_place = True
    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.bias_param
        if len(bottom) == 1 and not self.has_given_blobs(1):
            shape = _learned_shape(self, bottom[0], param, "bias_param")
            self.blobs = [self.make_blob(shape, param.filler)]

    def _bias(self, bottom) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top) -> None:
        self._dims = _broadcast_dims(self, bottom[0], self._bias(bottom),
                                     self.layer_param.bias_param.axis, "bias_param")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def compute_forward(self, bottom, top) -> None:
        outer, dim, inner = self._dims
        y = top[0].data.reshape(outer, dim, inner)
        bottom[0].xp.add(bottom[0].data.reshape(outer, dim, inner),
                         self._bias(bottom).data.reshape(1, dim, 1), out=y)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        outer, dim, inner = self._dims
        dy = top[0].diff.reshape(outer, dim, inner)
        learned = len(bottom) == 1
        if (self.param_propagate_down[0] if learned else propagate_down[1]):
            grad = dy.sum(axis=(0, 2)).reshape(self._bias(bottom).shape)
            if learned:
                self.blobs[0].diff[...] += grad
            else:
                bottom[1].diff[...] = grad
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].diff[...] = top[0].diff


def _window_sum(xp, a, size: int, axes: tuple[int, ...]):
    """Sum of ``a`` over a centred, zero-padded window of ``size`` (odd) along each of ``axes``."""
    pad = (size - 1) // 2
    for axis in axes:
        n = a.shape[axis]
        padded_shape = list(a.shape)
        padded_shape[axis] += 2 * pad
        padded = xp.zeros(padded_shape, dtype=a.dtype)
        index = [slice(None)] * a.ndim
        index[axis] = slice(pad, pad + n)
        padded[tuple(index)] = a
        total = xp.zeros_like(a)
        for offset in range(size):
            index[axis] = slice(offset, offset + n)
            total += padded[tuple(index)]
        a = total
    return a


@register
class LRN(Layer):
    """Local response normalisation of 4-D (N, C, H, W) input: y = x · scale^−β.

    ACROSS_CHANNELS: scale = k + α/n · Σ x² over the n channels centred on c (zero-padded,
    always divided by n). WITHIN_CHANNEL: scale = 1 + α/n² · Σ x² over the n×n window centred
    on (h, w) (zero-padded; Caffe builds it from AVE pooling, so the divisor is always n² and
    **k is ignored**). n (local_size) must be odd. Backward, with W the same window sum and
    c = 2αβ/n (across) or 2αβ/n² (within): dx = dy·scale^−β − c·x·W(dy·y/scale).
    """

    type = "LRN"
    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top) -> None:
        size = self.layer_param.lrn_param.local_size
        if size % 2 == 0:
            raise self.fail(f"lrn_param.local_size must be odd, got {size}")

    def reshape(self, bottom, top) -> None:
        if bottom[0].num_axes != 4:
            raise self.fail(f"needs a 4-D bottom (N, C, H, W), got shape {bottom[0].shape}")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def _window(self):
        """(window axes, α divided by the window area, shift k)."""
        param = self.layer_param.lrn_param
        n = param.local_size
        if param.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
            return (1,), param.alpha / n, param.k
        return (2, 3), param.alpha / (n * n), 1.0

    def compute_forward(self, bottom, top) -> None:
        xp = bottom[0].xp
        param = self.layer_param.lrn_param
        axes, alpha, shift = self._window()
        x = bottom[0].data
        self._x = x.copy() if top[0] is bottom[0] else None
        self._scale = shift + alpha * _window_sum(xp, x * x, param.local_size, axes)
        self._scale_pow = self._scale ** -param.beta
        top[0].data[...] = x * self._scale_pow

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        param = self.layer_param.lrn_param
        axes, alpha, _ = self._window()
        x = self._x if self._x is not None else bottom[0].data
        dy = top[0].diff
        ratio = dy * x * self._scale_pow / self._scale
        back = _window_sum(xp, ratio, param.local_size, axes)
        bottom[0].diff[...] = dy * self._scale_pow - (2 * alpha * param.beta) * x * back


@register
class MVN(Layer):
    """Mean-variance normalisation per sample and channel (per sample if across_channels).

    y = x − mean; with normalize_variance y = (x − mean)/(std + eps), std the biased standard
    deviation and eps added to the std, not the variance. Backward (Caffe's formula, which
    treats std + eps as std in the variance term): dx = (dy − mean(dy) − y·mean(dy·y))/(std+eps),
    or dx = dy − mean(dy) without variance normalisation.
    """

    type = "MVN"
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom, top) -> None:
        if bottom[0].num_axes < 1:
            raise self.fail("needs a bottom with at least 1 axis (N, ...), got a scalar")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def _groups(self, blob: Blob) -> int:
        if self.layer_param.mvn_param.across_channels:
            return blob.shape[0]
        return blob.count_range(0, 2)

    def compute_forward(self, bottom, top) -> None:
        xp = bottom[0].xp
        param = self.layer_param.mvn_param
        x = bottom[0].data.reshape(self._groups(bottom[0]), -1)
        y = x - x.mean(axis=1, keepdims=True)
        if param.normalize_variance:
            self._denom = xp.sqrt((y * y).mean(axis=1, keepdims=True)) + param.eps
            y /= self._denom
            self._y = y
        top[0].data[...] = y.reshape(top[0].shape)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(self._groups(bottom[0]), -1)
        dx = dy - dy.mean(axis=1, keepdims=True)
        if self.layer_param.mvn_param.normalize_variance:
            dx -= self._y * (dy * self._y).mean(axis=1, keepdims=True)
            dx /= self._denom
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)
