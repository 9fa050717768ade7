"""Layer base classes and the one registry keyed by the prototxt ``type`` string.

A layer sees only its bottoms, tops, its learned ``blobs`` and its LayerParameter. The life
cycle is Caffe's: ``setup`` once (blob-count checks, ``layer_setup``, ``reshape``, loss
weights), then per pass ``forward`` (which re-runs ``reshape``) and ``backward``.
Layers compute with ``bottom[0].xp`` (NumPy or CuPy) and the bottoms' dtype, never a fixed one.
"""
from __future__ import annotations

import difflib

import numpy as np

from netengine import backend, fillers
from netengine.blob import Blob
from netengine.errors import LayerError

REGISTRY: dict[str, type[Layer]] = {}

# Layer types a user may bring from well-known Caffe forks; BVLC Caffe has none of them.
FORK_LAYER_TYPES = {
    "BN": "caffe-segnet", "Upsample": "caffe-segnet", "DenseImageData": "caffe-segnet",
    "ConvolutionDepthwise": "a MobileNet fork", "DepthwiseConvolution": "a MobileNet fork",
    "Interp": "DeepLab/PSPNet", "Normalize": "SSD", "PriorBox": "SSD", "Permute": "SSD",
    "DetectionOutput": "SSD", "ShuffleChannel": "ShuffleNet", "ROIPooling": "Fast R-CNN",
}


def register(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make ``cls`` the implementation of prototxt type ``cls.type``."""
    if not cls.type:
        raise TypeError(f"{cls.__name__} has no prototxt type")
    REGISTRY[cls.type] = cls
    return cls


def layer_type_list() -> list[str]:
    """Every registered layer type, sorted (pycaffe's ``layer_type_list``); importing the
    ``netengine.layers`` package registers every family."""
    return sorted(REGISTRY)


def layer_class(type_name: str) -> type[Layer]:
    """The class for ``type_name``, or a LayerError naming the closest known types."""
    known = layer_type_list()
    if type_name in REGISTRY:
        return REGISTRY[type_name]
    if type_name in FORK_LAYER_TYPES:
        raise LayerError(f"BVLC Caffe has no layer type '{type_name}' (it comes from "
                         f"{FORK_LAYER_TYPES[type_name]}, a Caffe fork); netengine follows BVLC")
    close = difflib.get_close_matches(type_name, known, n=3, cutoff=0.5)
    lowered = {k.lower(): k for k in known}
    if type_name.lower() in lowered:
        close = [lowered[type_name.lower()]]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    # the full list is ~60 names: point at it rather than print one very long line
    raise LayerError(f"unknown layer type '{type_name}' (BVLC Caffe has no such type); {hint}"
                     f"all {len(known)} types: netengine summarize --layers, or docs/layers.md")


def create_layer(layer_param) -> Layer:
    """Instantiate the layer a LayerParameter describes (the net sets its phase first)."""
    return layer_class(layer_param.type)(layer_param)


class Layer:
    """One prototxt layer: setup, reshape, forward, backward over bottom and top blobs."""

    type: str = ""
    # Blob-count contract (Caffe's ExactNumBottomBlobs & co.); None means "not checked".
    exact_bottoms: int | None = None
    min_bottoms: int | None = None
    max_bottoms: int | None = None
    exact_tops: int | None = None
    min_tops: int | None = None
    max_tops: int | None = None
    equal_bottom_top: bool = False
    auto_top_blobs: bool = False  # may leave its tops unnamed: the net names them
    allows_inplace: bool = True  # Flatten/Reshape share memory, so they refuse top == bottom
    # In place, a later in-place layer with ``rewrites_in_place`` changes the values that an
    # earlier one with ``backward_reads_output`` reads in its backward: the net warns.
    backward_reads_output: bool = False
    rewrites_in_place: bool = False
    is_input: bool = False  # tops are net inputs (Input layer)
    pad_loss_weights: bool = False  # extra tops (e.g. probabilities) get loss weight 0
    search_dirs: tuple = ()  # folders for relative paths (the net sets the prototxt's folder)

    def __init__(self, layer_param) -> None:
        self.layer_param = layer_param
        self.phase: int = layer_param.phase
        self.blobs: list[Blob] = []
        self.param_propagate_down: list[bool] = []
        self.loss_weights: list[float] = []
        self.dtype = np.dtype(np.float32)
        self.xp = backend.xp()

    # -- identity and errors -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.layer_param.name

    def fail(self, message: str, kind: type[LayerError] = LayerError) -> LayerError:
        """A LayerError (or subclass ``kind``) naming this layer; ``raise self.fail("...")``."""
        return kind(message, layer=self.name, layer_type=self.type)

    def __repr__(self) -> str:
        return f"<{self.type} layer '{self.name}'>"

    # -- life cycle --------------------------------------------------------------------------
    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Caffe's SetUp: check blob counts, layer_setup, reshape, loss weights."""
        self.check_blob_counts(bottom, top)
        if bottom or top:
            self.dtype = (bottom or top)[0].dtype
            self.xp = (bottom or top)[0].xp
        self.layer_setup(bottom, top)
        self.reshape(bottom, top)
        self.set_loss_weights(top)
        while len(self.param_propagate_down) < len(self.blobs):
            self.param_propagate_down.append(True)

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        """One-time setup: read the *_param message, create learned blobs."""

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Shape the tops (and work buffers) for the bottoms' current shapes."""
        raise NotImplementedError

    def forward(self, bottom: list[Blob], top: list[Blob]) -> float:
        """Reshape, compute, and return this layer's weighted loss contribution."""
        self.reshape(bottom, top)
        self.compute_forward(bottom, top)
        loss = 0.0
        for i, weight in enumerate(self.loss_weights):
            if weight:
                top[i].diff[...] = weight
                loss += float((top[i].data * top[i].diff).sum())
        return loss

    def backward(self, top: list[Blob], propagate_down: list[bool], bottom: list[Blob]) -> None:
        self.compute_backward(top, propagate_down, bottom)

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError

    def compute_backward(self, top: list[Blob], propagate_down: list[bool],
                         bottom: list[Blob]) -> None:
        if any(propagate_down):
            raise self.fail("this layer cannot back-propagate to its bottoms")

    def allow_force_backward(self, bottom_index: int) -> bool:
        """Whether ``force_backward`` may ask for this bottom's gradient (not for labels)."""
        return True

    # -- helpers for subclasses --------------------------------------------------------------
    def check_blob_counts(self, bottom: list[Blob], top: list[Blob]) -> None:
        def need(what: str, n: int, exact, low, high) -> None:
            if exact is not None and n != exact:
                raise self.fail(f"expects exactly {exact} {what} blob(s), got {n}")
            if low is not None and n < low:
                raise self.fail(f"expects at least {low} {what} blob(s), got {n}")
            if high is not None and n > high:
                raise self.fail(f"expects at most {high} {what} blob(s), got {n}")

        need("bottom", len(bottom), self.exact_bottoms, self.min_bottoms, self.max_bottoms)
        need("top", len(top), self.exact_tops, self.min_tops, self.max_tops)
        if self.equal_bottom_top and len(bottom) != len(top):
            raise self.fail(f"expects as many tops as bottoms, got {len(bottom)} bottom(s) "
                            f"and {len(top)} top(s)")

    def set_loss_weights(self, top: list[Blob]) -> None:
        """Store each top's loss weight in its diff, as Caffe does (backward reads it there)."""
        weights = list(self.layer_param.loss_weight)
        if not weights:
            self.loss_weights = [0.0] * len(top)
            return
        if self.pad_loss_weights and len(weights) < len(top):
            weights += [0.0] * (len(top) - len(weights))
        if len(weights) != len(top):
            raise self.fail(f"loss_weight must be given once per top blob or not at all: "
                            f"{len(weights)} loss_weight(s) for {len(top)} top(s)")
        self.loss_weights = [float(w) for w in weights]
        for blob, weight in zip(top, self.loss_weights):
            if weight:
                blob.diff[...] = weight

    def make_blob(self, shape, filler=None, like: Blob | None = None) -> Blob:
        """A new learned blob of ``shape`` in this layer's dtype and array module, filled."""
        blob = Blob(tuple(shape), dtype=self.dtype, xp=like.xp if like is not None else self.xp)
        if filler is not None:
            try:
                fillers.fill(blob, filler)
            except LayerError as err:
                raise err.with_context(layer=self.name, layer_type=self.type) from None
        return blob

    def setup_weight_and_bias(self, weight_shape: tuple, bias_shape: tuple | None,
                              param) -> None:
        """Create the weight (and bias) blobs from ``param``'s weight_filler/bias_filler, or
        check the shapes of blobs given already (loaded or shared)."""
        shapes = [tuple(weight_shape)] + ([tuple(bias_shape)] if bias_shape is not None else [])
        if self.has_given_blobs(len(shapes)):
            for name, blob, shape in zip(("weight", "bias"), self.blobs, shapes):
                if blob.shape != shape:
                    raise self.fail(f"incorrect {name} shape: expected {shape}, got {blob.shape}")
            return
        self.blobs = [self.make_blob(shapes[0], param.weight_filler)]
        if bias_shape is not None:
            self.blobs.append(self.make_blob(shapes[1], param.bias_filler))

    def has_given_blobs(self, count: int) -> bool:
        """True when blobs already exist (loaded or shared); checks their number."""
        if not self.blobs:
            return False
        if len(self.blobs) != count:
            raise self.fail(f"has {len(self.blobs)} learned blob(s), expected {count}")
        return True


class NeuronLayer(Layer):
    """An element-wise layer: one bottom, one top of the same shape; may run in place."""

    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)


class LossLayer(Layer):
    """Two bottoms (prediction, target), a scalar top; loss_weight defaults to 1 on top 0."""

    exact_bottoms = 2
    exact_tops = 1
    auto_top_blobs = True
    pad_loss_weights = True

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        if not self.layer_param.loss_weight:
            # Caffe records the default in the layer's own parameters (so it is saved too).
            self.layer_param.loss_weight.append(1.0)
        super().setup(bottom, top)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.fail(f"the bottoms must have the same number of items (axis 0): "
                            f"{bottom[0].shape} vs {bottom[1].shape}")
        top[0].reshape(())

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1
