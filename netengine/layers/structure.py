"""Structural layers: they copy, cut, join, select or combine blobs element by element."""
from __future__ import annotations

from netengine.blob import Blob
from netengine.layers.base import Layer, register
from netengine.proto import caffe_pb2


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
        if end + 1 < start:
            raise self.fail(f"flatten_param.end_axis ({end}) must not come before axis ({start})")
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


def _axis(layer: Layer, blob: Blob, param, field: str, deprecated: str) -> int:
    """The axis a Slice/Concat works on: ``axis`` or (if set) the deprecated uint32 alias."""
    if param.HasField(deprecated):
        value = getattr(param, deprecated)
        if value >= blob.num_axes:
            raise layer.fail(f"{field}.{deprecated} {value} is out of range for a bottom of shape "
                             f"{blob.shape}")
        return value
    try:
        return blob.canonical_axis(param.axis)
    except IndexError:
        raise layer.fail(f"{field}.axis {param.axis} is out of range for a bottom of shape "
                         f"{blob.shape}") from None


def _check_axis_fields(layer: Layer, param, field: str, deprecated: str) -> None:
    if param.HasField("axis") and param.HasField(deprecated):
        raise layer.fail(f"{field}: give either axis or {deprecated}, not both")


def _at(axis: int, start: int, stop: int) -> tuple:
    """Index selecting [start, stop) along ``axis``."""
    return (slice(None),) * axis + (slice(start, stop),)


@register
class Slice(Layer):
    """Cuts bottom 0 along ``axis`` (or the deprecated ``slice_dim``) into the tops.

    With slice_point p1 < p2 < ... (exactly #tops − 1 of them) the tops get p1, p2 − p1, ...,
    size − p_last entries; without points the axis is split evenly (#tops must divide it).
    Backward copies each top diff back into its part of the bottom diff.
    """

    type = "Slice"
    exact_bottoms = 1
    min_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom, top) -> None:
        _check_axis_fields(self, self.layer_param.slice_param, "slice_param", "slice_dim")

    def reshape(self, bottom, top) -> None:
        param = self.layer_param.slice_param
        self._axis = axis = _axis(self, bottom[0], param, "slice_param", "slice_dim")
        size = bottom[0].shape[axis]
        points = list(param.slice_point)
        if points:
            if len(points) != len(top) - 1:
                raise self.fail(f"slice_param needs one slice_point fewer than tops: "
                                f"{len(points)} point(s) for {len(top)} top(s)")
            if any(b <= a for a, b in zip([0] + points, points)) or points[-1] > size:
                raise self.fail(f"slice_point {points} must be strictly increasing, in (0, "
                                f"{size}] for axis {axis} of size {size}")
            bounds = [0] + points + [size]
        else:
            if size % len(top):
                raise self.fail(f"{len(top)} tops do not evenly divide axis {axis} of size "
                                f"{size}; give slice_point")
            step = size // len(top)
            bounds = [i * step for i in range(len(top) + 1)]
        self._bounds = list(zip(bounds[:-1], bounds[1:]))
        for blob, (start, stop) in zip(top, self._bounds):
            shape = list(bottom[0].shape)
            shape[axis] = stop - start
            blob.reshape(shape)

    def compute_forward(self, bottom, top) -> None:
        for blob, (start, stop) in zip(top, self._bounds):
            blob.data[...] = bottom[0].data[_at(self._axis, start, stop)]

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        for blob, (start, stop) in zip(top, self._bounds):
            diff[_at(self._axis, start, stop)] = blob.diff


@register
class Concat(Layer):
    """Joins the bottoms along ``axis`` (or the deprecated ``concat_dim``).

    Every other axis must match bottom 0's. Backward slices the top diff back to the bottoms.
    """

    type = "Concat"
    min_bottoms = 1
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom, top) -> None:
        _check_axis_fields(self, self.layer_param.concat_param, "concat_param", "concat_dim")

    def reshape(self, bottom, top) -> None:
        first = bottom[0]
        self._axis = axis = _axis(self, first, self.layer_param.concat_param, "concat_param",
                                  "concat_dim")
        shape = list(first.shape)
        for i, blob in enumerate(bottom[1:], 1):
            if (blob.num_axes != first.num_axes
                    or any(a != b for j, (a, b) in enumerate(zip(blob.shape, first.shape))
                           if j != axis)):
                raise self.fail(f"bottom {i} has shape {blob.shape}, bottom 0 has {first.shape}: "
                                f"all axes except the concat axis {axis} must match")
            shape[axis] += blob.shape[axis]
        self._bounds = []
        start = 0
        for blob in bottom:
            self._bounds.append((start, start + blob.shape[axis]))
            start += blob.shape[axis]
        top[0].reshape(shape)

    def compute_forward(self, bottom, top) -> None:
        for blob, (start, stop) in zip(bottom, self._bounds):
            top[0].data[_at(self._axis, start, stop)] = blob.data

    def compute_backward(self, top, propagate_down, bottom) -> None:
        for down, blob, (start, stop) in zip(propagate_down, bottom, self._bounds):
            if down:
                blob.diff[...] = top[0].diff[_at(self._axis, start, stop)]


@register
class Eltwise(Layer):
    """Element-wise SUM (Σ coeff_i·x_i), PROD (Π x_i) or MAX over bottoms of one shape.

    coeff: one per bottom or none (all 1); PROD refuses coefficients, MAX ignores them.
    PROD gradient: dy·Π_{j≠i} x_j with stable_prod_grad (default), else dy·y/x_i (undefined at
    x_i = 0, as in Caffe). MAX keeps the winning bottom per element: between bottoms 0 and 1
    bottom 0 wins only if strictly greater (ties go to bottom 1); each later bottom wins only if
    strictly greater than the running maximum. The gradient goes to the winner only.
    """

    type = "Eltwise"
    min_bottoms = 2
    exact_tops = 1

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.eltwise_param
        coeffs = list(param.coeff)
        if coeffs and len(coeffs) != len(bottom):
            raise self.fail(f"eltwise_param.coeff needs one coefficient per bottom (or none): "
                            f"{len(coeffs)} for {len(bottom)} bottoms")
        if coeffs and param.operation == caffe_pb2.EltwiseParameter.PROD:
            raise self.fail("eltwise_param.coeff is only allowed for operation SUM")
        self._coeffs = coeffs or [1.0] * len(bottom)

    def reshape(self, bottom, top) -> None:
        for i, blob in enumerate(bottom[1:], 1):
            if blob.shape != bottom[0].shape:
                raise self.fail(f"all bottoms must have the same shape: bottom {i} has "
                                f"{blob.shape}, bottom 0 has {bottom[0].shape}")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def compute_forward(self, bottom, top) -> None:
        xp = bottom[0].xp
        op = self.layer_param.eltwise_param.operation
        ops = caffe_pb2.EltwiseParameter
        data = [blob.data for blob in bottom]
        if op == ops.SUM:
            result = data[0] * self._coeffs[0]
            for x, c in zip(data[1:], self._coeffs[1:]):
                result += x * c if c != 1 else x
        elif op == ops.PROD:
            # Backward needs the inputs; keep copies of those the output overwrites.
            self._inputs = [x.copy() if blob is top[0] else x for x, blob in zip(data, bottom)]
            result = data[0] * data[1]
            for x in data[2:]:
                result *= x
        else:
            first_wins = data[0] > data[1]
            result = xp.where(first_wins, data[0], data[1])
            mask = xp.where(first_wins, 0, 1).astype(xp.int32)
            for i, x in enumerate(data[2:], 2):
                better = x > result
                result = xp.where(better, x, result)
                mask[better] = i
            self._mask = mask
        top[0].data[...] = result

    def compute_backward(self, top, propagate_down, bottom) -> None:
        op = self.layer_param.eltwise_param.operation
        ops = caffe_pb2.EltwiseParameter
        dy = top[0].diff
        if any(blob is top[0] for blob in bottom):
            dy = dy.copy()
        for i, blob in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if op == ops.SUM:
                blob.diff[...] = dy * self._coeffs[i] if self._coeffs[i] != 1 else dy
            elif op == ops.PROD:
                blob.diff[...] = dy * self._product_of_others(i)
            else:
                blob.diff[...] = dy * (self._mask == i)

    def _product_of_others(self, i: int):
        inputs = self._inputs
        if self.layer_param.eltwise_param.stable_prod_grad:
            others = [x for j, x in enumerate(inputs) if j != i]
            result = others[0].copy()
            for x in others[1:]:
                result *= x
            return result
        total = inputs[0].copy()
        for x in inputs[1:]:
            total *= x
        return total / inputs[i]


@register
class Crop(Layer):
    """Crops bottom 0 to bottom 1's shape on every axis from ``axis`` (default 2) on.

    offset: none (0), one for all cropped axes, or one per cropped axis. Backward writes the
    top diff into the cropped window of a zero bottom diff; bottom 1 only gives the shape.
    """

    type = "Crop"
    exact_bottoms = 2
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.crop_param
        start = self._start(bottom[0])
        offsets = len(param.offset)
        if offsets > 1 and start + offsets != bottom[0].num_axes:
            raise self.fail(f"crop_param.offset must be given once or once per cropped axis "
                            f"({bottom[0].num_axes - start} from axis {start}), got {offsets}")

    def _start(self, blob: Blob) -> int:
        axis = self.layer_param.crop_param.axis
        try:
            return blob.canonical_axis(axis)
        except IndexError:
            raise self.fail(f"crop_param.axis {axis} is out of range for a bottom of shape "
                            f"{blob.shape}") from None

    def reshape(self, bottom, top) -> None:
        offsets = list(self.layer_param.crop_param.offset)
        source, like = bottom[0].shape, bottom[1].shape
        start = self._start(bottom[0])
        if len(like) < len(source):
            raise self.fail(f"bottom 1 {like} needs at least the {len(source)} axes of bottom 0 "
                            f"{source}")
        shape, index = list(source), []
        for i in range(len(source)):
            if i < start:
                index.append(slice(None))
                continue
            offset = offsets[0] if len(offsets) == 1 else offsets[i - start] if offsets else 0
            if offset + like[i] > source[i]:
                raise self.fail(f"crop of axis {i} is out of bounds: size {like[i]} at offset "
                                f"{offset} does not fit in {source[i]}")
            shape[i] = like[i]
            index.append(slice(offset, offset + like[i]))
        self._index = tuple(index)
        top[0].reshape(shape)

    def compute_forward(self, bottom, top) -> None:
        top[0].data[...] = bottom[0].data[self._index]

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[0]:
            diff = bottom[0].diff
            diff[...] = 0
            diff[self._index] = top[0].diff
        if propagate_down[1]:
            bottom[1].diff[...] = 0

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0


@register
class Tile(Layer):
    """Repeats the block of axes [axis, end) ``tiles`` times along ``axis`` (like np.tile).

    Backward sums the diffs of the copies.
    """

    type = "Tile"
    exact_bottoms = 1
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom, top) -> None:
        param = self.layer_param.tile_param
        if not param.HasField("tiles") or param.tiles <= 0:
            raise self.fail(f"tile_param.tiles must be given and positive, got "
                            f"{param.tiles if param.HasField('tiles') else 'none'}")

    def reshape(self, bottom, top) -> None:
        axis = self.layer_param.tile_param.axis
        try:
            axis = bottom[0].canonical_axis(axis)
        except IndexError:
            raise self.fail(f"tile_param.axis {axis} is out of range for a bottom of shape "
                            f"{bottom[0].shape}") from None
        tiles = self.layer_param.tile_param.tiles
        shape = list(bottom[0].shape)
        shape[axis] *= tiles
        self._view = (bottom[0].count_range(0, axis), tiles, bottom[0].count_range(axis))
        top[0].reshape(shape)

    def compute_forward(self, bottom, top) -> None:
        outer, tiles, inner = self._view
        top[0].data.reshape(self._view)[...] = bottom[0].data.reshape(outer, 1, inner)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[0]:
            summed = top[0].diff.reshape(self._view).sum(axis=1)
            bottom[0].diff[...] = summed.reshape(bottom[0].shape)


@register
class BatchReindex(Layer):
    """top[i] = bottom0[int(bottom1[i])]: picks (and may repeat) items along axis 0.

    bottom 1 is a 1-D index blob (floats, truncated); every index must be in [0, N).
    Backward sums the top diffs of every copy of an item; the indices get no gradient.
    """

    type = "BatchReindex"
    exact_bottoms = 2
    exact_tops = 1
    allows_inplace = False

    def reshape(self, bottom, top) -> None:
        if bottom[1].num_axes != 1:
            raise self.fail(f"bottom 1 (the indices) must be 1-D, got shape {bottom[1].shape}")
        if bottom[0].num_axes < 1:
            raise self.fail("bottom 0 needs at least 1 axis to pick items from")
        top[0].reshape((bottom[1].shape[0],) + bottom[0].shape[1:])

    def _indices(self, bottom):
        xp = bottom[0].xp
        index = bottom[1].data.astype(xp.int64)
        if index.size and bool(((index < 0) | (index >= bottom[0].shape[0])).any()):
            raise self.fail(f"indices in bottom 1 must lie in [0, {bottom[0].shape[0]}), the "
                            f"batch size of bottom 0")
        return index

    def compute_forward(self, bottom, top) -> None:
        top[0].data[...] = bottom[0].xp.take(bottom[0].data, self._indices(bottom), axis=0)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[1]:
            raise self.fail("cannot back-propagate to the indices (bottom 1)")
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        index = self._indices(bottom)
        picks = (index[:, None] == xp.arange(bottom[0].shape[0])[None, :]).astype(top[0].dtype)
        dy = top[0].diff.reshape(index.size, -1)
        bottom[0].diff[...] = (picks.T @ dy).reshape(bottom[0].shape)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0


@register
class Filter(Layer):
    """Keeps the items (axis 0) whose selector value is non-zero, in every data bottom.

    Bottoms: k data blobs then the selector (N, 1, ...); tops: k filtered blobs. At setup the
    tops get the full batch size (Caffe's first Reshape); each forward uses the selection.
    Backward scatters the top diffs back (zero elsewhere); the selector gets no gradient.
    """

    type = "Filter"
    min_bottoms = 2
    min_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom, top) -> None:
        if len(top) != len(bottom) - 1:
            raise self.fail(f"needs one top per data bottom (all bottoms but the last, the "
                            f"selector): {len(bottom)} bottoms, {len(top)} tops")
        self._selector = len(bottom) - 1
        self._first_reshape = True

    def reshape(self, bottom, top) -> None:
        selector = bottom[-1]
        if selector.num_axes < 1 or any(d != 1 for d in selector.shape[1:]):
            raise self.fail(f"the selector (last bottom) must have shape (N, 1, ...), got "
                            f"{selector.shape}")
        for i, blob in enumerate(bottom[:-1]):
            if blob.num_axes < 1 or blob.shape[0] != selector.shape[0]:
                raise self.fail(f"bottom {i} {blob.shape} must have the selector's "
                                f"{selector.shape[0]} items on axis 0")
        self._index = selector.xp.nonzero(selector.data.reshape(-1))[0]
        num = int(self._index.size)
        if self._first_reshape:
            num, self._first_reshape = selector.shape[0], False
        for blob, source in zip(top, bottom):
            blob.reshape((num,) + source.shape[1:])

    def compute_forward(self, bottom, top) -> None:
        for blob, source in zip(top, bottom):
            blob.data[...] = source.xp.take(source.data, self._index, axis=0)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[-1]:
            raise self.fail("cannot back-propagate to the selector (last bottom)")
        for down, blob, source in zip(propagate_down, top, bottom):
            if down:
                diff = source.diff
                diff[...] = 0
                diff[self._index] = blob.diff

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != self._selector


@register
class Parameter(Layer):
    """Exposes a learned blob of parameter_param.shape as its top (shared data and diff)."""

    type = "Parameter"
    exact_bottoms = 0
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom, top) -> None:
        if not self.has_given_blobs(1):
            self.blobs = [self.make_blob(tuple(self.layer_param.parameter_param.shape.dim))]

    def reshape(self, bottom, top) -> None:
        top[0].reshape(self.blobs[0].shape)
        top[0].share_data(self.blobs[0])
        top[0].share_diff(self.blobs[0])

    def compute_forward(self, bottom, top) -> None:
        pass

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass
