"""pycaffe's ``caffe.Classifier``: a TEST-phase Net that takes (H, W, K) images, resizes them,
crops (the centre, or pycaffe's 10 crops averaged) and returns the first output per image."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from netengine import io
from netengine.io import Transformer, resize_image
from netengine.net import TEST, Net


class Classifier(Net):
    """``Classifier(model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None)``: the Transformer of the first input is set up from
    these (transpose HWK → KHW always), crops are the input blob's spatial size and images
    are first resized to ``image_dims`` (default: the crop size)."""

    def __init__(self, model_file, pretrained_file, image_dims: Sequence[int] | None = None,
                 mean: np.ndarray | None = None, input_scale: float | None = None,
                 raw_scale: float | None = None,
                 channel_swap: Sequence[int] | None = None) -> None:
        super().__init__(model_file, TEST, weights=pretrained_file)
        in_ = self.inputs[0]
        self.transformer = Transformer({in_: self.blobs[in_].shape})
        self.transformer.set_transpose(in_, (2, 0, 1))
        if mean is not None:
            self.transformer.set_mean(in_, mean)
        if input_scale is not None:
            self.transformer.set_input_scale(in_, input_scale)
        if raw_scale is not None:
            self.transformer.set_raw_scale(in_, raw_scale)
        if channel_swap is not None:
            self.transformer.set_channel_swap(in_, channel_swap)
        self.crop_dims = np.array(self.blobs[in_].shape[2:])
        self.image_dims = np.array(image_dims if image_dims is not None else self.crop_dims)

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """Class scores (N, outputs) for N (H, W, K) images; with ``oversample`` the mean
        over each image's 10 crops, else the centre crop's."""
        height, width = (int(d) for d in self.image_dims)
        images = np.stack([resize_image(image, (height, width)) for image in inputs])
        if oversample:
            crops = io.oversample(images, self.crop_dims)
        else:
            crop_h, crop_w = (int(d) for d in self.crop_dims)
            top, left = int(height / 2.0 - crop_h / 2.0), int(width / 2.0 - crop_w / 2.0)
            crops = images[:, top:top + crop_h, left:left + crop_w, :]
        in_ = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(in_, crop) for crop in crops])
        scores = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        if oversample:
            scores = scores.reshape(len(scores) // 10, 10, -1).mean(axis=1)
        return scores
