"""Sliding windows over a preprocessed image and the averaging of their logits (SPEC 2.2, 2.6).

numpy only, so the torch segmenter and the ONNX runtime walk, cut, pad and average windows
with the same code: only the per-window model call differs between the backends.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .constants import STRIDE, WINDOW

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end exclusive
Pads = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
# (B, 3, h, w) normalised windows, (Q, D) unit-norm queries, lambda -> (B, Q, h, w) float32 logits
WindowLogits = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def window_starts(length: int, window: int = WINDOW, stride: int = STRIDE) -> list[int]:
    """SPEC 2.2: window starts along one axis; the last window is shifted back inside."""
    count = max(length - window + stride - 1, 0) // stride + 1
    starts = []
    for i in range(count):
        end = min(i * stride + window, length)
        starts.append(max(end - window, 0))
    return starts


def window_boxes(height: int, width: int, window: int = WINDOW, stride: int = STRIDE) -> list[Box]:
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


def window_batches(sizes, window: int, stride: int, patch: int, batch: int):
    """The windows of several images, in batches of one padded shape (SPEC 2.2).

    ``sizes``: (H, W) of each resized image. Yields lists of ``(image index, (y0, y1, x0, x1),
    ((top, bottom), (left, right)))``, at most ``batch`` long; windows of one padded shape
    share a batch across images.
    """
    groups: dict[tuple[int, int], list] = {}
    for i, (height, width) in enumerate(sizes):
        for y0, y1, x0, x1 in window_boxes(height, width, window, stride):
            pads = padding(y1 - y0, patch), padding(x1 - x0, patch)
            shape = (y1 - y0 + sum(pads[0]), x1 - x0 + sum(pads[1]))
            groups.setdefault(shape, []).append((i, (y0, y1, x0, x1), pads))
    for jobs in groups.values():
        for start in range(0, len(jobs), batch):
            yield jobs[start : start + batch]


def crop_and_pad(x: np.ndarray, box: Box, pads: Pads) -> np.ndarray:
    """(3, H, W) normalised image -> one window, zero-padded AFTER normalisation, i.e. with the
    mean colour (SPEC 2.2)."""
    y0, y1, x0, x1 = box
    return np.pad(x[:, y0:y1, x0:x1], ((0, 0), *pads))


def averaged_logits(prepared: list[np.ndarray], text: np.ndarray, lam: float, window_logits: WindowLogits, *,
                    window: int, stride: int, patch: int, batch: int) -> list[np.ndarray]:
    """Per-image (Q, h, w) mean of the window logits covering each pixel (SPEC 2.2, 2.6).

    ``prepared``: (3, h, w) normalised images (:func:`simfeatup.imaging.preprocess`). The windows
    of all images go through ``window_logits`` ``batch`` at a time; each window's logits, padding
    cropped, are summed into its image's canvas, which is divided by the per-pixel window count.
    """
    canvases = [np.zeros((len(text), *x.shape[1:]), np.float32) for x in prepared]
    counts = [np.zeros(x.shape[1:], np.float32) for x in prepared]
    sizes = [x.shape[1:] for x in prepared]
    for jobs in window_batches(sizes, window, stride, patch, batch):
        windows = np.stack([crop_and_pad(prepared[i], box, pads) for i, box, pads in jobs])
        out = window_logits(windows, text, lam)  # (B, Q, h', w')
        for (i, box, pads), window_out in zip(jobs, out):
            add_window(canvases[i], counts[i], window_out, box, pads)
    return [canvas / count for canvas, count in zip(canvases, counts)]


def add_window(canvas: np.ndarray, count: np.ndarray, logits: np.ndarray, box: Box, pads: Pads,
               origin: tuple[int, int] = (0, 0)) -> None:
    """Sum one window's (Q, h', w') logits, its padding cropped away, into ``canvas`` (Q, H, W) and
    count it in ``count`` (H, W) (SPEC 2.6).

    ``box`` is in image pixels; the canvas covers image pixels from ``origin`` (y, x) on, and only
    the part of the window inside it is added (scene blocks, SPEC 9).
    """
    y0, y1, x0, x1 = box
    (top, _), (left, _) = pads
    oy, ox = origin
    cy0, cy1 = max(y0, oy), min(y1, oy + count.shape[0])
    cx0, cx1 = max(x0, ox), min(x1, ox + count.shape[1])
    if cy0 >= cy1 or cx0 >= cx1:
        return
    canvas[:, cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox] += logits[
        :, top + cy0 - y0 : top + cy1 - y0, left + cx0 - x0 : left + cx1 - x0
    ]
    count[cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox] += 1
