"""Convolution family: Convolution, Deconvolution and Im2col, all built on ops.ConvGemm.

Shared conventions (Caffe's BaseConvolutionLayer):
- ``axis`` (default 1) is the channel axis; the axes before it are flattened into the batch, the
  axes after it are spatial (1-D, 2-D, 3-D, ... all take the same N-d path).
- kernel_size / stride / pad / dilation are given once for every spatial axis or once per axis;
  kernel_h/kernel_w, stride_h/stride_w, pad_h/pad_w are 2-D only and exclude the repeated form.
- Default fillers are constant 0 (weights too): set a weight_filler.
- Param diffs accumulate; bottom diffs are overwritten. Several bottoms are allowed: each is
  convolved with the same weights into the top at the same position.
"""
from __future__ import annotations

import math

from netengine.blob import Blob
from netengine.layers.base import Layer, register
from netengine.ops.im2col import ConvGemm, conv_output_size, deconv_output_size


def _per_axis(layer: Layer, param, name: str, num_axes: int, default: int) -> tuple:
    """Value of ``name`` for each spatial axis: from name_h/name_w (2-D only) or the repeated
    field given 0 (default), 1 or num_axes times."""
    short = name.replace("_size", "")
    h_field, w_field = f"{short}_h", f"{short}_w"
    if param.HasField(h_field) or param.HasField(w_field):
        if num_axes != 2:
            raise layer.fail(f"{h_field}/{w_field} can only be used for 2-D convolution, "
                             f"the input has {num_axes} spatial axes")
        if len(getattr(param, name)):
            raise layer.fail(f"give either {name} or {h_field}/{w_field}, not both")
        return (getattr(param, h_field), getattr(param, w_field))
    values = list(getattr(param, name))
    if len(values) not in (0, 1, num_axes) or (name == "kernel_size" and not values):
        raise layer.fail(f"{name} must be given once or once per spatial axis ({num_axes}), "
                         f"or as {h_field} and {w_field}; it was given {len(values)} time(s)")
    if not values:
        return (default,) * num_axes
    return tuple(values) * num_axes if len(values) == 1 else tuple(values)


class _ConvBase(Layer):
    """Parameter parsing and geometry common to Convolution, Deconvolution and Im2col."""

    min_bottoms = 1
    min_tops = 1
    equal_bottom_top = True
    allows_inplace = False

    def _channel_axis(self, blob: Blob) -> int:
        try:
            return blob.canonical_axis(self.layer_param.convolution_param.axis)
        except IndexError as err:
            raise self.fail(f"convolution_param.axis: {err}") from None

    def _read_geometry(self, bottom: Blob) -> None:
        param = self.layer_param.convolution_param
        self.channel_axis = self._channel_axis(bottom)
        self.num_spatial = bottom.num_axes - self.channel_axis - 1
        if self.num_spatial < 1:
            raise self.fail(f"needs at least one spatial axis after the channel axis "
                            f"{self.channel_axis}; bottom shape is {bottom.shape}")
        n = self.num_spatial
        self.kernel = _per_axis(self, param, "kernel_size", n, 1)
        self.stride = _per_axis(self, param, "stride", n, 1)
        self.pad = _per_axis(self, param, "pad", n, 0)
        dilation = list(param.dilation)
        if len(dilation) not in (0, 1, n):
            raise self.fail(f"dilation must be given once or once per spatial axis ({n}); it "
                            f"was given {len(dilation)} time(s)")
        self.dilation = tuple(dilation) * n if len(dilation) == 1 else (
            tuple(dilation) or (1,) * n)
        for what, values in (("kernel size", self.kernel), ("stride", self.stride),
                             ("dilation", self.dilation)):
            if any(v <= 0 for v in values):
                raise self.fail(f"every {what} must be positive, got {values}")
        self.channels = bottom.shape[self.channel_axis]

    def _check_bottoms(self, bottom: list[Blob]) -> None:
        first = bottom[0]
        if first.num_axes != self.channel_axis + 1 + self.num_spatial:
            raise self.fail(f"bottom must keep {self.channel_axis + 1 + self.num_spatial} axes "
                            f"(set up with that many), got shape {first.shape}")
        if first.shape[self.channel_axis] != self.channels:
            raise self.fail(f"bottom has {first.shape[self.channel_axis]} channels on axis "
                            f"{self.channel_axis}, the weights expect {self.channels}")
        for i, blob in enumerate(bottom[1:], 1):
            if blob.shape != first.shape:
                raise self.fail(f"all bottoms must have the same shape: bottom 0 is "
                                f"{first.shape}, bottom {i} is {blob.shape}")
        self.num = first.count_range(0, self.channel_axis)
        self.in_spatial = first.shape[self.channel_axis + 1:]

    def _output_sizes(self, sizes, formula, what: str) -> tuple:
        out = tuple(formula(s, k, st, p, d) for s, k, st, p, d in
                    zip(sizes, self.kernel, self.stride, self.pad, self.dilation))
        if any(o <= 0 for o in out):
            raise self.fail(f"{what} output size {out} is not positive for spatial input "
                            f"{tuple(sizes)} (kernel {self.kernel}, stride {self.stride}, pad "
                            f"{self.pad}, dilation {self.dilation})")
        return out

    def _setup_weights(self, weight_shape: tuple) -> None:
        param = self.layer_param.convolution_param
        self.setup_weight_and_bias(weight_shape, (param.num_output,) if self.bias_term else None,
                                   param)

    def _read_outputs(self) -> None:
        param = self.layer_param.convolution_param
        if param.num_output <= 0:
            raise self.fail("convolution_param.num_output must be given and positive")
        self.num_output = param.num_output
        self.group = param.group
        if self.group <= 0:
            raise self.fail(f"convolution_param.group must be positive, got {self.group}")
        if self.channels % self.group:
            raise self.fail(f"the number of input channels ({self.channels}) must be a multiple "
                            f"of group ({self.group})")
        if self.num_output % self.group:
            raise self.fail(f"num_output ({self.num_output}) must be a multiple of group "
                            f"({self.group})")
        self.bias_term = param.bias_term

    def _view(self, array, channels: int, spatial) -> object:
        """(num, channels, *spatial) view of a blob's data or diff."""
        return array.reshape((self.num, channels, *spatial))


@register
class Convolution(_ConvBase):
    """y[n, o] = Σ_c W[o, c] ⋆ x[n, g(o)·C/G + c] + b[o]  (cross-correlation, per group g).

    Weight (num_output, C/group, *kernel); bias (num_output). Output size per spatial axis
    (rounded down): floor((in + 2·pad − (dilation·(kernel−1) + 1)) / stride) + 1.
    channels % group and num_output % group must be 0. Computed as im2col of the whole batch +
    batched GEMMs (ops.im2col.ConvGemm); 1x1 kernels with stride 1 and pad 0 skip im2col. The
    weight gradient reuses the columns of the last forward where they are still in the buffer
    (Caffe rebuilds them from the bottom's data at backward; the same unless the bottom was
    overwritten in between).
    """

    type = "Convolution"

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._read_geometry(bottom[0])
        self._read_outputs()
        self._setup_weights((self.num_output, self.channels // self.group, *self.kernel))
        self.gemm = ConvGemm(self.kernel, self.stride, self.pad, self.dilation, self.group)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._check_bottoms(bottom)
        self.out_spatial = self._output_sizes(self.in_spatial, conv_output_size, "convolution")
        lead = bottom[0].shape[:self.channel_axis]
        for blob in top:
            blob.reshape(lead + (self.num_output, *self.out_spatial))
        self.gemm.configure(bottom[0].xp, bottom[0].dtype, self.num, self.channels,
                            self.in_spatial, self.num_output, self.out_spatial,
                            bias=self.bias_term)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        w = self.blobs[0].data
        bias = self.blobs[1].data if self.bias_term else None
        for i, (b, t) in enumerate(zip(bottom, top)):
            self.gemm.conv(self._view(b.data, self.channels, self.in_spatial), w,
                           self._view(t.data, self.num_output, self.out_spatial), bias,
                           owner=i)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        w = self.blobs[0]
        need_w = self.param_propagate_down[0]
        need_b = self.bias_term and self.param_propagate_down[1]
        # The weight-gradient GEMM also yields the bias gradient when the columns carry the
        # bias row of ones (ConvGemm.bias_row); otherwise it is Σ dy here.
        fused_b = need_b and need_w and self.gemm.bias_row
        # Last bottom first: its columns may still be in the buffer from forward.
        for i in reversed(range(len(top))):
            dy = self._view(top[i].diff, self.num_output, self.out_spatial)
            if need_b and not fused_b:
                self.blobs[1].diff[...] += dy.reshape(self.num, self.num_output, -1) \
                    .sum(axis=2).sum(axis=0)
            if not (need_w or propagate_down[i]):
                continue
            dx = self._view(bottom[i].diff, self.channels, self.in_spatial) \
                if propagate_down[i] else None
            self.gemm.conv_backward(self._view(bottom[i].data, self.channels, self.in_spatial),
                                    dy, w.data, dx=dx, dw=w.diff if need_w else None,
                                    owner=i, db=self.blobs[1].diff if fused_b else None)


@register
class Deconvolution(_ConvBase):
    """Transposed convolution: the adjoint of Convolution with the same parameters, plus bias.

    Weight (C_in, num_output/group, *kernel) (in/out roles swapped against Convolution); bias
    (num_output). Output size per spatial axis: stride·(in − 1) + dilation·(kernel − 1) + 1 −
    2·pad (no output_padding). y = col2im(Wᵀ · x) + b; backward is im2col of the top diff.
    """

    type = "Deconvolution"

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._read_geometry(bottom[0])
        self._read_outputs()
        self._setup_weights((self.channels, self.num_output // self.group, *self.kernel))
        self.gemm = ConvGemm(self.kernel, self.stride, self.pad, self.dilation, self.group)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._check_bottoms(bottom)
        self.out_spatial = self._output_sizes(self.in_spatial, deconv_output_size,
                                              "deconvolution")
        lead = bottom[0].shape[:self.channel_axis]
        for blob in top:
            blob.reshape(lead + (self.num_output, *self.out_spatial))
        # The convolution this layer transposes runs from the top (x) to the bottom (y).
        self.gemm.configure(bottom[0].xp, bottom[0].dtype, self.num, self.num_output,
                            self.out_spatial, self.channels, self.in_spatial)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        w = self.blobs[0].data
        for b, t in zip(bottom, top):
            out = self._view(t.data, self.num_output, self.out_spatial)
            self.gemm.conv_transpose(self._view(b.data, self.channels, self.in_spatial), w, out)
            if self.bias_term:
                out.reshape(self.num, self.num_output, -1)[...] += \
                    self.blobs[1].data.reshape(-1, 1)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        w = self.blobs[0]
        need_w = self.param_propagate_down[0]
        need_b = self.bias_term and self.param_propagate_down[1]
        for i in range(len(top)):
            dy = self._view(top[i].diff, self.num_output, self.out_spatial)
            if need_b:
                self.blobs[1].diff[...] += dy.reshape(self.num, self.num_output, -1) \
                    .sum(axis=2).sum(axis=0)
            if not (need_w or propagate_down[i]):
                continue
            dx = self._view(bottom[i].diff, self.channels, self.in_spatial) \
                if propagate_down[i] else None
            self.gemm.conv_transpose_backward(
                self._view(bottom[i].data, self.channels, self.in_spatial), dy, w.data, dy=dx,
                dw=w.diff if need_w else None)


@register
class Im2col(_ConvBase):
    """Exposes im2col: top (…, C·prod(kernel), *out) with channel index (c, k_1, …, k_D).

    Reads kernel/stride/pad/dilation from convolution_param (num_output, group unused); the
    output grid is Convolution's. Backward folds the top diff back (col2im).
    """

    type = "Im2col"
    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._read_geometry(bottom[0])
        self.gemm = ConvGemm(self.kernel, self.stride, self.pad, self.dilation)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._check_bottoms(bottom)
        self.out_spatial = self._output_sizes(self.in_spatial, conv_output_size, "im2col")
        self.k_channels = self.channels * math.prod(self.kernel)
        top[0].reshape(bottom[0].shape[:self.channel_axis] + (self.k_channels, *self.out_spatial))
        self.gemm.configure(bottom[0].xp, bottom[0].dtype, self.num, self.channels,
                            self.in_spatial, 1, self.out_spatial, item_minor=False)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = self._view(bottom[0].data, self.channels, self.in_spatial)
        y = top[0].data.reshape(self.num, self.k_channels, -1)
        for part in self.gemm.chunks():
            self.gemm.im2col(x[part], out=y[part])

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        dx = self._view(bottom[0].diff, self.channels, self.in_spatial)
        dy = top[0].diff.reshape(self.num, self.k_channels, -1)
        for part in self.gemm.chunks():
            self.gemm.col2im(dy[part], dx[part])
