"""Scene mode (SPEC 9): a raster of any size segmented at native resolution, block by block.

The window rule of SPEC 2.2 covers the whole scene as if it were one image; the scene is then
processed in square blocks aligned to the window stride. For a block, every window of that
whole-scene rule which touches the block is cut from one read of their union, run through the
segmenter's model call, and summed into the block's canvas where it falls inside the block; the
canvas divided by the window count is exactly the whole-scene average at those pixels (each
pixel depends only on the windows covering it). Windows that reach into two blocks are computed
for each of them: with blocks of n strides that is ((n + 1) / n)^2 window evaluations per
output pixel instead of 1 (1.13 for the default 16 strides, 1.56 for 4).

Memory depends on the block size, the number of queries and the window batch, never on the
scene size. numpy only (no torch, no rasterio): the torch and ONNX segmenters share it through
their ``_window_logits``; rasters are read and written by :mod:`simfeatup.geo`.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Protocol

import numpy as np

from . import imaging, scores, windows
from .constants import DEFAULT_BLOCK, NODATA_LABEL
from .windows import Box


class SceneError(ValueError):
    """A scene that cannot be segmented (unreadable, too small); the message names it and the fix."""


class SceneReader(Protocol):
    """A scene read window by window: ``height`` x ``width`` pixels."""

    height: int
    width: int

    def read(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows y0..y1-1, columns x0..x1-1 as (RGB uint8 (h, w, 3), valid bool (h, w)); False = nodata."""
        ...


class ArrayScene:
    """A scene held in memory (tests, small rasters): RGB uint8 (H, W, 3) and an optional nodata mask."""

    def __init__(self, rgb: np.ndarray, valid: np.ndarray | None = None):
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"a scene is RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        if valid is None:
            valid = np.ones(rgb.shape[:2], bool)
        if valid.shape != rgb.shape[:2]:
            raise ValueError(f"the valid mask is {valid.shape}, the scene {rgb.shape[:2]}")
        self.rgb, self.valid = rgb, valid.astype(bool)
        self.height, self.width = rgb.shape[:2]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        return self.rgb[y0:y1, x0:x1], self.valid[y0:y1, x0:x1]


class SceneBlock(NamedTuple):
    """One block of a segmented scene: rows y0..y1-1, columns x0..x1-1 of the scene."""

    y0: int
    y1: int
    x0: int
    x1: int
    labels: np.ndarray  # (h, w) uint8 class indices, NODATA_LABEL where the scene has no data
    probs: np.ndarray | None  # (K, h, w) float32 class probabilities (0 at nodata), when asked for
    valid: np.ndarray  # (h, w) bool


def check_block(block: int, stride: int) -> None:
    """Blocks are aligned to the window stride (SPEC 9): refuse other sizes."""
    if block < stride or block % stride:
        raise ValueError(f"block size {block} is not a positive multiple of the window stride {stride}: "
                         f"use e.g. {DEFAULT_BLOCK // stride * stride}")


def block_boxes(height: int, width: int, block: int) -> list[Box]:
    """The scene's blocks as (y0, y1, x0, x1), row by row; the last row and column are cut by the border."""
    return [(y0, min(y0 + block, height), x0, min(x0 + block, width))
            for y0 in range(0, height, block) for x0 in range(0, width, block)]


def touching_windows(height: int, width: int, box: Box, window: int, stride: int) -> list[Box]:
    """The whole-scene windows (SPEC 2.2) that overlap ``box``, in the order :func:`windows.window_boxes` gives."""
    y0, y1, x0, x1 = box
    h, w = min(window, height), min(window, width)  # every window of a scene has this shape
    ys = [s for s in windows.window_starts(height, window, stride) if s < y1 and s + h > y0]
    xs = [s for s in windows.window_starts(width, window, stride) if s < x1 and s + w > x0]
    return [(sy, sy + h, sx, sx + w) for sy in ys for sx in xs]


def averaged_block_logits(
    segmenter, reader: SceneReader, box: Box, text: np.ndarray, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, h, w) mean window logits of the block ``box`` and its (h, w) valid mask (SPEC 2.2, 2.6, 9).

    At every valid pixel the logits equal those of :func:`windows.averaged_logits` run on the
    whole normalised scene (nodata set to 0). Windows with no valid pixel inside the block are
    skipped: they cover only nodata there, whose logits mean nothing (0 where no window ran).
    """
    y0, y1, x0, x1 = box
    boxes = touching_windows(reader.height, reader.width, box, segmenter.window, segmenter.stride)
    ry0, rx0 = boxes[0][0], boxes[0][2]  # the union of the windows, read once
    ry1, rx1 = boxes[-1][1], boxes[-1][3]
    rgb, valid = reader.read(ry0, ry1, rx0, rx1)
    x = imaging.normalise(rgb)  # (3, h, w)
    x[:, ~valid] = 0  # nodata takes the mean colour, as padding does (SPEC 9)
    inside = np.zeros_like(valid)
    inside[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] = valid[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
    boxes = [b for b in boxes if inside[b[0] - ry0 : b[1] - ry0, b[2] - rx0 : b[3] - rx0].any()]

    canvas = np.zeros((len(text), y1 - y0, x1 - x0), np.float32)
    count = np.zeros((y1 - y0, x1 - x0), np.float32)
    if boxes:  # one padded shape for all of them: every window of a scene has the same size
        wy0, wy1, wx0, wx1 = boxes[0]
        multiple = segmenter.geometry["patch"]  # the window side for a static ONNX folder (docs/model-folder.md)
        pads = windows.padding(wy1 - wy0, multiple), windows.padding(wx1 - wx0, multiple)
    for start in range(0, len(boxes), segmenter.window_batch):
        batch = boxes[start : start + segmenter.window_batch]
        cut = np.stack(
            [
                windows.crop_and_pad(x, (by0 - ry0, by1 - ry0, bx0 - rx0, bx1 - rx0), pads)
                for by0, by1, bx0, bx1 in batch
            ]
        )
        out = segmenter._window_logits(cut, text, lam)  # (B, Q, h', w')
        for b, window_out in zip(batch, out):
            windows.add_window(canvas, count, window_out, b, pads, origin=(y0, x0))
    np.divide(canvas, count, out=canvas, where=count > 0)  # in place: the canvas is the block's largest array
    return canvas, valid[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]


def segment_scene(
    segmenter,
    reader: SceneReader,
    vocabulary,
    scoring: scores.Scoring | None = None,
    *,
    text: np.ndarray | None = None,
    block: int = DEFAULT_BLOCK,
    return_probs: bool = False,
    on_block: Callable[[int, int], None] | None = None,
) -> Iterator[SceneBlock]:
    """Segment a scene at native resolution (SPEC 9), yielding one :class:`SceneBlock` per block.

    ``segmenter``: a :class:`simfeatup.pipeline.WindowSegmenter` (torch or ONNX). ``scoring``
    and ``text`` as in its ``segment``. ``block``: the block side, a multiple of the window
    stride; it changes memory use, never the result. ``on_block(done, total)`` is called as each
    block is finished (progress). Labels are SPEC 2.7's per pixel; nodata pixels get
    :data:`NODATA_LABEL`, so a vocabulary has at most that many classes.
    """
    if len(vocabulary) > NODATA_LABEL:
        raise ValueError(
            f"{len(vocabulary)} classes: a scene's labels hold at most {NODATA_LABEL} "
            f"(0..{NODATA_LABEL - 1}; {NODATA_LABEL} marks nodata)"
        )
    scoring = scoring or scores.Scoring(lam=segmenter.default_lambda)
    scoring.check(len(vocabulary))
    text = segmenter.query_embeddings(vocabulary, text)
    check_block(block, segmenter.stride)
    if min(reader.height, reader.width) < segmenter.patch_size:
        raise SceneError(
            f"{getattr(reader, 'path', 'the scene')} is {reader.width}x{reader.height} pixels, smaller than "
            f"one {segmenter.patch_size}-pixel patch: nothing to segment"
        )
    boxes = block_boxes(reader.height, reader.width, block)
    for done, box in enumerate(boxes, 1):
        logits, valid = averaged_block_logits(segmenter, reader, box, text, scoring.lam)
        if valid.any():
            result = scores.segmentation(logits, vocabulary, scoring, return_probs=return_probs)
            labels, probs = result.labels, result.probs  # uint8: at most NODATA_LABEL classes
            labels[~valid] = NODATA_LABEL
            if probs is not None:
                probs[:, ~valid] = 0
        else:  # nothing to classify, and no window was run
            labels = np.full(valid.shape, NODATA_LABEL, np.uint8)
            probs = np.zeros((len(vocabulary), *valid.shape), np.float32) if return_probs else None
        del logits
        if on_block is not None:
            on_block(done, len(boxes))
        yield SceneBlock(*box, labels, probs, valid)
