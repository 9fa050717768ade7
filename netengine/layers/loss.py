"""Softmax, the loss layers and Accuracy.

Caffe's loss contract: the loss top is a scalar holding the *unweighted* loss; the net stores
the layer's loss_weight in that top's diff at setup, and backward scales every gradient by
``top[0].diff`` (so a loss layer's gradient is d(loss_weight·loss)/d(bottom)). Labels are
float blobs holding integer values; Caffe truncates them toward zero (``static_cast<int>``).
"""
from __future__ import annotations

import numpy as np

from netengine.blob import Blob, blob_from_proto
from netengine.errors import NetEngineError
from netengine.formats.prototxt import read_binary_proto
from netengine.layers.base import Layer, LossLayer, register
from netengine.proto import caffe_pb2

FLT_MIN = float(np.finfo(np.float32).tiny)  # Caffe clamps probabilities with FLT_MIN even in double
_NORM = caffe_pb2.LossParameter


def _softmax(xp, x, axis: int):
    """exp(x - max) / Σ exp(x - max) along ``axis``, in x's dtype."""
    y = x - x.max(axis=axis, keepdims=True)
    xp.exp(y, out=y)
    y /= y.sum(axis=axis, keepdims=True)
    return y


def _normalization(layer: Layer, default: int) -> int:
    """The loss_param normalization mode; the deprecated ``normalize`` counts only when
    ``normalization`` is unset (true → VALID, false → BATCH_SIZE)."""
    param = layer.layer_param.loss_param
    if param.HasField("normalization"):
        return param.normalization
    if param.HasField("normalize"):
        return _NORM.VALID if param.normalize else _NORM.BATCH_SIZE
    return default


def _normalizer(xp, mode: int, outer: int, inner: int, valid, dtype):
    """Caffe's get_normalizer, clamped to >= 1; ``valid`` is the non-ignored count (array)."""
    if mode == _NORM.FULL:
        value = xp.asarray(outer * inner, dtype=dtype)
    elif mode == _NORM.VALID:
        value = xp.asarray(valid, dtype=dtype)
    elif mode == _NORM.BATCH_SIZE:
        value = xp.asarray(outer, dtype=dtype)
    else:  # NONE
        value = xp.asarray(1, dtype=dtype)
    return xp.maximum(value, 1)


def _labels(layer: Layer, blob: Blob, num_classes: int, ignore_label: int | None):
    """Integer labels (truncated) and the mask of non-ignored ones; out-of-range → error."""
    xp = blob.xp
    labels = blob.data.astype(xp.int64)
    valid = labels != ignore_label if ignore_label is not None else xp.ones(labels.shape, bool)
    if bool(xp.any(valid & ((labels < 0) | (labels >= num_classes)))):
        raise layer.fail(f"labels must lie in [0, {num_classes}) (or equal ignore_label); got "
                         f"values from {float(blob.data.min())} to {float(blob.data.max())}")
    return xp.where(valid, labels, 0), valid


def _onehot(xp, labels, classes: int):
    """Boolean one-hot of ``labels`` (shape (outer, 1, ...)) along axis 1."""
    shape = (1, classes) + (1,) * (labels.ndim - 2)
    return labels == xp.arange(classes).reshape(shape)


def _class_axis(layer: Layer, blob: Blob, axis: int, field: str) -> int:
    try:
        return blob.canonical_axis(axis)
    except IndexError as err:
        raise layer.fail(f"{field}: {err}") from None


def _outer_inner(layer: Layer, score: Blob, labels: Blob, axis: int) -> tuple[int, int]:
    """Sizes before and after the class axis; one label per prediction is required."""
    outer, inner = score.count_range(0, axis), score.count_range(axis + 1)
    if labels.count != outer * inner:
        raise layer.fail(f"number of labels must match the number of predictions: scores "
                         f"{score.shape} with class axis {axis} need {outer * inner} labels, "
                         f"got {labels.count}")
    return outer, inner


def _refuse_label_gradient(layer: Layer, propagate_down: list[bool]) -> None:
    """Labels (bottom 1) get no gradient: asking for one is an error, as in Caffe."""
    if propagate_down[1]:
        raise layer.fail("cannot back-propagate to the labels (bottom 1)")


def _check_one_label_per_item(layer: Layer, bottom: list[Blob]) -> None:
    if bottom[1].count != bottom[0].shape[0]:
        raise layer.fail(f"expects one label per item: {bottom[0].shape[0]} items, got "
                         f"{bottom[1].count} labels")


@register
class Softmax(Layer):
    """y = exp(x - max) / Σ_c exp(x - max) along ``softmax_param.axis`` (default 1).

    Backward: dx = (dy - Σ_c dy·y) · y. May run in place.
    """

    type = "Softmax"
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.axis = _class_axis(self, bottom[0], self.layer_param.softmax_param.axis,
                                "softmax_param.axis")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].data[...] = _softmax(bottom[0].xp, bottom[0].data, self.axis)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[0]:
            y, dy = top[0].data, top[0].diff
            bottom[0].diff[...] = (dy - (dy * y).sum(axis=self.axis, keepdims=True)) * y


@register
class SoftmaxWithLoss(LossLayer):
    """loss = -Σ log(max(p[label], FLT_MIN)) / normaliser, p = softmax(score) along the axis.

    Bottoms: scores (…, C, …) with the class axis at ``softmax_param.axis``, and labels with
    outer·inner values (outer = dims before the axis, inner = dims after). Positions whose
    label equals ``loss_param.ignore_label`` add nothing and get zero gradient.
    Normaliser (``loss_param.normalization``, default VALID): FULL = outer·inner, VALID = the
    non-ignored count, BATCH_SIZE = outer, NONE = 1; then max(·, 1). The deprecated
    ``normalize`` is read only when ``normalization`` is unset (true VALID, false BATCH_SIZE).
    Gradient: (p - onehot(label)) · loss_weight / normaliser, loss_weight = top[0].diff.
    An optional second top receives p. Labels get no gradient.
    """

    type = "SoftmaxWithLoss"
    exact_tops = None
    min_tops = 1
    max_tops = 2

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        param = self.layer_param.loss_param
        self.ignore_label = param.ignore_label if param.HasField("ignore_label") else None
        self.normalization = _normalization(self, _NORM.VALID)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        score = bottom[0]
        self.axis = _class_axis(self, score, self.layer_param.softmax_param.axis,
                                "softmax_param.axis")
        self.outer, self.inner = _outer_inner(self, score, bottom[1], self.axis)
        if len(top) > 1:
            top[1].reshape(score.shape)

    def _simple(self, bottom: list[Blob]) -> bool:
        """One label per row of scores and nothing ignored: the fast path (same values)."""
        return self.inner == 1 and self.ignore_label is None

    def _forward_rows(self, bottom: list[Blob], top: list[Blob]) -> None:
        """compute_forward for (outer, C) scores without ignore_label, in kept buffers."""
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self.outer, -1)
        prob = getattr(self, "_prob_rows", None)
        if prob is None or prob.shape != x.shape or prob.dtype != x.dtype or \
                not isinstance(prob, type(x)):
            prob = self._prob_rows = xp.empty_like(x)
            self._rows = xp.arange(self.outer)
        xp.subtract(x, x.max(axis=1, keepdims=True), out=prob)
        xp.exp(prob, out=prob)
        prob /= prob.sum(axis=1, keepdims=True)
        labels = bottom[1].data.reshape(-1).astype(xp.intp)
        classes = x.shape[1]
        if bool(xp.any((labels < 0) | (labels >= classes))):
            raise self.fail(f"labels must lie in [0, {classes}) (or equal ignore_label); got "
                            f"values from {float(bottom[1].data.min())} to "
                            f"{float(bottom[1].data.max())}")
        log_p = xp.log(xp.maximum(prob[self._rows, labels], FLT_MIN))
        self.normalizer = _normalizer(xp, self.normalization, self.outer, 1, self.outer,
                                      prob.dtype)
        top[0].data[...] = -log_p.sum() / self.normalizer
        self.prob, self.labels = prob, labels
        if len(top) > 1:
            top[1].data[...] = prob.reshape(bottom[0].shape)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        if self._simple(bottom):
            return self._forward_rows(bottom, top)
        xp = bottom[0].xp
        classes = bottom[0].shape[self.axis]
        prob = _softmax(xp, bottom[0].data, self.axis).reshape(self.outer, classes, self.inner)
        labels, valid = _labels(self, bottom[1], classes,
                                self.ignore_label)
        labels = labels.reshape(self.outer, 1, self.inner)
        valid = valid.reshape(self.outer, self.inner)
        picked = xp.take_along_axis(prob, labels, axis=1)[:, 0, :]
        log_p = xp.log(xp.maximum(picked, FLT_MIN))
        self.normalizer = _normalizer(xp, self.normalization, self.outer, self.inner,
                                      valid.sum(), prob.dtype)
        top[0].data[...] = -xp.where(valid, log_p, 0).sum() / self.normalizer
        self.prob, self.labels, self.valid = prob, labels, valid
        if len(top) > 1:
            top[1].data[...] = prob.reshape(bottom[0].shape)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        _refuse_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        if type(self) is SoftmaxWithLoss and self.prob.ndim == 2:  # fast path's (outer, C)
            grad = bottom[0].diff.reshape(self.prob.shape)
            xp.copyto(grad, self.prob)
            grad[self._rows, self.labels] -= 1
            grad *= top[0].diff / self.normalizer
            return
        grad = self.prob - _onehot(xp, self.labels, self.prob.shape[1])
        grad *= self.valid[:, None, :]
        grad *= top[0].diff / self.normalizer
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register
class EuclideanLoss(LossLayer):
    """loss = Σ (a - b)² / (2N), N = a.shape[0].

    Both bottoms get gradients: ±(a - b)·loss_weight/N (a gets +, b gets -); force_backward
    may reach either one.
    """

    type = "EuclideanLoss"

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        if bottom[0].count_range(1) != bottom[1].count_range(1):
            raise self.fail(f"the bottoms must have the same number of values per item: "
                            f"{bottom[0].shape} vs {bottom[1].shape}")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.delta = bottom[0].data - bottom[1].data.reshape(bottom[0].shape)
        top[0].data[...] = (self.delta * self.delta).sum() / (2 * bottom[0].shape[0])

    def compute_backward(self, top, propagate_down, bottom) -> None:
        scale = top[0].diff / bottom[0].shape[0]
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                bottom[i].diff[...] = (sign * scale * self.delta).reshape(bottom[i].shape)


@register
class SigmoidCrossEntropyLoss(LossLayer):
    """loss = -Σ [t·log σ(x) + (1 - t)·log(1 - σ(x))] / normaliser, element-wise over x.

    Computed stably as Σ [max(x, 0) - x·t + log(1 + exp(-|x|))]. Targets equal to
    ``loss_param.ignore_label`` (after truncation to int) are skipped. Caffe's quirk: with no
    ``normalization`` or ``normalize`` given, the normaliser is BATCH_SIZE (N = x.shape[0]),
    not VALID; FULL/VALID/NONE as in SoftmaxWithLoss, clamped to >= 1.
    Gradient: (σ(x) - t)·loss_weight/normaliser, zero where ignored; targets get none.
    """

    type = "SigmoidCrossEntropyLoss"

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        param = self.layer_param.loss_param
        self.ignore_label = param.ignore_label if param.HasField("ignore_label") else None
        self.normalization = _normalization(self, _NORM.BATCH_SIZE)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.fail(f"scores and targets must have the same count: {bottom[0].shape} "
                            f"vs {bottom[1].shape}")

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        terms = xp.maximum(x, 0) - x * t + xp.log1p(xp.exp(-xp.abs(x)))
        if self.ignore_label is not None:
            self.valid = t.astype(xp.int64) != self.ignore_label
            terms = xp.where(self.valid, terms, 0)
            valid_count = self.valid.sum()
        else:
            self.valid = None
            valid_count = x.size
        outer = x.shape[0]
        self.normalizer = _normalizer(xp, self.normalization, outer, x.size // max(outer, 1),
                                      valid_count, x.dtype)
        top[0].data[...] = terms.sum() / self.normalizer

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[1]:
            raise self.fail("cannot back-propagate to the targets (bottom 1)")
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        x = bottom[0].data
        sigmoid = 1 / (1 + xp.exp(-x))
        grad = sigmoid - bottom[1].data.reshape(x.shape)
        if self.valid is not None:
            grad *= self.valid
        bottom[0].diff[...] = grad * (top[0].diff / self.normalizer)


@register
class HingeLoss(LossLayer):
    """One-vs-all hinge: with m_j = max(0, 1 + s_j·x_j), s_j = -1 for the true class and +1
    otherwise, loss = Σ m / N (L1, default) or Σ m² / N (L2); N = x.shape[0].

    Scores are read as (N, C) with C = count / N; labels hold N integer values. Gradient
    (scaled by loss_weight): L1 s_j·sign(m_j)/N, L2 2·s_j·m_j/N. Labels get no gradient.
    """

    type = "HingeLoss"

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        _check_one_label_per_item(self, bottom)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        num = bottom[0].shape[0]
        x = bottom[0].data.reshape(num, -1)
        labels, _ = _labels(self, bottom[1], x.shape[1], None)
        self.sign = 1 - 2 * _onehot(xp, labels.reshape(num, 1), x.shape[1]).astype(x.dtype)
        self.margin = xp.maximum(1 + self.sign * x, 0)
        if self.layer_param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2:
            loss = (self.margin * self.margin).sum()
        else:
            loss = self.margin.sum()
        top[0].data[...] = loss / num

    def compute_backward(self, top, propagate_down, bottom) -> None:
        _refuse_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        scale = top[0].diff / bottom[0].shape[0]
        if self.layer_param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2:
            grad = 2 * self.sign * self.margin
        else:
            grad = self.sign * xp.sign(self.margin)
        bottom[0].diff[...] = (grad * scale).reshape(bottom[0].shape)


@register
class MultinomialLogisticLoss(LossLayer):
    """loss = -Σ_n log(max(p[n, label_n], 1e-20)) / N, for bottoms that already hold
    probabilities (N, C) (C = count / N) and N labels.

    Gradient: -loss_weight / (N · max(p, 1e-20)) at each label's entry, zero elsewhere.
    """

    type = "MultinomialLogisticLoss"
    threshold = 1e-20

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        _check_one_label_per_item(self, bottom)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        num = bottom[0].shape[0]
        p = bottom[0].data.reshape(num, -1)
        labels, _ = _labels(self, bottom[1], p.shape[1], None)
        self.labels = labels.reshape(num, 1)
        self.picked = xp.maximum(xp.take_along_axis(p, self.labels, axis=1), self.threshold)
        top[0].data[...] = -xp.log(self.picked).sum() / num

    def compute_backward(self, top, propagate_down, bottom) -> None:
        _refuse_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        num = bottom[0].shape[0]
        scale = -(top[0].diff / num) / self.picked
        grad = _onehot(xp, self.labels, bottom[0].count // num) * scale
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register
class ContrastiveLoss(LossLayer):
    """loss = Σ_n [y_n·d_n² + (1 - y_n)·max(margin - d_n, 0)²] / (2N), d_n = ||a_n - b_n||.

    Bottoms: a and b (N, C, ...) and the similarity y (N values; non-zero after truncation
    means similar). ``legacy_version: true`` uses max(margin - d², 0) for dissimilar pairs
    (unsquared). Gradients go to a and b (opposite signs), never to y. Caffe's quirk: the
    non-legacy dissimilar gradient divides by (d + 1e-4).
    """

    type = "ContrastiveLoss"
    exact_bottoms = 3

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        num = bottom[0].shape[0]
        if bottom[0].shape != bottom[1].shape:
            raise self.fail(f"the two feature bottoms must have the same shape: "
                            f"{bottom[0].shape} vs {bottom[1].shape}")
        if bottom[2].count != num:
            raise self.fail(f"expects one similarity label per pair: {num} pairs, got "
                            f"{bottom[2].count} labels")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        num = bottom[0].shape[0]
        param = self.layer_param.contrastive_loss_param
        self.delta = (bottom[0].data - bottom[1].data).reshape(num, -1)
        self.dist_sq = (self.delta * self.delta).sum(axis=1)
        self.similar = bottom[2].data.reshape(num).astype(xp.int64) != 0
        if param.legacy_version:
            dissimilar = xp.maximum(param.margin - self.dist_sq, 0)
        else:
            dissimilar = xp.maximum(param.margin - xp.sqrt(self.dist_sq), 0) ** 2
        loss = xp.where(self.similar, self.dist_sq, dissimilar).sum()
        top[0].data[...] = loss / num / 2

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[2]:
            raise self.fail("cannot back-propagate to the similarity labels (bottom 2)")
        xp = bottom[0].xp
        num = bottom[0].shape[0]
        param = self.layer_param.contrastive_loss_param
        if param.legacy_version:
            mdist = param.margin - self.dist_sq
            beta = xp.where(mdist > 0, -1.0, 0.0)
        else:
            dist = xp.sqrt(self.dist_sq)
            mdist = param.margin - dist
            beta = xp.where(mdist > 0, -mdist / (dist + 1e-4), 0.0)
        factor = xp.where(self.similar, 1.0, beta).astype(self.delta.dtype)[:, None]
        grad = factor * self.delta * (top[0].diff / num)
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                bottom[i].diff[...] = (sign * grad).reshape(bottom[i].shape)


@register
class InfogainLoss(LossLayer):
    """loss = -Σ_positions Σ_l H[label, l]·log(max(p_l, 1e-20)) / normaliser, p = softmax(x).

    BVLC master applies the softmax itself (along ``infogain_loss_param.axis``), so the first
    bottom holds scores, as for SoftmaxWithLoss. H is (C, C): a third bottom, or a BlobProto
    file ``infogain_loss_param.source`` (read once at setup, path relative to the working
    directory). ignore_label and ``loss_param.normalization`` (default VALID) as in
    SoftmaxWithLoss; the deprecated ``normalize`` is refused, as Caffe does.
    Gradient: (p_k·Σ_l H[label, l] - H[label, k])·loss_weight/normaliser, zero where ignored.
    An optional second top receives p. Neither labels nor H get gradients.
    """

    type = "InfogainLoss"
    exact_bottoms = None
    min_bottoms = 2
    max_bottoms = 3
    exact_tops = None
    min_tops = 1
    max_tops = 2

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        param = self.layer_param.loss_param
        if param.HasField("normalize"):
            raise self.fail("loss_param.normalize is deprecated and refused by InfogainLoss: "
                            "use loss_param.normalization")
        self.ignore_label = param.ignore_label if param.HasField("ignore_label") else None
        self.normalization = param.normalization
        self.matrix = None
        if len(bottom) < 3:
            source = self.layer_param.infogain_loss_param.source
            if not source:
                raise self.fail("needs the infogain matrix: a third bottom or "
                                "infogain_loss_param.source")

            try:
                proto = read_binary_proto(source, caffe_pb2.BlobProto())
                values = blob_from_proto(proto, dtype=self.dtype)
            except NetEngineError as err:
                raise err.with_context(layer=self.name, layer_type=self.type) from None
            self.matrix = Blob(values.shape, dtype=self.dtype, xp=self.xp)
            self.matrix.data[...] = self.xp.asarray(values)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        score = bottom[0]
        self.axis = _class_axis(self, score, self.layer_param.infogain_loss_param.axis,
                                "infogain_loss_param.axis")
        self.outer, self.inner = _outer_inner(self, score, bottom[1], self.axis)
        classes = score.shape[self.axis]
        matrix = bottom[2] if len(bottom) > 2 else self.matrix
        if matrix.count != classes * classes:
            raise self.fail(f"the infogain matrix H must be {classes}x{classes} (one row and "
                            f"column per class), got shape {matrix.shape}")
        if len(top) > 1:
            top[1].reshape(score.shape)

    def _h(self, bottom: list[Blob]):
        matrix = bottom[2] if len(bottom) > 2 else self.matrix
        classes = bottom[0].shape[self.axis]
        return matrix.data.reshape(classes, classes)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        classes = bottom[0].shape[self.axis]
        prob = _softmax(xp, bottom[0].data, self.axis).reshape(self.outer, classes, self.inner)
        labels, valid = _labels(self, bottom[1], classes, self.ignore_label)
        labels = labels.reshape(self.outer, self.inner)
        valid = valid.reshape(self.outer, self.inner)
        rows = xp.moveaxis(self._h(bottom)[labels], 2, 1)  # H[label] as (outer, C, inner)
        terms = (rows * xp.log(xp.maximum(prob, 1e-20))).sum(axis=1)
        self.normalizer = _normalizer(xp, self.normalization, self.outer, self.inner,
                                      valid.sum(), prob.dtype)
        top[0].data[...] = -xp.where(valid, terms, 0).sum() / self.normalizer
        self.prob, self.labels, self.valid = prob, labels, valid
        if len(top) > 1:
            top[1].data[...] = prob.reshape(bottom[0].shape)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        _refuse_label_gradient(self, propagate_down)
        if len(propagate_down) > 2 and propagate_down[2]:
            raise self.fail("cannot back-propagate to the infogain matrix (bottom 2)")
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        h = self._h(bottom)
        rows = xp.moveaxis(h[self.labels], 2, 1)
        row_sums = h.sum(axis=1)[self.labels][:, None, :]
        grad = self.prob * row_sums - rows
        grad *= self.valid[:, None, :]
        grad *= top[0].diff / self.normalizer
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register
class Accuracy(Layer):
    """Fraction of non-ignored positions whose label is among the top_k scores.

    Scores have the class axis at ``accuracy_param.axis``; labels hold outer·inner values.
    Caffe's rule (accuracy_layer.cpp): count the classes *other than the true one* whose score
    is >= the true class's score; the position is correct if that count < top_k. So ties
    count against the label. (Caffe's golden README phrases it as "strictly larger"; the
    golden cases have no ties, and Caffe's source uses >=.) Result is correct/non-ignored
    (0 when every label is ignored). An optional second top gets per-class accuracy (C,)
    (0 for classes that never occur). No backward.
    """

    type = "Accuracy"
    exact_bottoms = 2
    min_tops = 1
    max_tops = 2

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        param = self.layer_param.accuracy_param
        self.top_k = param.top_k
        self.ignore_label = param.ignore_label if param.HasField("ignore_label") else None

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        score = bottom[0]
        self.axis = _class_axis(self, score, self.layer_param.accuracy_param.axis,
                                "accuracy_param.axis")
        self.outer = score.count_range(0, self.axis)
        self.inner = score.count_range(self.axis + 1)
        classes = score.shape[self.axis]
        if self.top_k > classes:
            raise self.fail(f"accuracy_param.top_k ({self.top_k}) must not exceed the number "
                            f"of classes ({classes})")
        if bottom[1].count != self.outer * self.inner:
            raise self.fail(f"number of labels must match the number of predictions: scores "
                            f"{score.shape} with class axis {self.axis} need "
                            f"{self.outer * self.inner} labels, got {bottom[1].count}")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((classes,))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        classes = bottom[0].shape[self.axis]
        score = bottom[0].data.reshape(self.outer, classes, self.inner)
        labels, valid = _labels(self, bottom[1], classes, self.ignore_label)
        labels = labels.reshape(self.outer, 1, self.inner)
        valid = valid.reshape(-1)
        true_score = xp.take_along_axis(score, labels, axis=1)
        better = (score >= true_score).sum(axis=1).reshape(-1) - 1
        correct = (better < self.top_k) & valid
        dtype = bottom[0].dtype
        count = valid.sum()
        top[0].data[...] = xp.where(count > 0, correct.sum() / xp.maximum(count, 1), 0)
        if len(top) > 1:
            flat = labels.reshape(-1)
            hits = xp.bincount(flat, weights=correct.astype(dtype), minlength=classes)
            seen = xp.bincount(flat, weights=valid.astype(dtype), minlength=classes)
            top[1].data[...] = hits / xp.maximum(seen, 1)
