"""Reducing layers: Reduction (sum-like over the trailing axes) and ArgMax (top-k indices)."""
from __future__ import annotations

from netengine.blob import Blob
from netengine.layers.base import Layer, register
from netengine.proto import caffe_pb2

_OP = caffe_pb2.ReductionParameter


@register
class Reduction(Layer):
    """top[i] = coeff · Σ_j op(x[i, j]) over all axes from ``axis`` on (i: the leading axes).

    op: SUM x, ASUM |x|, SUMSQ x², MEAN x with coeff divided by the reduced count. The top has
    the bottom's leading axes, shape[:axis]; the default axis 0 gives a 0-axis (scalar) top.
    Unlike most Caffe axis parameters, this axis reduces *every* trailing axis, not one.
    Gradients: SUM/MEAN coeff·dy, ASUM coeff·dy·sign(x) (0 at x = 0), SUMSQ 2·coeff·dy·x.
    """

    type = "Reduction"
    exact_bottoms = 1
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom, top) -> None:
        self.op = self.layer_param.reduction_param.operation

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if top[0] is bottom[0]:
            raise self.fail("does not allow in-place computation (the top has fewer axes)")
        param = self.layer_param.reduction_param
        try:
            self.axis = bottom[0].canonical_axis(param.axis)
        except IndexError:
            raise self.fail(f"reduction_param axis {param.axis} is out of range for a bottom "
                            f"of shape {bottom[0].shape}") from None
        self.num = bottom[0].count_range(0, self.axis)
        self.dim = bottom[0].count_range(self.axis)
        self.coeff = param.coeff
        if self.op == _OP.MEAN:
            if self.dim == 0:
                raise self.fail(f"MEAN over an empty range (bottom shape {bottom[0].shape})")
            self.coeff = param.coeff / self.dim
        top[0].reshape(bottom[0].shape[:self.axis])

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op == _OP.ASUM:
            x = xp.abs(x)
        elif self.op == _OP.SUMSQ:
            x = x * x
        top[0].data[...] = (x.sum(axis=1) * self.coeff).reshape(top[0].shape)

    def compute_backward(self, top: list[Blob], propagate_down: list[bool],
                         bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        scale = top[0].diff.reshape(self.num, 1) * self.coeff
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op == _OP.ASUM:
            grad = scale * xp.sign(x)
        elif self.op == _OP.SUMSQ:
            grad = (2 * scale) * x
        else:
            grad = xp.broadcast_to(scale, (self.num, self.dim))
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register
class ArgMax(Layer):
    """Indices (and optionally values) of the top_k largest entries; no gradient.

    - axis unset: per item over the flattened non-batch axes; top shape (N, 1, top_k) padded
      with 1s to the bottom's number of axes (at least 3); with out_max_val the second axis is
      2: [:, 0] the indices, [:, 1] the values.
    - axis set: along that axis, which the top replaces by top_k; with out_max_val the top
      holds the values only.
    Indices are written as floats in the bottom's dtype. Caffe orders by (value, index)
    descending, so among equal values the **higher index wins**. ArgMax cannot back-propagate;
    force_backward leaves its bottom out.
    """

    type = "ArgMax"
    exact_bottoms = 1
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.argmax_param
        self.top_k = param.top_k
        self.out_max_val = param.out_max_val
        self.has_axis = param.HasField("axis")
        if self.top_k < 1:
            raise self.fail(f"argmax_param top_k must be at least 1; got {self.top_k}")

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if top[0] is bottom[0]:
            raise self.fail("does not allow in-place computation")
        shape = bottom[0].shape
        if self.has_axis:
            axis = self.layer_param.argmax_param.axis
            try:
                self.axis = bottom[0].canonical_axis(axis)
            except IndexError:
                raise self.fail(f"argmax_param axis {axis} is out of range for a bottom of "
                                f"shape {shape}") from None
            if self.top_k > shape[self.axis]:
                raise self.fail(f"top_k {self.top_k} exceeds the size {shape[self.axis]} of "
                                f"axis {self.axis} (bottom shape {shape})")
            top_shape = shape[:self.axis] + (self.top_k,) + shape[self.axis + 1:]
        else:
            if not shape:
                raise self.fail("the bottom needs at least 1 axis (the batch axis)")
            dim = bottom[0].count_range(1)
            if self.top_k > dim:
                raise self.fail(f"top_k {self.top_k} exceeds the {dim} values per item "
                                f"(bottom shape {shape})")
            top_shape = [1] * max(len(shape), 3)
            top_shape[0] = shape[0]
            top_shape[1] = 2 if self.out_max_val else 1
            top_shape[2] = self.top_k
            top_shape = tuple(top_shape)
        top[0].reshape(top_shape)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        x = bottom[0].data
        if self.has_axis:
            x = xp.moveaxis(x, self.axis, -1)
        else:
            x = x.reshape(x.shape[0], -1)
        # Stable ascending sort, reversed: descending values, ties by descending index.
        order = xp.argsort(x, axis=-1, kind="stable")[..., ::-1][..., :self.top_k]
        values = xp.take_along_axis(x, order, axis=-1)
        indices = order.astype(x.dtype)
        if self.has_axis:
            result = values if self.out_max_val else indices
            top[0].data[...] = xp.moveaxis(result, -1, self.axis)
        elif self.out_max_val:
            top[0].data[...] = xp.stack([indices, values], axis=1).reshape(top[0].shape)
        else:
            top[0].data[...] = indices.reshape(top[0].shape)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[0]:
            raise self.fail("has no gradient (it outputs indices): it cannot back-propagate "
                            "to its bottom")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False
