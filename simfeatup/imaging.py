"""Image I/O, preprocessing and window geometry (SPEC 2.1, 2.2, 2.6).

numpy + OpenCV only -- no torch -- so the torch segmenter and the ONNX runtime share one
implementation of every pixel rule and agree to the label.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .constants import CLIP_MEAN, CLIP_STD, LONG_SIDE, STRIDE, WINDOW

TIFF_SUFFIXES = {".tif", ".tiff"}
STRETCHES = ("percentile", "minmax", "none")


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the fix."""


def load_image(path: str | Path, *, bands: tuple[int, ...] | None = None, stretch: str = "percentile") -> np.ndarray:
    """Read any jpg/png/tif as RGB uint8 (H, W, 3); see :func:`to_rgb_uint8` for the options."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        try:
            array = tifffile.imread(path)
        except Exception as err:  # tifffile raises many types for bad files
            raise ImageError(f"cannot read image {path}: {err}") from None
        # Multi-band GeoTIFFs are often stored band-first (bands, H, W).
        if array.ndim == 3 and array.shape[0] < min(array.shape[1:]) and array.shape[0] <= 16:
            array = np.moveaxis(array, 0, -1)
    else:
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ImageError(f"cannot read image {path}: not a readable jpg/png/tif file")
        if array.ndim == 3:  # OpenCV gives BGR(A)
            array = array[..., [2, 1, 0, 3][: array.shape[2]]] if array.shape[2] in (3, 4) else array
    if array.size == 0 or array.ndim not in (2, 3):
        raise ImageError(f"cannot read image {path}: no pixel data (shape {array.shape})")
    try:
        return to_rgb_uint8(array, bands=bands, stretch=stretch)
    except ImageError as err:
        raise ImageError(f"{path}: {err}") from None


def to_rgb_uint8(array: np.ndarray, *, bands: tuple[int, ...] | None = None, stretch: str = "percentile") -> np.ndarray:
    """Any image array (H, W), (H, W, 1|2|3|4|N), uint8/uint16/float -> RGB uint8 (H, W, 3).

    ``bands`` picks the three channels that are red, green, blue (e.g. ``(3, 2, 1)`` for a
    4+-band scene stored B, G, R, NIR ...); by default the first three (alpha is dropped).
    Non-uint8 data is stretched to 0..255: ``percentile`` (2nd-98th percentile per image,
    the usual for 16-bit imagery), ``minmax``, or ``none`` (floats in 0..1, integers
    divided by their type's maximum).
    """
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"expected an image of shape (H, W) or (H, W, bands), got {array.shape}")
    n = array.shape[2]
    if bands is not None:
        if len(bands) != 3 or any(not 0 <= b < n for b in bands):
            raise ImageError(f"bands={tuple(bands)} does not pick 3 of the image's {n} bands (0..{n - 1})")
        array = array[..., list(bands)]
    elif n in (1, 2):  # grayscale (+ alpha)
        array = np.repeat(array[..., :1], 3, axis=2)
    else:
        array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    return _stretch(array, stretch)


def _stretch(array: np.ndarray, stretch: str) -> np.ndarray:
    if stretch not in STRETCHES:
        raise ImageError(f"unknown stretch {stretch!r}; use one of {', '.join(STRETCHES)}")
    data = array.astype(np.float64)
    if stretch == "none":
        top = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else 1.0
        low, high = 0.0, float(top)
    elif stretch == "minmax":
        low, high = float(np.nanmin(data)), float(np.nanmax(data))
    else:
        low, high = (float(v) for v in np.nanpercentile(data, (2, 98)))
    scaled = (data - low) / max(high - low, 1e-12) * 255.0
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


def check_size(image: np.ndarray, patch_size: int, name: str | Path = "image") -> None:
    """Refuse images with a side shorter than one patch: there is nothing to look at."""
    h, w = image.shape[:2]
    if min(h, w) < patch_size:
        raise ImageError(f"{name} is {w}x{h} pixels, smaller than one {patch_size}-pixel patch: use an image of at least {patch_size}x{patch_size}")


def resized_shape(height: int, width: int, long_side: int = LONG_SIDE) -> tuple[int, int]:
    """SPEC 2.1: (h, w) after scaling the long side to ``long_side`` (600x360 -> 448x269)."""
    s = long_side / max(height, width)
    return int(height * s + 0.5), int(width * s + 0.5)


def resize_long_side(image: np.ndarray, long_side: int = LONG_SIDE) -> np.ndarray:
    """SPEC 2.1: uint8 resize with OpenCV's fixed-point bilinear (no antialias), BEFORE normalising."""
    h, w = resized_shape(*image.shape[:2], long_side)
    if (h, w) == image.shape[:2]:
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def normalise(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> CLIP-normalised float32 (3, H, W)."""
    mean = np.asarray(CLIP_MEAN, np.float32)
    std = np.asarray(CLIP_STD, np.float32)
    x = (image.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(image: np.ndarray, long_side: int = LONG_SIDE) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> resized, normalised float32 (3, h, w) (SPEC 2.1, in this order)."""
    return normalise(resize_long_side(image, long_side))


def window_starts(length: int, window: int = WINDOW, stride: int = STRIDE) -> list[int]:
    """SPEC 2.2: window starts along one axis; the last window is shifted back inside."""
    count = max(length - window + stride - 1, 0) // stride + 1
    starts = []
    for i in range(count):
        end = min(i * stride + window, length)
        starts.append(max(end - window, 0))
    return starts


def window_boxes(height: int, width: int, window: int = WINDOW, stride: int = STRIDE) -> list[tuple[int, int, int, int]]:
    """Every window as (y0, y1, x0, x1); windows are smaller than ``window`` on short sides."""
    return [
        (y0, min(y0 + window, height), x0, min(x0 + window, width))
        for y0 in window_starts(height, window, stride)
        for x0 in window_starts(width, window, stride)
    ]


def padding(size: int, multiple: int) -> tuple[int, int]:
    """SPEC 2.2: (before, after) zero padding up to the next multiple; before gets total // 2."""
    total = -size % multiple
    return total // 2, total - total // 2


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) float -> (C, h, w): bilinear, align_corners False, no antialias (SPEC 2.6).

    The same sampling as ``torch.nn.functional.interpolate(mode="bilinear")``.
    """
    out = x
    for axis, new in ((1, size[0]), (2, size[1])):
        old = out.shape[axis]
        if new == old:
            continue
        # torch computes fma(scale, dst + 0.5, -0.5) with a float32 scale and one final
        # float32 rounding; float64 holds that product exactly, so we sample where it does
        scale = np.float64(np.float32(old) / np.float32(new))
        src = ((np.arange(new) + 0.5) * scale - 0.5).astype(np.float32)
        src = np.maximum(src, np.float32(0))
        i0 = np.floor(src).astype(np.int64)
        i0 = np.minimum(i0, old - 1)
        i1 = np.minimum(i0 + 1, old - 1)
        frac = (src - i0).astype(out.dtype)
        shape = [1, 1, 1]
        shape[axis] = new
        frac = frac.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - frac) + np.take(out, i1, axis=axis) * frac
    return out
