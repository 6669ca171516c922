"""OpenCV's uint8 bilinear resize (SPEC 2.1) for any output window, and scenes resampled with it (SPEC 9).

Scene mode resamples a scene by the rule image mode uses (``cv2.resize(..., INTER_LINEAR)`` on
uint8), but block by block: cv2 only resizes whole images, so the rule is written here in numpy
for an arbitrary window of the output, reading only the source rows and columns that window
needs. Every window equals the same slice of the whole-image result, and the whole image equals
``cv2.resize`` bit for bit (tests/test_resample.py checks both). The rule:

- Per axis, output index d samples the source at ``(d + 0.5) * scale - 0.5`` (``scale`` =
  1 / (dst / src) in double, as cv2 computes it), rounded to float32; its floor is the first tap,
  the fraction f weighs the second. Weights are 11-bit fixed point: round(2048 (1 - f)) and
  round(2048 f), with f and 1 - f in float32 and ties to even.
- Columns past the border take the border pixel whole (weights 2048, 0). Rows past the border
  keep their weights and both taps are clamped to the border row (cv2 clamps rows and columns
  differently; the results differ by the vertical pass's rounding, so the difference matters).
- Horizontal pass first, exact in int32: s0 w0 + s1 w1. Then the vertical pass with the rounding
  of cv2's vector code (``VResizeLinearVec_32s8u``): each row is shifted right by 4, multiplied by
  its weight keeping the high 16 bits, the two are added and rounded: (t + 2) >> 2, saturated.
  That is what every output pixel gets in cv2 5.0 on x86-64 (checked on every pixel, including
  each row's last ones). cv2's plain-C rounding, (s0 w0 + s1 w1 + 2^21) >> 22, differs by one
  grey level on some pixels; an OpenCV build that runs it for the tail of each row (older 4.x
  releases do, for the last few pixels of a row) differs from this module there, by at most 1.
- An exact 2x reduction on both axes is cv2's INTER_AREA fast path, (a + b + c + d + 2) >> 2:
  the same numbers as the rule above at that scale (both weights 1024), so it needs no case.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .scene import SceneError

COEF_BITS = 11  # cv2's INTER_RESIZE_COEF_BITS: weights are integers summing to 2 ** COEF_BITS
COEF_ONE = 1 << COEF_BITS
STRIP_PIXELS = 1 << 18  # output pixels resampled at a time: bounds the int32 intermediates (~3 MB each)


class Taps(NamedTuple):
    """Per output index along one axis: the two source indices read and their fixed-point weights.

    A tap whose weight is 0 points at the other tap, so the indices are exactly the source
    pixels that count (the pixels a window reads, and the ones whose nodata makes it nodata).
    """

    first: np.ndarray  # int64
    second: np.ndarray  # int64
    w_first: np.ndarray  # int32
    w_second: np.ndarray  # int32

    def window(self, lo: int, hi: int) -> "Taps":
        """The taps of output indices lo..hi-1."""
        return Taps(*(a[lo:hi] for a in self))

    def span(self) -> tuple[int, int]:
        """The source range lo..hi-1 these taps read."""
        return int(self.first.min()), int(self.second.max()) + 1

    def shifted(self, origin: int) -> "Taps":
        return Taps(self.first - origin, self.second - origin, self.w_first, self.w_second)


def taps(src: int, dst: int, *, rows: bool) -> Taps:
    """cv2 INTER_LINEAR's taps for resizing an axis of ``src`` pixels to ``dst`` (``rows``: the vertical axis)."""
    if src < 1 or dst < 1:
        raise ValueError(f"cannot resize an axis of {src} pixels to {dst}")
    scale = 1.0 / (dst / src)  # cv2: scale_x = 1 / inv_scale_x, inv_scale_x = dst / src
    pos = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(pos)
    frac = pos - start  # float32, exact
    start = start.astype(np.int64)
    if not rows:  # columns outside the image take the border pixel whole
        outside = (start < 0) | (start >= src - 1)
        frac[outside] = 0
    first = np.clip(start, 0, src - 1)
    second = np.clip(start + 1, 0, src - 1)
    one = np.float32(COEF_ONE)
    w_first = np.rint((np.float32(1) - frac) * one).astype(np.int32)  # rint: ties to even, as cvRound
    w_second = np.rint(frac * one).astype(np.int32)
    second = np.where(w_second == 0, first, second)
    first = np.where(w_first == 0, second, first)
    return Taps(first, second, w_first, w_second)


def resize_taps(source: np.ndarray, row_taps: Taps, col_taps: Taps) -> np.ndarray:
    """(len(row_taps), len(col_taps), C) uint8 from ``source`` (h, w, C) uint8; the taps index ``source``."""
    height, width = len(row_taps.first), len(col_taps.first)
    out = np.empty((height, width, source.shape[2]), np.uint8)
    strip = max(1, STRIP_PIXELS // max(width, 1))
    wa = col_taps.w_first[:, None]
    wb = col_taps.w_second[:, None]
    for r0 in range(0, height, strip):
        rt = row_taps.window(r0, r0 + strip)
        needed, inverse = np.unique(np.concatenate([rt.first, rt.second]), return_inverse=True)
        src = source[needed]
        horizontal = src[:, col_taps.first].astype(np.int32) * wa  # exact: <= 255 * 2048
        horizontal += src[:, col_taps.second].astype(np.int32) * wb
        horizontal >>= 4  # the vertical pass's first step, once per source row
        n = len(rt.first)
        top = horizontal[inverse[:n]] * rt.w_first[:, None, None]
        top >>= 16
        bottom = horizontal[inverse[n:]] * rt.w_second[:, None, None]
        bottom >>= 16
        top += bottom
        top += 2
        top >>= 2
        np.clip(top, 0, 255, out=top)
        out[r0 : r0 + n] = top
    return out


def valid_taps(valid: np.ndarray, row_taps: Taps, col_taps: Taps) -> np.ndarray:
    """An output pixel is valid when every source pixel with a non-zero weight in it is (conservative)."""
    ok = np.ones((len(row_taps.first), len(col_taps.first)), bool)
    for rows in (row_taps.first, row_taps.second):
        picked = valid[rows]
        ok &= picked[:, col_taps.first]
        ok &= picked[:, col_taps.second]
    return ok


def resize(image: np.ndarray, height: int, width: int, rows=None, cols=None) -> np.ndarray:
    """``image`` (H, W, C) uint8 resized to ``height`` x ``width`` as ``cv2.resize(INTER_LINEAR)`` does.

    ``rows=(r0, r1)`` and ``cols=(c0, c1)`` give only that window of the result, identical to the
    same slice of the whole one.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"resize takes uint8 (H, W, C) images, got {image.dtype} {image.shape}")
    row_taps = taps(image.shape[0], height, rows=True).window(*(rows or (0, height)))
    col_taps = taps(image.shape[1], width, rows=False).window(*(cols or (0, width)))
    return resize_taps(image, row_taps, col_taps)


def scaled_size(height: int, width: int, scale_y: float, scale_x: float) -> tuple[int, int]:
    """SPEC 2.1's rounding of a scaled size: int(H s + 0.5) x int(W s + 0.5), per axis."""
    return int(height * scale_y + 0.5), int(width * scale_x + 0.5)


class ResampledScene:
    """A :class:`simfeatup.scene.SceneReader` resampled to ``height`` x ``width`` (SPEC 9), read window by window.

    Each ``read`` reads only the source pixels its window needs from ``reader`` and resamples
    them by :func:`resize`'s rule, so block streaming over it gives exactly the whole resampled
    scene. The valid mask is resampled conservatively: an output pixel is valid only if every
    source pixel it is computed from (non-zero weight) is valid, so nodata never leaks into a
    label through interpolation; the band it adds along nodata edges is under one output pixel
    wide when reducing, up to one source pixel wide when enlarging.

    Other attributes (``path``, ``crs``, ...) are the source reader's; ``transform``, when the
    source has one, is scaled to the new pixel size, the extent unchanged.
    """

    def __init__(self, reader, height: int, width: int):
        if height < 1 or width < 1:
            raise SceneError(
                f"{getattr(reader, 'path', 'the scene')} resampled to {width}x{height} pixels has no pixel left: "
                "choose a finer --gsd or a larger --scale"
            )
        self.reader = reader
        self.height, self.width = height, width
        self._rows = taps(reader.height, height, rows=True)
        self._cols = taps(reader.width, width, rows=False)

    def __getattr__(self, name: str):
        if name == "reader":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.reader, name)

    @property
    def transform(self):
        """The source's affine transform with pixels of the new size (same origin and extent)."""
        t = self.reader.transform
        sx, sy = self.reader.width / self.width, self.reader.height / self.height
        # t composed with a scaling, built by the transform's own type (no affine import in this numpy module)
        return type(t)(t.a * sx, t.b * sy, t.c, t.d * sx, t.e * sy, t.f)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = self._rows.window(y0, y1), self._cols.window(x0, x1)
        (sy0, sy1), (sx0, sx1) = rows.span(), cols.span()
        rgb, valid = self.reader.read(sy0, sy1, sx0, sx1)
        rows, cols = rows.shifted(sy0), cols.shifted(sx0)
        return resize_taps(rgb, rows, cols), valid_taps(valid, rows, cols)
