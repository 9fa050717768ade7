"""Neuron (activation) layers: one bottom, one top of the same shape, element by element.

All of them may run in place (top is bottom). A layer whose derivative needs the input copies
it during an in-place forward; the others read the derivative off the output (Sigmoid, TanH,
Exp, Swish) or off its sign (ReLU with slope >= 0, ELU with alpha >= 0), which the output
shares with the input, so no copy is made.
"""
from __future__ import annotations

import math

from netengine import backend
from netengine.blob import Blob
from netengine.layers.base import NeuronLayer, register
from netengine.proto import caffe_pb2


def _sigmoid(xp, x):
    """1 / (1 + e^-x) without overflow, and accurate for large negative x.

    Caffe's Sigmoid uses 0.5·tanh(0.5·x) + 0.5, which rounds values below ~1e-17 to 0; this
    form keeps them (e^x / (1 + e^x) for x < 0) and is otherwise the same to rounding.
    """
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1, e) / (1 + e)


class _Elementwise(NeuronLayer):
    """Shared plumbing: ``y = function(x)``, ``dx = gradient(x, y, dy)``.

    ``saves_input``: the derivative needs the input itself, so an in-place forward keeps a copy
    of it (the top overwrites the bottom). When false, ``gradient`` gets whatever the blob
    holds at backward time (the output, in place) and must only use what x and y share.
    """

    saves_input = True

    @property
    def backward_reads_output(self) -> bool:  # in place, the blob then holds only the output
        return not self.saves_input

    def function(self, xp, x):
        raise NotImplementedError

    def gradient(self, xp, x, y, dy):
        raise NotImplementedError

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        in_place = top[0] is bottom[0]
        self._saved_input = x.copy() if in_place and self.saves_input else None
        top[0].data[...] = self.function(bottom[0].xp, x)

    def compute_backward(self, top: list[Blob], propagate_down: list[bool],
                         bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        saved = getattr(self, "_saved_input", None)
        x = saved if saved is not None and top[0] is bottom[0] else bottom[0].data
        bottom[0].diff[...] = self.gradient(bottom[0].xp, x, top[0].data, top[0].diff)


@register
class ReLU(_Elementwise):
    """y = max(x, 0) + negative_slope·min(x, 0);  dy/dx = 1 for x > 0, negative_slope for x <= 0.

    Caffe takes the slope branch at x = 0 (the derivative there is negative_slope, 0 by
    default). With a negative slope the output's sign no longer tells the branch, so an
    in-place run then keeps a copy of the input.
    """

    type = "ReLU"

    def layer_setup(self, bottom, top) -> None:
        self.slope = self.layer_param.relu_param.negative_slope
        self.saves_input = self.slope < 0

    def function(self, xp, x):
        if self.slope == 0:
            return xp.maximum(x, 0)
        return xp.where(x > 0, x, self.slope * x)

    def gradient(self, xp, x, y, dy):
        return xp.where(x > 0, dy, self.slope * dy)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        if self.slope != 0:
            return super().compute_forward(bottom, top)
        # slope 0: one pass straight into the top (in place: over the bottom), no temporary
        bottom[0].xp.maximum(bottom[0].data, 0, out=top[0].data)

    def compute_backward(self, top: list[Blob], propagate_down: list[bool],
                         bottom: list[Blob]) -> None:
        if self.slope != 0:
            return super().compute_backward(top, propagate_down, bottom)
        if propagate_down[0]:  # dy where x > 0 (the sign the output shares), else 0
            xp = bottom[0].xp
            xp.multiply(top[0].diff, bottom[0].data > 0, out=bottom[0].diff)


@register
class Sigmoid(_Elementwise):
    """y = 1 / (1 + e^-x);  dy/dx = y·(1 − y) (read off the output, as in Caffe)."""

    type = "Sigmoid"
    saves_input = False

    def function(self, xp, x):
        return _sigmoid(xp, x)

    def gradient(self, xp, x, y, dy):
        return dy * y * (1 - y)


@register
class TanH(_Elementwise):
    """y = tanh(x);  dy/dx = 1 − y²."""

    type = "TanH"
    saves_input = False

    def function(self, xp, x):
        return xp.tanh(x)

    def gradient(self, xp, x, y, dy):
        return dy * (1 - y * y)


@register
class AbsVal(_Elementwise):
    """y = |x|;  dy/dx = sign(x) (0 at x = 0, as Caffe's sign)."""

    type = "AbsVal"

    def function(self, xp, x):
        return xp.abs(x)

    def gradient(self, xp, x, y, dy):
        return dy * xp.sign(x)


@register
class BNLL(_Elementwise):
    """Binomial normal log likelihood, softplus: y = log(1 + e^x);  dy/dx = sigmoid(x).

    Computed without overflow as max(x, 0) + log(1 + e^-|x|), the same value as Caffe's
    ``x > 0 ? x + log(1 + e^-x) : log(1 + e^x)``.
    """

    type = "BNLL"

    def function(self, xp, x):
        return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))

    def gradient(self, xp, x, y, dy):
        return dy * _sigmoid(xp, x)


@register
class Power(_Elementwise):
    """y = (shift + scale·x)^power;  dy/dx = power·scale·(shift + scale·x)^(power − 1).

    Caffe's special cases: when power·scale is 0 (power 0 or scale 0) the output is the
    constant 1 (power 0) or shift^power, and the gradient is 0; when power is 1 the output is
    shift + scale·x and the gradient the constant scale. Caffe evaluates the general gradient
    as power·scale·y / (shift + scale·x), which is 0/0 = NaN where shift + scale·x = 0; here it
    is computed directly, which agrees everywhere else.
    """

    type = "Power"
    rewrites_in_place = True

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.power_param
        self.power, self.scale, self.shift = param.power, param.scale, param.shift
        self.diff_scale = self.power * self.scale
        self.saves_input = not (self.diff_scale == 0 or self.power == 1)

    def function(self, xp, x):
        if self.diff_scale == 0:
            if self.power == 0:
                return xp.ones_like(x)
            return xp.power(xp.full_like(x, self.shift), self.power)
        base = self.scale * x + self.shift
        return base if self.power == 1 else xp.power(base, self.power)

    def gradient(self, xp, x, y, dy):
        if self.diff_scale == 0 or self.power == 1:
            return self.diff_scale * dy
        if self.power == 2:
            return dy * (self.diff_scale * (self.scale * x + self.shift))
        return dy * (self.diff_scale * xp.power(self.scale * x + self.shift, self.power - 1))


def _log_of_base(layer, base: float) -> float:
    """ln(base), with Caffe's base −1 meaning e; other bases must be positive."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise layer.fail(f"base must be strictly positive, or -1 for e; got {base}")
    return math.log(base)


@register
class Exp(_Elementwise):
    """y = base^(shift + scale·x) (base −1 means e);  dy/dx = y·scale·ln(base).

    Evaluated as base^shift · e^(scale·ln(base)·x), as Caffe does.
    """

    type = "Exp"
    saves_input = False

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.exp_param
        log_base = _log_of_base(self, param.base)
        self.inner_scale = log_base * param.scale
        self.outer_scale = 1.0 if param.shift == 0 else math.exp(log_base * param.shift)

    def function(self, xp, x):
        y = xp.exp(self.inner_scale * x)
        return y if self.outer_scale == 1 else self.outer_scale * y

    def gradient(self, xp, x, y, dy):
        return dy * (self.inner_scale * y)


@register
class Log(_Elementwise):
    """y = log_base(shift + scale·x) (base −1 means e).

    dy/dx = scale / (ln(base)·(shift + scale·x)); base must be positive or −1.
    """

    type = "Log"

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.log_param
        self.log_base = _log_of_base(self, param.base)
        self.scale, self.shift = param.scale, param.shift

    def function(self, xp, x):
        y = xp.log(self.scale * x + self.shift)
        return y if self.log_base == 1 else y / self.log_base

    def gradient(self, xp, x, y, dy):
        return dy * (self.scale / self.log_base) / (self.scale * x + self.shift)


@register
class ELU(_Elementwise):
    """y = x for x > 0, alpha·(e^x − 1) otherwise;  dy/dx = 1 for x > 0, alpha + y otherwise.

    As in Caffe the x <= 0 derivative is read off the output (alpha + y = alpha·e^x).
    """

    type = "ELU"

    def layer_setup(self, bottom, top) -> None:
        self.alpha = self.layer_param.elu_param.alpha
        self.saves_input = self.alpha < 0

    def function(self, xp, x):
        return xp.where(x > 0, x, self.alpha * xp.expm1(xp.minimum(x, 0)))

    def gradient(self, xp, x, y, dy):
        return xp.where(x > 0, dy, dy * (self.alpha + y))


@register
class Swish(_Elementwise):
    """y = x·sigmoid(beta·x);  dy/dx = beta·y + sigmoid(beta·x)·(1 − beta·y).

    The sigmoid is kept from forward (as Caffe's inner Sigmoid layer keeps its output), so the
    input itself is not needed in backward.
    """

    type = "Swish"
    saves_input = False

    def layer_setup(self, bottom, top) -> None:
        self.beta = self.layer_param.swish_param.beta

    def function(self, xp, x):
        self._sigmoid_out = _sigmoid(xp, self.beta * x)
        return x * self._sigmoid_out

    def gradient(self, xp, x, y, dy):
        s = self._sigmoid_out
        return dy * (self.beta * y + s * (1 - self.beta * y))


@register
class Clip(_Elementwise):
    """y = max(min, min(x, max));  dy/dx = 1 where min <= x <= max (both ends included), else 0.

    clip_param's min and max are required; min > max is refused (Caffe would output min).
    """

    type = "Clip"

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.clip_param
        missing = [f for f in ("min", "max") if not param.HasField(f)]
        if missing:
            raise self.fail(f"clip_param needs both min and max; missing {' and '.join(missing)}")
        if param.min > param.max:
            raise self.fail(f"clip_param min must not exceed max; got min {param.min} "
                            f"> max {param.max}")
        self.low, self.high = param.min, param.max

    def function(self, xp, x):
        return xp.clip(x, self.low, self.high)

    def gradient(self, xp, x, y, dy):
        return xp.where((x >= self.low) & (x <= self.high), dy, 0)


@register
class Threshold(NeuronLayer):
    """y = 1 if x > threshold else 0. No gradient: Caffe's backward is not implemented.

    A net may still force backward through it; the bottom is then left out (like a label).
    """

    type = "Threshold"

    def layer_setup(self, bottom, top) -> None:
        self.threshold = self.layer_param.threshold_param.threshold

    def compute_forward(self, bottom, top) -> None:
        x = bottom[0].data
        top[0].data[...] = (x > self.threshold).astype(x.dtype)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[0]:
            raise self.fail("has no gradient (a step function): it cannot back-propagate "
                            "to its bottom")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False


@register
class Dropout(NeuronLayer):
    """TRAIN: y = x·mask/(1 − p), mask ~ Bernoulli(1 − p) per element; TEST: y = x.

    Caffe's "inverted" dropout (p = dropout_ratio): each element is kept with probability
    1 − p and scaled so that the expectation is unchanged; backward applies the same mask and
    scale in TRAIN and is the identity in TEST. The phase is the layer's at call time. The
    mask is drawn from netengine's random stream (U[0,1) >= p), so it cannot equal Caffe's.
    """

    type = "Dropout"

    def layer_setup(self, bottom, top) -> None:
        self.ratio = self.layer_param.dropout_param.dropout_ratio
        if not 0 <= self.ratio < 1:
            raise self.fail(f"dropout_ratio must be in [0, 1); got {self.ratio}")
        self.scale = 1.0 / (1.0 - self.ratio)
        self.mask = None

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        if self.phase != caffe_pb2.TRAIN:
            if top[0] is not bottom[0]:
                top[0].data[...] = x
            return
        uniform = backend.random_uniform(bottom[0].xp, x.shape, x.dtype)
        self.mask = uniform >= self.ratio
        top[0].data[...] = x * self.mask * self.scale

    def compute_backward(self, top: list[Blob], propagate_down: list[bool],
                         bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy = top[0].diff
        if self.phase != caffe_pb2.TRAIN:
            if top[0] is not bottom[0]:
                bottom[0].diff[...] = dy
            return
        if self.mask is None or self.mask.shape != dy.shape:
            raise self.fail("backward in TRAIN phase needs the mask of a forward pass of "
                            f"the same shape {dy.shape}")
        bottom[0].diff[...] = dy * self.mask * self.scale


@register
class PReLU(NeuronLayer):
    """y = max(x, 0) + a_c·min(x, 0), with a learned slope a_c per channel (axis 1).

    dy/dx = 1 for x > 0, a_c for x <= 0; da_c accumulates Σ dy·x over the x <= 0 elements of
    channel c. channel_shared: one slope for all channels, kept (as in Caffe) in a 0-axis blob
    of shape (); otherwise a blob of shape (C,). The slopes are filled by prelu_param.filler,
    or constant 0.25 when none is given. The bottom needs at least 2 axes. An in-place run
    keeps a copy of the input for backward.
    """

    type = "PReLU"

    def _check_axes(self, bottom) -> None:
        if bottom[0].num_axes < 2:
            raise self.fail(f"the bottom needs at least 2 axes (N, C, ...); got shape "
                            f"{bottom[0].shape}")

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.prelu_param
        self._check_axes(bottom)
        self.shared = param.channel_shared
        shape = () if self.shared else (bottom[0].shape[1],)
        if self.has_given_blobs(1):
            if self.blobs[0].count != (1 if self.shared else shape[0]):
                raise self.fail(f"slope blob has shape {self.blobs[0].shape}, expected "
                                f"{shape or '()'} for channel_shared {self.shared}")
            return
        if param.HasField("filler"):
            filler = param.filler
        else:
            filler = caffe_pb2.FillerParameter(type="constant", value=0.25)
        self.blobs = [self.make_blob(shape, filler, like=bottom[0])]

    def reshape(self, bottom, top) -> None:
        self._check_axes(bottom)
        if not self.shared and bottom[0].shape[1] != self.blobs[0].count:
            raise self.fail(f"the bottom has {bottom[0].shape[1]} channels, the slope blob "
                            f"{self.blobs[0].count}")
        super().reshape(bottom, top)

    def _slope(self, ndim: int):
        slope = self.blobs[0].data
        if self.shared:
            return slope.reshape(())
        return slope.reshape((1, -1) + (1,) * (ndim - 2))

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        self._saved_input = x.copy() if top[0] is bottom[0] else None
        top[0].data[...] = bottom[0].xp.where(x > 0, x, x * self._slope(x.ndim))

    def compute_backward(self, top: list[Blob], propagate_down: list[bool],
                         bottom: list[Blob]) -> None:
        xp = bottom[0].xp
        saved = getattr(self, "_saved_input", None)
        x = saved if saved is not None and top[0] is bottom[0] else bottom[0].data
        dy = top[0].diff
        # The slope gradient first: in place, dy and the bottom diff are the same array.
        if self.param_propagate_down[0]:
            contrib = xp.where(x > 0, 0, dy * x)
            if self.shared:
                self.blobs[0].diff[...] += contrib.sum()
            else:
                axes = (0,) + tuple(range(2, x.ndim))
                self.blobs[0].diff[...] += contrib.sum(axis=axes).reshape(self.blobs[0].shape)
        if propagate_down[0]:
            bottom[0].diff[...] = xp.where(x > 0, dy, dy * self._slope(x.ndim))
