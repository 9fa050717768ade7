"""pycaffe's ``caffe.io``: image loading and resizing, the input Transformer, 10-crop
oversampling and BlobProto / Datum conversions, so classification scripts port unchanged.

``import netengine as caffe; caffe.io`` reaches this module (Caffe's own file formats live in
:mod:`netengine.formats`). Images are float32 (H, W, K) in [0, 1] and RGB order, as pycaffe's
``load_image`` gives them; Pillow (the ``images`` extra) decodes them.

Differences from pycaffe, which used scikit-image: ``load_image(color=False)`` converts with
ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B; scikit-image weights 0.2125/0.7154/0.0721), and
``resize_image`` interpolates bilinearly with pixel centres aligned and no anti-aliasing
(``interp_order`` 0 or 1 only), as OpenCV's INTER_LINEAR does.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from netengine.data import db
from netengine.data.images import import_pillow, linear_taps
from netengine.errors import NetEngineError
from netengine.proto import caffe_pb2


# -- images --------------------------------------------------------------------------------
def load_image(filename: str | os.PathLike, color: bool = True) -> np.ndarray:
    """An image file as float32 (H, W, 3) RGB in [0, 1], or (H, W, 1) gray with
    ``color=False``."""
    image_module = import_pillow()
    try:
        with image_module.open(filename) as image:
            wide = _WIDE_MODES.get(image.mode)
            if image.mode == "I" and image.format == "PNG":  # a 16-bit PNG, as older Pillows
                wide = 65535.0                                # open them
            if wide is not None:  # one channel of 16/32 bits: Pillow's convert would clip
                pixels = np.asarray(image, dtype=np.float32) / wide
                pixels = pixels[:, :, None]
                return np.repeat(pixels, 3, axis=2) if color else pixels
            pixels = np.asarray(image.convert("RGB" if color else "L"), dtype=np.float32)
    except FileNotFoundError:
        raise NetEngineError(f"image file not found: {filename}") from None
    except Exception as err:  # Pillow's UnidentifiedImageError, OSError, ...
        raise NetEngineError(f"cannot decode image {filename}: {err}") from None
    pixels /= 255.0
    return pixels if color else pixels[:, :, None]


# Pillow's single-channel modes wider than 8 bits, and the value that maps to 1.0 (as
# scikit-image's img_as_float scales them).
_WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 2147483647.0,
               "F": 1.0}


def resize_image(im: np.ndarray, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """(H, W, K) ``im`` resized to ``new_dims`` (height, width), float32; ``interp_order``
    0 = nearest, 1 = bilinear."""
    im = np.asarray(im, dtype=np.float32)
    if im.ndim != 3:
        raise NetEngineError(f"resize_image needs an (H, W, K) image, got shape {im.shape}")
    height, width = (int(d) for d in new_dims)
    if (height, width) == im.shape[:2]:
        return im.copy()
    if interp_order == 0:
        rows = _nearest(im.shape[0], height)
        cols = _nearest(im.shape[1], width)
        return im[rows][:, cols]
    if interp_order != 1:
        raise NetEngineError(f"resize_image: interp_order {interp_order} is not supported "
                             "(0 nearest, 1 bilinear)")
    y0, y1, fy = linear_taps(im.shape[0], height)
    x0, x1, fx = linear_taps(im.shape[1], width)
    fy = fy.astype(np.float32)[:, None, None]
    fx = fx.astype(np.float32)[None, :, None]
    rows = im[y0] * (1 - fy) + im[y1] * fy
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def _nearest(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel's centre."""
    pos = np.floor((np.arange(size_out) + 0.5) * (size_in / size_out)).astype(np.int64)
    return np.minimum(pos, size_in - 1)


def oversample(images: Sequence[np.ndarray], crop_dims: Sequence[int]) -> np.ndarray:
    """pycaffe's 10 crops per (H, W, K) image: the four corners and the centre, then the
    same five mirrored left-right; returns (10·N, crop_h, crop_w, K) float32."""
    crop_h, crop_w = (int(d) for d in crop_dims)
    height, width, channels = images[0].shape
    if crop_h > height or crop_w > width:
        raise NetEngineError(f"oversample: crop {crop_h}x{crop_w} is larger than the images "
                             f"({height}x{width})")
    # The centre crop starts at int(centre - crop/2), as pycaffe's float arithmetic truncates.
    corners = [(0, 0), (0, width - crop_w), (height - crop_h, 0),
               (height - crop_h, width - crop_w),
               (int(height / 2.0 - crop_h / 2.0), int(width / 2.0 - crop_w / 2.0))]
    crops = np.empty((10 * len(images), crop_h, crop_w, channels), dtype=np.float32)
    for i, image in enumerate(images):
        for k, (top, left) in enumerate(corners):
            crop = image[top:top + crop_h, left:left + crop_w, :]
            crops[10 * i + k] = crop
            crops[10 * i + 5 + k] = crop[:, ::-1, :]
    return crops


# -- the input transformer -------------------------------------------------------------------
class Transformer:
    """pycaffe's ``caffe.io.Transformer``: turn (H, W, K) images into a net input's
    (K, H, W) layout and back.

    ``preprocess`` applies, in order: resize to the input's spatial size, ``transpose``,
    ``channel_swap``, ``raw_scale``, subtract ``mean``, ``input_scale``. ``deprocess`` undoes
    them in reverse order (except the resize).
    """

    def __init__(self, inputs: dict) -> None:
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
        self.transpose: dict = {}
        self.channel_swap: dict = {}
        self.raw_scale: dict = {}
        self.mean: dict = {}
        self.input_scale: dict = {}

    def _check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise NetEngineError(f"Transformer: '{in_}' is not one of the net inputs "
                                 f"({', '.join(self.inputs)})")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """(H, W, K) image → the input's (K, H', W') float32 array."""
        self._check_input(in_)
        caffe_in = np.asarray(data, dtype=np.float32)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if in_ in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
        if in_ in self.raw_scale:
            caffe_in = caffe_in * self.raw_scale[in_]
        if in_ in self.mean:
            caffe_in = caffe_in - self.mean[in_]
        if in_ in self.input_scale:
            caffe_in = caffe_in * self.input_scale[in_]
        return np.ascontiguousarray(caffe_in, dtype=np.float32)

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """The input's layout back to an (H, W, K) image."""
        self._check_input(in_)
        decaf_in = np.array(data, dtype=np.float32).squeeze()
        if in_ in self.input_scale:
            decaf_in /= self.input_scale[in_]
        if in_ in self.mean:
            decaf_in += self.mean[in_]
        if in_ in self.raw_scale:
            decaf_in /= self.raw_scale[in_]
        if in_ in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[in_]))
        return decaf_in

    def set_transpose(self, in_: str, order: Iterable[int]) -> None:
        """Axis order taking an image to the input's layout, e.g. (2, 0, 1) for HWK → KHW."""
        self._check_input(in_)
        order = tuple(order)
        if len(order) != len(self.inputs[in_]) - 1:
            raise NetEngineError(f"Transformer.set_transpose('{in_}'): {len(order)} axes given, "
                                 f"the input has {len(self.inputs[in_]) - 1} per item")
        self.transpose[in_] = order

    def set_channel_swap(self, in_: str, order: Iterable[int]) -> None:
        """Channel order after the transpose, e.g. (2, 1, 0) for RGB → BGR."""
        self._check_input(in_)
        order = tuple(order)
        if len(order) != self.inputs[in_][1]:
            raise NetEngineError(f"Transformer.set_channel_swap('{in_}'): {len(order)} "
                                 f"channels given, the input has {self.inputs[in_][1]}")
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Multiply by ``scale`` before the mean is subtracted (255 for [0, 1] images)."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """Subtract ``mean``: one value per channel (K,) or a whole (K, H, W) image."""
        self._check_input(in_)
        mean = np.asarray(mean, dtype=np.float32)
        channels, spatial = self.inputs[in_][1], self.inputs[in_][2:]
        if mean.ndim == 1:
            if mean.shape[0] != channels:
                raise NetEngineError(f"Transformer.set_mean('{in_}'): {mean.shape[0]} channel "
                                     f"means given, the input has {channels} channels")
            mean = mean[:, None, None]
        elif (mean.shape if mean.ndim == 3 else (1, *mean.shape)) != (channels, *spatial):
            raise NetEngineError(f"Transformer.set_mean('{in_}'): mean shape {mean.shape} "
                                 f"does not match the input's {(channels, *spatial)}")
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Multiply by ``scale`` after the mean is subtracted."""
        self._check_input(in_)
        self.input_scale[in_] = scale


# -- protos ------------------------------------------------------------------------------------
def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff) in its shape (legacy num/channels/height/width first)."""
    values = np.array(blob.diff if return_diff else blob.data)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return values.reshape(blob.num, blob.channels, blob.height, blob.width)
    return values.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None):
    """An array (and optionally its diff) as a BlobProto with a BlobShape."""
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(np.shape(arr))
    blob.data.extend(np.asarray(arr, dtype=np.float64).flat)
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float64).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist: Iterable[np.ndarray]) -> bytes:
    """Serialised BlobProtoVector of the arrays."""
    vector = caffe_pb2.BlobProtoVector()
    vector.blobs.extend(array_to_blobproto(arr) for arr in arraylist)
    return vector.SerializeToString()


def blobprotovector_str_to_arraylist(serialized: bytes) -> list[np.ndarray]:
    """The arrays of a serialised BlobProtoVector."""
    vector = caffe_pb2.BlobProtoVector()
    vector.ParseFromString(serialized)
    return [blobproto_to_array(blob) for blob in vector.blobs]


def array_to_datum(arr: np.ndarray, label: int | None = None):
    """A (C, H, W) array as a Datum: uint8 arrays as bytes in ``data``, others as
    ``float_data`` (the engine's own conversion; pycaffe leaves ``label`` unset when None)."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise NetEngineError(f"array_to_datum needs a (C, H, W) array, got shape {arr.shape}")
    datum = db.array_to_datum(arr, 0 if label is None else label)
    if label is None:
        datum.ClearField("label")
    return datum


def datum_to_array(datum) -> np.ndarray:
    """A Datum's values as (C, H, W): uint8 from ``data``, float64 from ``float_data``
    (pycaffe's types; a writable copy)."""
    values, _ = db.datum_to_array(datum)
    return values.copy() if values.dtype == np.uint8 else values.astype(np.float64)


__all__ = ["Transformer", "array_to_blobproto", "array_to_datum",
           "arraylist_to_blobprotovector_str", "blobproto_to_array",
           "blobprotovector_str_to_arraylist", "datum_to_array", "load_image", "oversample",
           "resize_image"]
