"""Images for ImageData and WindowData: ``decode_image`` / ``read_image`` load a file as
OpenCV's imread does (uint8, BGR or gray) with Pillow (``pip install 'netengine[images]'``);
``resize_image`` is OpenCV's bilinear INTER_LINEAR resize.
"""
from __future__ import annotations

import io as _io
import os
from pathlib import Path

import numpy as np

from netengine.errors import NetEngineError


# -- images (ImageData, WindowData) ---------------------------------------------------------------
def import_pillow():
    """Pillow's ``Image`` module, or a one-line error saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise NetEngineError("reading images needs the Pillow package: "
                             "pip install 'netengine[images]' (or pip install pillow)") from None
    return Image


def decode_image(data: bytes | str | os.PathLike, is_color: bool | None = True,
                 name: str | None = None) -> np.ndarray:
    """An image file (path or its bytes) as uint8 (C, H, W), the way OpenCV's imread loads it.

    ``is_color``: 3 channels in **BGR** order (gray images are replicated, alpha dropped);
    False: 1 channel of luma (0.299 R + 0.587 G + 0.114 B); None: as stored (gray stays
    gray, Caffe's native decode of an encoded Datum). Needs Pillow.
    """
    image_module = import_pillow()
    name = name or (str(data) if not isinstance(data, bytes) else "image")
    if not isinstance(data, bytes):
        try:
            data = Path(data).read_bytes()
        except FileNotFoundError:
            raise NetEngineError(f"image file not found: {name}") from None
        except OSError as err:
            raise NetEngineError(f"cannot read image {name}: {err.strerror or err}") from None
    try:
        with image_module.open(_io.BytesIO(data)) as image:
            if is_color is None:
                is_color = image.mode not in _GRAY_MODES
            image = _as_8bit(_upright(image))
            pixels = np.asarray(image.convert("RGB" if is_color else "L"), dtype=np.uint8)
    except Exception as err:  # Pillow's UnidentifiedImageError, OSError, ValueError ...
        reason = ("not an image format Pillow can read"
                  if type(err).__name__ == "UnidentifiedImageError" else str(err))
        raise NetEngineError(f"cannot decode image {name}: {reason}") from None
    if is_color:
        return np.ascontiguousarray(pixels[:, :, ::-1].transpose(2, 0, 1))
    return pixels[None]


_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _upright(image):
    """The image turned as its EXIF orientation says (OpenCV's imread does so since 3.1)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def _as_8bit(image):
    """16/32-bit single-channel images reduced to 8 bits by their high byte, as OpenCV's
    8-bit imread gets them from libpng (Pillow's convert would clip at 255 instead)."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L"):
        return image
    from PIL import Image

    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
    return Image.fromarray(values.astype(np.uint8))  # 2-D uint8: mode L


def linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (low, high) and weight of high for OpenCV's INTER_LINEAR along one axis:
    pixel centres aligned (x = (i + 0.5)·in/out − 0.5), edges clamped."""
    pos = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    low = np.floor(pos).astype(np.int64)
    frac = pos - low
    frac[low < 0] = 0.0
    low[low < 0] = 0
    edge = low >= size_in - 1
    frac[edge] = 0.0
    low[edge] = size_in - 1
    return low, np.minimum(low + 1, size_in - 1), frac


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 (C, H, W) image to (C, height, width), as OpenCV's
    ``cv::resize`` with INTER_LINEAR (results rounded to uint8; within 1 of OpenCV's
    fixed-point arithmetic)."""
    channels, h, w = image.shape
    if (h, w) == (height, width):
        return image
    y0, y1, fy = linear_taps(h, height)
    x0, x1, fx = linear_taps(w, width)
    x = image.astype(np.float32)
    rows = x[:, y0] * (1 - fy)[:, None].astype(np.float32) + x[:, y1] * fy[:, None].astype(
        np.float32)
    out = rows[:, :, x0] * (1 - fx).astype(np.float32) + rows[:, :, x1] * fx.astype(np.float32)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike, height: int = 0, width: int = 0,
               is_color: bool = True) -> np.ndarray:
    """Caffe's ReadImageToCVMat: decode ``path`` (see ``decode_image``), then resize to
    height × width when both are non-zero."""
    image = decode_image(path, is_color)
    if height > 0 and width > 0:
        image = resize_image(image, height, width)
    return image
