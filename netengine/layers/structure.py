"""Structural layers: they move, copy or regroup data without arithmetic of their own."""
from __future__ import annotations

from netengine.blob import Blob
from netengine.layers.base import Layer, register


@register
class Split(Layer):
    """Copies one bottom to k tops; backward sums the k top diffs into the bottom diff.

    The tops share the bottom's data (no copy). The net inserts Split layers itself wherever a
    top feeds several bottoms, named ``<blob>_<layer>_<i>_split`` (Caffe's insert_splits).
    """

    type = "Split"
    exact_bottoms = 1
    min_tops = 1

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        for blob in top:
            if blob is bottom[0]:
                raise self.fail("does not allow in-place computation")
            blob.reshape(bottom[0].shape)
            blob.share_data(bottom[0])

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        pass  # tops share the bottom's data

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        if len(top) == 1:
            diff[...] = top[0].diff
            return
        bottom[0].xp.add(top[0].diff, top[1].diff, out=diff)
        for blob in top[2:]:
            diff += blob.diff


@register
class Flatten(Layer):
    """Merges axes [axis, end_axis] into one; shares data and diff with the bottom."""

    type = "Flatten"
    exact_bottoms = 1
    exact_tops = 1
    allows_inplace = False

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if top[0] is bottom[0]:
            raise self.fail("does not allow in-place computation (it shares the bottom's memory)")
        param = self.layer_param.flatten_param
        try:
            start = bottom[0].canonical_axis(param.axis)
            end = bottom[0].canonical_axis(param.end_axis)
        except IndexError as err:
            raise self.fail(f"flatten_param axis/end_axis: {err}") from None
        shape = bottom[0].shape
        new_shape = shape[:start] + (bottom[0].count_range(start, end + 1),) + shape[end + 1:]
        top[0].reshape(new_shape)
        top[0].share_data(bottom[0])
        top[0].share_diff(bottom[0])

    def compute_forward(self, bottom, top) -> None:
        pass

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass  # the diff is shared


@register
class Reshape(Layer):
    """Replaces axes [axis, axis+num_axes) by ``shape`` (0 copies a dim, -1 infers one)."""

    type = "Reshape"
    exact_bottoms = 1
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom, top) -> None:
        dims = list(self.layer_param.reshape_param.shape.dim)
        if dims.count(-1) > 1:
            raise self.fail(f"reshape_param.shape may infer at most one dimension (-1): {dims}")
        if any(d < -1 for d in dims):
            raise self.fail(f"reshape_param.shape dims must be >= -1: {dims}")

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if top[0] is bottom[0]:
            raise self.fail("does not allow in-place computation (it shares the bottom's memory)")
        param = self.layer_param.reshape_param
        dims = list(param.shape.dim)
        shape = bottom[0].shape
        n = len(shape)
        start = param.axis + n + 1 if param.axis < 0 else param.axis
        if not 0 <= start <= n:
            raise self.fail(f"reshape_param.axis {param.axis} out of range for {n} axes")
        end = n if param.num_axes == -1 else start + param.num_axes
        if param.num_axes < -1 or end > n:
            raise self.fail(f"reshape_param.num_axes {param.num_axes} out of range for axis "
                            f"{start} of a {n}-axis bottom {shape}")
        middle = []
        for i, d in enumerate(dims):
            if d == 0:
                if start + i >= n:
                    raise self.fail(f"dim {i} is 0 (copy) but the bottom has no axis {start + i}")
                middle.append(shape[start + i])
            else:
                middle.append(d)
        new_shape = list(shape[:start]) + middle + list(shape[end:])
        if -1 in new_shape:
            known = 1
            for d in new_shape:
                known *= d if d != -1 else 1
            if known == 0 or bottom[0].count % known:
                raise self.fail(f"cannot infer the -1 dimension: bottom count {bottom[0].count} "
                                f"is not divisible by {known}")
            new_shape[new_shape.index(-1)] = bottom[0].count // known
        count = 1
        for d in new_shape:
            count *= d
        if count != bottom[0].count:
            raise self.fail(f"output shape {tuple(new_shape)} has {count} elements but the bottom "
                            f"{shape} has {bottom[0].count}")
        top[0].reshape(new_shape)
        top[0].share_data(bottom[0])
        top[0].share_diff(bottom[0])

    def compute_forward(self, bottom, top) -> None:
        pass

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass


@register
class Silence(Layer):
    """Consumes its bottoms and produces nothing (so they are not net outputs); zero gradient."""

    type = "Silence"
    min_bottoms = 1
    exact_tops = 0

    def reshape(self, bottom, top) -> None:
        pass

    def compute_forward(self, bottom, top) -> None:
        pass

    def compute_backward(self, top, propagate_down, bottom) -> None:
        for down, blob in zip(propagate_down, bottom):
            if down:
                blob.diff[...] = 0
