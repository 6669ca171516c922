"""Image I/O, preprocessing and the final resize (SPEC 2.1, 2.6); windows are in :mod:`simfeatup.windows`.

numpy + OpenCV only -- no torch -- so the torch segmenter and the ONNX runtime share one
implementation of every pixel rule and agree to the label.
"""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from .constants import CLIP_MEAN, CLIP_STD, LONG_SIDE

IMAGE_EXTS = ("jpg", "png", "tif")  # encoded kinds decode_image reads
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")  # file names of those, matched case-insensitively
STRETCHES = ("percentile", "minmax")  # or a number: the value that maps to 255
PERCENTILES = (2.0, 98.0)  # the "percentile" stretch clips at these (per band)
STATS_MAX_PIXELS = 1 << 20  # stretch statistics on a strided subsample above this: same result, 10x faster


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the fix."""


def load_image(path: str | Path, *, bands=(0, 1, 2), stretch="percentile") -> np.ndarray:
    """Read a jpg/png/tif file as RGB uint8 (H, W, 3); the options are :func:`decode_image`'s."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    data = path.read_bytes()
    if sniff_image(data) is None:
        raise ImageError(f"cannot read image {path}: not a jpg, png or tif file")
    try:
        return decode_image(data, bands=bands, stretch=stretch)
    except ImageError as err:
        raise ImageError(f"cannot read image {path}: {err}") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                dims = dict(zip(tif.series[0].axes, tif.series[0].shape))
            return dims["Y"], dims["X"]
        from PIL import Image

        with Image.open(path) as im:
            return im.height, im.width
    except Exception as err:  # any decoder error on a damaged or foreign file
        raise ImageError(f"cannot read image {path}: {err}") from None


def check_file(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, from its first bytes and header alone (no pixels decoded); refuses
    a file that is no jpg/png/tif image. Cheap enough to run over a whole batch before the model
    loads; damage past the header is found when it is decoded."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if sniff_image(head) is None:
        raise ImageError(f"cannot read image {path}: not a jpg, png or tif file")
    return image_size(path)


def list_images(sources) -> list[Path]:
    """Image files among ``sources``: files as given, folders' images (not recursive) sorted by name."""
    out = []
    for src in map(Path, sources):
        if src.is_dir():
            out += sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(src)
    return out


def sniff_image(data: bytes) -> str | None:
    """The image kind of ``data`` from its magic bytes: "jpg", "png", "tif" or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF and BigTIFF
        return "tif"
    return None


def decode_image(data: bytes, ext: str | None = None, *, bands=(0, 1, 2), stretch="percentile") -> np.ndarray:
    """Decode an encoded image to RGB uint8 of shape (H, W, 3).

    ext: "jpg", "png" or "tif" (sniffed from the bytes when None). JPEG/PNG decode as RGB;
    grayscale is repeated to 3 channels and alpha is dropped. ``bands`` picks the TIFF bands
    (0-based) that become R, G, B, e.g. (2, 1, 0) for a Blue-Green-Red-NIR raster; a 1- or
    2-band TIFF is grayscale. Values that are not uint8 (16-bit, float) are mapped to 0..255 by
    ``stretch``: "percentile" (2-98 % per band), "minmax" (per band) or a number (the value
    that becomes 255, e.g. 2047 for 11-bit data). Raises :class:`ImageError` for anything
    that cannot be decoded.
    """
    kind = {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext) if ext else sniff_image(data)
    if kind not in IMAGE_EXTS:
        raise ImageError(f"not an image: unknown format {kind!r} (expected one of {IMAGE_EXTS})")
    try:
        arr = _read_tiff(data) if kind == "tif" else _read_pil(data)
    except Exception as err:  # decoders of untrusted bytes raise any type (IndexError, struct.error, ...)
        raise ImageError(f"cannot decode {kind}: {err}") from None
    if arr.size == 0:
        raise ImageError(f"cannot decode {kind}: no pixel data")
    if kind == "tif":
        arr = _select_bands(arr, bands)
    return _to_uint8(arr, stretch)


def _read_pil(data: bytes) -> np.ndarray:
    # PIL (not cv2) because PIL raises on a truncated JPEG where cv2 returns a half-grey image.
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGB", "L", "I;16", "I;16B", "I", "F"):
            arr = np.asarray(im)
        elif im.mode in ("LA", "La"):
            arr = np.asarray(im.getchannel(0))
        else:  # P, RGBA, CMYK, YCbCr, ...: alpha is dropped
            arr = np.asarray(im.convert("RGB"))
    return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=-1)


def _read_tiff(data: bytes) -> np.ndarray:
    """(H, W, C) array of any dtype; C is the band count."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            arr, axes = series.asarray(), series.axes
    except ValueError as err:
        if "imagecodecs" not in str(err):
            raise
        return _read_tiff_cv2(data, err)  # compressed (LZW, Deflate) without imagecodecs
    axes = "".join(a for a, n in zip(axes, arr.shape) if n > 1) or "YX"
    arr = arr.squeeze() if arr.size > 1 else arr.reshape(1, 1)
    if arr.ndim == 2:
        return arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"unsupported TIFF layout: axes {series.axes!r}, shape {series.shape}")
    band_axis = next((i for i, a in enumerate(axes) if a in "SCIQ"), 2)  # samples/channels/pages
    return np.moveaxis(arr, band_axis, -1)


def _read_tiff_cv2(data: bytes, err: Exception) -> np.ndarray:
    import cv2
    from cv2.utils import logging as cv_log  # OpenCV 4 and 5 (5 dropped cv2.getLogLevel)

    level = cv_log.getLogLevel()
    cv_log.setLogLevel(cv_log.LOG_LEVEL_ERROR)  # GeoTIFF tags make libtiff warn on every read
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    finally:
        cv_log.setLogLevel(level)
    if arr is None:
        raise ValueError(f"{err}; OpenCV could not read it either (`pip install imagecodecs`)")
    if arr.ndim == 2:
        return arr[..., None]
    return arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # OpenCV gives BGR(A)


def _select_bands(arr: np.ndarray, bands) -> np.ndarray:
    n = arr.shape[-1]
    if n <= 2:  # gray or gray + alpha
        return np.repeat(arr[..., :1], 3, axis=-1)
    bands = tuple(int(b) for b in bands)
    if len(bands) != 3 or not all(0 <= b < n for b in bands):
        raise ImageError(f"bands={bands} does not fit a {n}-band image: give 3 indices in 0..{n - 1}")
    return arr[..., bands]


def _to_uint8(arr: np.ndarray, stretch) -> np.ndarray:
    """(H, W, 3) any dtype -> (H, W, 3) uint8."""
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    lo, hi = stretch_limits(arr.reshape(-1, 3), stretch)
    return apply_stretch(arr, lo, hi)


def stretch_limits(pixels: np.ndarray, stretch) -> tuple[np.ndarray, np.ndarray]:
    """The per-band values (lo, hi) that ``stretch`` maps to 0 and 255, from (N, 3) pixels of any dtype.

    ``stretch``: "percentile" (the PERCENTILES of each band), "minmax", or a number (the value
    that maps to 255; lo is 0). All-zero pixels do not count (nodata in most rasters), unless
    every pixel is zero. Above STATS_MAX_PIXELS an evenly strided subsample is used.
    """
    if isinstance(stretch, str) and stretch in STRETCHES:
        sample = pixels if len(pixels) <= STATS_MAX_PIXELS else pixels[:: len(pixels) // STATS_MAX_PIXELS]
        sample = _finite_float(sample)
        valid = sample[(sample != 0).any(axis=1)]
        sample = valid if len(valid) else sample
        if stretch == "percentile":
            return np.percentile(sample, PERCENTILES, axis=0)
        return sample.min(axis=0), sample.max(axis=0)
    try:
        top = float(stretch)
    except (TypeError, ValueError):
        raise ImageError(
            f"stretch={stretch!r}: use one of {STRETCHES} or a number (the value that maps to 255)"
        ) from None
    if top <= 0:
        raise ImageError(f"stretch={stretch!r}: a fixed stretch must be > 0")
    return np.zeros(3, np.float32), np.full(3, top, np.float32)


def apply_stretch(arr: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(..., 3) any dtype -> uint8: ``lo`` -> 0 and ``hi`` -> 255 per band, clipped; NaN and inf -> 0 first."""
    x = _finite_float(arr)
    scale = 255.0 / np.maximum(hi - lo, 1e-6)
    return np.clip((x - lo) * scale + 0.5, 0, 255).astype(np.uint8)


def _finite_float(arr: np.ndarray) -> np.ndarray:
    return np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def check_size(image: np.ndarray, patch_size: int, name: str | Path = "image") -> None:
    """Refuse images with a side shorter than one patch: there is nothing to look at."""
    check_sides(*image.shape[:2], patch_size, name)


def check_sides(h: int, w: int, patch_size: int, name: str | Path = "image") -> None:
    """:func:`check_size` from a height and width (e.g. a header's)."""
    if min(h, w) < patch_size:
        raise ImageError(
            f"{name} is {w}x{h} pixels, smaller than one {patch_size}-pixel patch: "
            f"use an image of at least {patch_size}x{patch_size}"
        )


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


def resize_bilinear(x: np.ndarray, size: tuple[int, int], rows: tuple[int, int] | None = None) -> np.ndarray:
    """(C, H, W) float -> (C, h, w): bilinear, align_corners False, no antialias (SPEC 2.6).

    The same sampling as ``torch.nn.functional.interpolate(mode="bilinear")``. ``rows=(r0, r1)``
    gives only output rows r0..r1-1, bit-identical to that slice of the whole result, so a large
    output can be produced strip by strip.
    """
    out = x
    for axis, new in ((1, size[0]), (2, size[1])):
        old = out.shape[axis]
        pick = slice(*rows) if axis == 1 and rows is not None else slice(None)
        if new == old:
            out = out[:, pick] if axis == 1 else out
            continue
        # torch computes fma(scale, dst + 0.5, -0.5) with a float32 scale and one final
        # float32 rounding; float64 holds that product exactly, so we sample where it does
        scale = np.float64(np.float32(old) / np.float32(new))
        src = ((np.arange(new)[pick] + 0.5) * scale - 0.5).astype(np.float32)
        src = np.maximum(src, np.float32(0))
        i0 = np.floor(src).astype(np.int64)
        i0 = np.minimum(i0, old - 1)
        i1 = np.minimum(i0 + 1, old - 1)
        frac = (src - i0).astype(out.dtype)
        shape = [1, 1, 1]
        shape[axis] = len(src)
        frac = frac.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - frac) + np.take(out, i1, axis=axis) * frac
    return out
