"""Colours, label maps and overlays for people to look at; the one home of the class palette.

Every picture and colour table simfeatup writes (label PNGs, ``classes.json``, the label COG's
colour table, overlays of images and scenes) takes its colours from :func:`palette`, a function
of the class lines alone. numpy + Pillow only.
"""
from __future__ import annotations

import colorsys
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write
from .constants import NODATA_LABEL

# Conventional land-cover colours: a class line containing one of the words (or its plural)
# takes the kind's first shade, a second class of the same kind the next one.
LAND_COVER = (
    (("water", "river", "lake", "sea", "ocean", "pond", "flood", "pool", "reservoir", "wetland"),
     ((30, 110, 200), (95, 175, 235))),
    (("tree", "forest", "woodland", "wood"), ((20, 110, 45), (65, 145, 40))),
    (("vegetation", "grass", "grassland", "meadow", "shrub", "lawn", "park"), ((110, 190, 70), (165, 215, 115))),
    (("agricultural", "agriculture", "cropland", "crop", "farmland", "farm"), ((215, 205, 90), (185, 170, 55))),
    (("building", "roof", "house", "facade", "residential"), ((215, 40, 40), (240, 125, 110), (145, 25, 40))),
    (("road", "street", "highway", "railway"), ((110, 110, 110), (80, 85, 105))),
    (("pavement", "impervious", "parking", "sidewalk"), ((165, 165, 165), (140, 135, 125))),
    (("barren", "bareland", "bare", "soil", "sand", "desert", "rock"), ((175, 135, 85), (205, 175, 125))),
    (("background", "clutter", "other", "unlabelled", "unlabeled", "void"), ((225, 220, 205), (195, 190, 180))),
)
# Classes of no known kind, in order: Okabe-Ito, then Tableau (no black, white or grey), each
# taken unless too close to a colour already given; further classes get generated hues.
DISTINCT = (
    (230, 159, 0), (204, 121, 167), (86, 180, 233), (240, 228, 66), (148, 103, 189), (0, 158, 115),
    (213, 94, 0), (23, 190, 207), (140, 86, 75), (227, 119, 194), (188, 189, 34), (0, 114, 178),
)
MIN_DISTANCE = 60  # RGB distance below which two palette colours count as the same

# Overlays of scenes are decimated until their long side fits this; nodata cells are this colour.
OVERLAY_LONG_SIDE = 2048
NODATA_COLOUR = (255, 255, 255)
OVERLAY_ALPHA = 0.5
# JPEG pictures keep full colour resolution: legend swatches and text stay crisp.
JPEG_OPTIONS = {"quality": 90, "subsampling": 0}


def land_cover_colour(line: str, taken: set) -> tuple[int, int, int] | None:
    """The conventional colour of a class line ("tree,forest"), the first shade not in ``taken``; else None."""
    words = [w for synonym in line.split(",") for w in re.findall(r"[a-z]+", synonym.lower())]
    for word in words:
        for keywords, shades in LAND_COVER:
            if word in keywords or (word.endswith("s") and word[:-1] in keywords):
                free = [s for s in shades if s not in taken]
                return free[0] if free else None
    return None


def _generated():
    golden = 0.618033988749895
    for i in range(len(DISTINCT), 1 << 16):
        r, g, b = colorsys.hsv_to_rgb((i * golden) % 1.0, 0.65, 0.95 - 0.3 * ((i // 7) % 2))
        yield int(r * 255), int(g * 255), int(b * 255)


def palette(classes: Sequence[str]) -> np.ndarray:
    """(K, 3) uint8 colours of the class lines ``classes`` ("building,roof", "road", ...).

    Deterministic: the same lines always get the same colours. Lines of a known land-cover kind
    get its conventional colour (:data:`LAND_COVER`), the others :data:`DISTINCT` colours in
    order, skipping those close to one already given; never black.
    """
    if isinstance(classes, (str, int)):
        raise TypeError("palette() takes the class lines, e.g. ['building,roof', 'road']")
    colours: list = []
    for line in classes:  # a kind's first class takes its first shade, a second one the next
        colours.append(land_cover_colour(line, set(colours)))
    distinct, generated = iter(DISTINCT), _generated()
    for k, colour in enumerate(colours):
        if colour is None:
            given = [c for c in colours if c is not None]
            far = (c for c in distinct if all(math.dist(c, g) >= MIN_DISTANCE for g in given))
            colours[k] = next(far, None) or next(generated)
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


def label_image(labels: np.ndarray, colours: np.ndarray) -> Image.Image:
    """(H, W) class indices -> palette ('P' mode) image whose pixel values are the labels."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(colours.reshape(-1).tolist())
    return img


def blend(rgb: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8: ``rgb`` blended with the colours of ``labels``; labels of no class (nodata) left as they are."""
    known = (labels < len(colours))[..., None]
    tint = colours[np.minimum(labels, len(colours) - 1)]  # (H, W, 3)
    mixed = rgb.astype(np.float32) * (1 - alpha) + tint.astype(np.float32) * alpha
    return np.where(known, mixed.round().astype(np.uint8), rgb)


def font(size: int):
    """Pillow's bundled default font at ``size`` px (scalable where Pillow has FreeType); never downloads."""
    try:
        return ImageFont.load_default(size)  # Pillow >= 10.1 with FreeType: scalable, bundled (no download)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def legend(classes: Sequence[str], colours: np.ndarray, width: int) -> Image.Image:
    """A strip ``width`` pixels wide (wider if one entry needs it): a swatch and the name of each class, wrapped."""
    size = min(32, max(11, round(width / 64)))
    face, pad = font(size), max(3, size // 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(line, colours[k], math.ceil(probe.textlength(line, font=face))) for k, line in enumerate(classes)]
    width = max([width] + [2 * pad + size + pad + w for _, _, w in entries])
    rows, x = [[]], pad
    for entry in entries:
        need = size + pad + entry[2] + 2 * pad
        if rows[-1] and x + need > width:
            rows.append([])
            x = pad
        rows[-1].append((x, entry))
        x += need
    line_height = size + pad
    strip = Image.new("RGB", (width, pad + line_height * len(rows)), NODATA_COLOUR)
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        y = pad + r * line_height
        for x, (line, colour, _) in row:
            draw.rectangle([x, y, x + size - 1, y + size - 1], fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
            top, bottom = draw.textbbox((0, 0), line, font=face)[1::2]
            draw.text((x + size + pad, y + (size - top - bottom) / 2), line, fill=(0, 0, 0), font=face)
    return strip


def with_legend(rgb: np.ndarray, classes: Sequence[str], colours: np.ndarray) -> Image.Image:
    """The picture ``rgb`` (H, W, 3) above the legend strip of its classes."""
    strip = legend(classes, colours, rgb.shape[1])
    out = Image.new("RGB", (strip.width, rgb.shape[0] + strip.height), NODATA_COLOUR)
    out.paste(Image.fromarray(rgb, mode="RGB"), (0, 0))
    out.paste(strip, (0, rgb.shape[0]))
    return out


def overlay(image: np.ndarray, labels: np.ndarray, classes: Sequence[str], colours: np.ndarray | None = None,
            alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """RGB uint8 ``image`` (H, W, 3) blended with the colours of ``labels`` (H, W), above a legend of ``classes``."""
    colours = palette(classes) if colours is None else colours
    return with_legend(blend(image, labels, colours, alpha), classes, colours)


# Pictures of panels side by side (training previews, compare): small inputs are enlarged by an
# integer factor (nearest: a token stays a visible block) so their long side comes near PANEL_SIDE;
# compare shrinks larger ones until the long side fits COMPARE_LONG_SIDE.
PANEL_SIDE = 256
COMPARE_LONG_SIDE = 1024
GRID_GAP = 6
COMPARE_TITLES = ("image", "bilinear", "SimFeatUp", "where they differ")


def enlargement(height: int, width: int, side: int = PANEL_SIDE) -> int:
    """The integer nearest-neighbour factor that brings a panel's long side nearest ``side`` (at least 1)."""
    return max(1, round(side / max(height, width)))


def _text_size(width: int) -> int:
    return min(24, max(12, width // 16))


def _fitting(texts: Sequence[str], width: int, size: int):
    """The default font at ``size`` px, smaller (down to 8) until every text fits ``width`` pixels."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while size > 8 and any(probe.textlength(t, font=font(size)) > width for t in texts):
        size -= 1
    return font(size)


def grid_layout(n_rows: int, n_cols: int, height: int, width: int, *, note: bool = False):
    """Where :func:`grid` puts panels of ``height`` x ``width``: ((picture width, height), [[(x, y)] per row])."""
    title = round(1.5 * _text_size(width)) + GRID_GAP
    origins = [[(GRID_GAP + c * (width + GRID_GAP), title + r * (height + GRID_GAP)) for c in range(n_cols)]
               for r in range(n_rows)]
    size = (GRID_GAP + n_cols * (width + GRID_GAP), title + n_rows * (height + GRID_GAP))
    if note:
        size = (size[0], size[1] + round(1.5 * _text_size(width)))
    return size, origins


def grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], *, scale: int = 1,
         note: str | None = None) -> Image.Image:
    """Panels (H, W, 3) uint8, all of one size, in rows under one title per column, on white.

    ``scale``: integer enlargement of every panel (nearest neighbour). ``note``: a line of
    text below the panels. Positions: :func:`grid_layout`.
    """
    height, width = rows[0][0].shape[0] * scale, rows[0][0].shape[1] * scale
    if any(len(row) != len(titles) or any(p.shape[:2] != rows[0][0].shape[:2] for p in row) for row in rows):
        raise ValueError(f"every row needs {len(titles)} panels of one size")
    size, origins = grid_layout(len(rows), len(titles), height, width, note=note is not None)
    out = Image.new("RGB", size, NODATA_COLOUR)
    draw = ImageDraw.Draw(out)
    face = _fitting(titles, width - 2, _text_size(width))
    for (x, y), title in zip(origins[0], titles):
        draw.text((x + width / 2, y - GRID_GAP), title, fill=(0, 0, 0), font=face, anchor="md")
    for row, places in zip(rows, origins):
        for panel, (x, y) in zip(row, places):
            img = Image.fromarray(np.ascontiguousarray(panel), mode="RGB")
            out.paste(img.resize((width, height), Image.Resampling.NEAREST) if scale != 1 else img, (x, y))
    if note is not None:
        face = _fitting([note], size[0] - 2 * GRID_GAP, _text_size(width) - 2)
        draw.text((GRID_GAP, origins[-1][0][1] + height + GRID_GAP), note, fill=(60, 60, 60), font=face)
    return out


def differing(a: np.ndarray, b: np.ndarray) -> float:
    """The share (0..1) of pixels whose label differs between the label maps ``a`` and ``b`` (H, W)."""
    return float(np.mean(a != b)) if a.size else 0.0


def _shrunk(image: np.ndarray, labels: Sequence[np.ndarray], long_side: int):
    """``image`` (H, W, 3) and label maps brought to a long side of at most ``long_side``
    (the image by area averaging, labels by their pixel nearest each new pixel's centre)."""
    h, w = image.shape[:2]
    factor = max(h, w) / long_side
    if factor <= 1:
        return image, list(labels)
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    small = np.asarray(Image.fromarray(image, mode="RGB").resize(size, Image.Resampling.BOX))
    rows = np.minimum(((np.arange(size[1]) + 0.5) * h / size[1]).astype(int), h - 1)
    cols = np.minimum(((np.arange(size[0]) + 0.5) * w / size[0]).astype(int), w - 1)
    return small, [lab[np.ix_(rows, cols)] for lab in labels]


def comparison(image: np.ndarray, bilinear: np.ndarray, upsampled: np.ndarray, classes: Sequence[str],
               colours: np.ndarray | None = None, *, note: str | None = None) -> Image.Image:
    """image | bilinear labels | SimFeatUp labels | where they differ, captioned, above a legend.

    ``image`` RGB uint8 (H, W, 3); ``bilinear`` and ``upsampled`` the two label maps (H, W).
    The last panel greys the image and shows SimFeatUp's colour, rimmed in black, where its
    label differs from bilinear's; its caption gives that share of the pixels (at full resolution). Small images
    are enlarged (:func:`enlargement`), large ones shrunk to :data:`COMPARE_LONG_SIDE`.
    """
    colours = palette(classes) if colours is None else colours
    share = differing(bilinear, upsampled)
    image, (bilinear, upsampled) = _shrunk(image, (bilinear, upsampled), COMPARE_LONG_SIDE)
    scale = enlargement(*image.shape[:2])  # here rather than in grid(): the rim below stays one pixel thin
    image, bilinear, upsampled = (np.repeat(np.repeat(a, scale, 0), scale, 1) for a in (image, bilinear, upsampled))
    grey = image.astype(np.float32).mean(-1, keepdims=True) * 0.5 + 127.5  # (h, w, 1): a faded photo
    changed = bilinear != upsampled
    tint = colours[np.minimum(upsampled, len(colours) - 1)]
    diff = np.where(changed[..., None], tint, np.repeat(grey, 3, -1).round().astype(np.uint8))
    diff[_rim(changed)] = 0  # a black rim, so light class colours stand out from the faded photo too
    panels = [image, blend(image, bilinear, colours), blend(image, upsampled, colours), diff]
    titles = (*COMPARE_TITLES[:3], f"{COMPARE_TITLES[3]}: {100 * share:.1f} %")
    picture = grid([panels], titles, note=note)
    return _above(picture, legend(classes, colours, picture.width))


def _rim(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` (H, W) bool with a 4-neighbour outside it (or on the picture's edge)."""
    inner = np.pad(mask, 1, constant_values=False)
    inner = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    return mask & ~inner


def _above(top: Image.Image, bottom: Image.Image) -> Image.Image:
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), NODATA_COLOUR)
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


class SceneOverlay:
    """The overlay of a ``height`` x ``width`` scene, built block by block at a viewable size.

    The scene is decimated by an integer ``factor`` until its long side fits ``long_side``:
    each cell of the small canvas shows the mean colour of its valid pixels and the label at
    its centre pixel; cells with no valid pixel are :data:`NODATA_COLOUR`, nodata labels are
    not tinted. Memory is the canvas (~20 bytes a cell), never the scene.
    """

    def __init__(self, height: int, width: int, classes: Sequence[str], long_side: int = OVERLAY_LONG_SIDE):
        self.height, self.width, self.classes = height, width, list(classes)
        self.factor = max(1, math.ceil(max(height, width) / long_side))
        self.shape = (math.ceil(height / self.factor), math.ceil(width / self.factor))
        self._sum = np.zeros((*self.shape, 3), np.float32)
        self._count = np.zeros(self.shape, np.float32)
        self._labels = np.full(self.shape, NODATA_LABEL, np.uint8)

    def _cells(self, start: int, stop: int, size: int):
        """For scene pixels start..stop-1 along one axis: the first pixel of each cell they reach
        (offsets into the block), those cells, and the block offsets of the cells' centre pixels
        that fall in the block with their cells."""
        cells = np.arange(start, stop) // self.factor
        firsts = np.flatnonzero(np.r_[True, np.diff(cells) > 0])
        reached = cells[firsts]
        centres = np.minimum(reached * self.factor + self.factor // 2, size - 1)
        inside = (centres >= start) & (centres < stop)
        return firsts, reached, centres[inside] - start, reached[inside]

    def add(self, y0: int, x0: int, rgb: np.ndarray, valid: np.ndarray, labels: np.ndarray) -> None:
        """The block whose top-left pixel is (y0, x0): RGB uint8 (h, w, 3), valid (h, w), labels (h, w)."""
        h, w = labels.shape
        rows, row_cells, row_centres, centre_rows = self._cells(y0, y0 + h, self.height)
        cols, col_cells, col_centres, centre_cols = self._cells(x0, x0 + w, self.width)
        masked = np.where(valid[..., None], rgb, 0).astype(np.uint8)  # no float copy of the block
        sums = np.add.reduceat(np.add.reduceat(masked, rows, axis=0, dtype=np.float32), cols, axis=1)
        counts = np.add.reduceat(np.add.reduceat(valid, rows, axis=0, dtype=np.float32), cols, axis=1)
        cells = np.ix_(row_cells, col_cells)
        self._sum[cells] += sums
        self._count[cells] += counts
        self._labels[np.ix_(centre_rows, centre_cols)] = labels[np.ix_(row_centres, col_centres)]

    def image(self) -> Image.Image:
        colours = palette(self.classes)
        seen = self._count > 0
        rgb = np.empty((*self.shape, 3), np.uint8)
        rgb[:] = NODATA_COLOUR
        rgb[seen] = (self._sum[seen] / self._count[seen, None]).round().astype(np.uint8)
        labels = np.where(seen, self._labels, NODATA_LABEL)
        return with_legend(blend(rgb, labels, colours), self.classes, colours)


def save_atomic(img: Image.Image, path: str | Path) -> None:
    """Save through a temporary file, so a crash never leaves half a picture (format from the suffix)."""
    path = Path(path)
    kind = Image.registered_extensions()[path.suffix.lower()]
    options = JPEG_OPTIONS if kind == "JPEG" else {}
    with atomic_write(path) as tmp:
        img.save(tmp, format=kind, **options)
