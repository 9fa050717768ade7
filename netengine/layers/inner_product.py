"""Fully connected layers: InnerProduct (a dense matrix product) and Embed (a table lookup)."""
from __future__ import annotations

from netengine.blob import Blob
from netengine.layers.base import Layer, register


def _scatter_add(xp, target, index, values) -> None:
    """target[index[i]] += values[i], repeated indices summed (NumPy's ``add.at``)."""
    add_at = getattr(xp.add, "at", None)
    if add_at is not None:
        add_at(target, index, values)
    else:  # older CuPy releases
        import cupyx

        cupyx.scatter_add(target, index, values)


@register
class InnerProduct(Layer):
    """y = x·Wᵀ + b over the flattened trailing axes, one GEMM per pass.

    With ``axis`` a, the bottom is read as an (M, K) matrix: M = product of the dims before a,
    K = product of the dims from a on. Weight W is (N, K) (``transpose: true`` stores it
    (K, N) and computes y = x·W); bias b is (N,). The top is ``bottom.shape[:a] + (N,)``.

    Caffe's quirks: the default weight and bias fillers are constant 0 (set a weight_filler);
    K is fixed at setup, so a later reshape may change M (the batch) but not K.
    """

    type = "InnerProduct"
    exact_bottoms = 1
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        param = self.layer_param.inner_product_param
        if param.num_output <= 0:
            raise self.fail("inner_product_param.num_output must be given and positive")
        self.num_output = param.num_output
        self.bias_term = param.bias_term
        self.transpose = param.transpose
        self.axis = self._axis(bottom[0])
        self.k = bottom[0].count_range(self.axis)
        weight = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        self.setup_weight_and_bias(weight, (self.num_output,) if self.bias_term else None, param)

    def _axis(self, blob: Blob) -> int:
        try:
            return blob.canonical_axis(self.layer_param.inner_product_param.axis)
        except IndexError as err:
            raise self.fail(f"inner_product_param.axis: {err}") from None

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        axis = self._axis(bottom[0])
        k = bottom[0].count_range(axis)
        if k != self.k:
            raise self.fail(f"input size incompatible with the weights: expected {self.k} "
                            f"values per item from axis {axis} on, got {k} "
                            f"(bottom shape {bottom[0].shape})")
        self.axis = axis
        self.m = bottom[0].count_range(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.num_output,))

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self.m, self.k)
        w = self.blobs[0].data
        y = top[0].data.reshape(self.m, self.num_output)
        xp.matmul(x, w if self.transpose else w.T, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def compute_backward(self, top, propagate_down, bottom) -> None:
        xp = bottom[0].xp
        dy = top[0].diff.reshape(self.m, self.num_output)
        x = bottom[0].data.reshape(self.m, self.k)
        w = self.blobs[0]
        if self.param_propagate_down[0]:  # the product lands in a kept buffer, then one add
            grad = getattr(self, "_wgrad", None)
            if grad is None or grad.shape != w.shape or grad.dtype != w.dtype or \
                    not isinstance(grad, type(w.diff)):
                grad = self._wgrad = xp.empty(w.shape, dtype=w.dtype)
            xp.matmul(x.T, dy, out=grad) if self.transpose else xp.matmul(dy.T, x, out=grad)
            w.diff[...] += grad
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff[...] += dy.sum(axis=0)
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.m, self.k)
            xp.matmul(dy, w.data.T if self.transpose else w.data, out=dx)


@register
class Embed(Layer):
    """y[..., :] = W[x[...], :] + b: each bottom value is a row index into W (input_dim, N).

    The bottom holds integer-valued indices in [0, input_dim); the top has the bottom's shape
    plus a trailing axis of num_output. Gradients flow to W (rows summed over repeats) and b,
    never to the indices. Caffe's default fillers are constant 0. Caffe would abort on a
    forced backward into the indices; here force_backward simply leaves them alone.
    """

    type = "Embed"
    exact_bottoms = 1
    exact_tops = 1
    allows_inplace = False

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        param = self.layer_param.embed_param
        if param.num_output <= 0:
            raise self.fail("embed_param.num_output must be given and positive")
        if param.input_dim <= 0:
            raise self.fail("embed_param.input_dim (the vocabulary size) must be given and "
                            "positive")
        self.num_output = param.num_output
        self.input_dim = param.input_dim
        self.bias_term = param.bias_term
        self.setup_weight_and_bias((self.input_dim, self.num_output),
                                   (self.num_output,) if self.bias_term else None, param)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def _indices(self, bottom: Blob):
        xp = bottom.xp
        values = bottom.data.reshape(-1)
        index = values.astype(xp.int64)
        if bool(xp.any((index < 0) | (index >= self.input_dim))):
            raise self.fail(f"indices must lie in [0, {self.input_dim}) (embed_param.input_dim); "
                            f"got values from {float(values.min())} to {float(values.max())}")
        if bool(xp.any(index != values)):
            raise self.fail("indices must be integer-valued")
        return index

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        index = self._indices(bottom[0])
        y = top[0].data.reshape(index.size, self.num_output)
        xp.take(self.blobs[0].data, index, axis=0, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[0]:
            raise self.fail("cannot back-propagate to the indices (bottom 0)")
        xp = bottom[0].xp
        index = self._indices(bottom[0])
        dy = top[0].diff.reshape(index.size, self.num_output)
        if self.param_propagate_down[0]:
            _scatter_add(xp, self.blobs[0].diff, index, dy)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff[...] += dy.sum(axis=0)
