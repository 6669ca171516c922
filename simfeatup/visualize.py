"""Palette label maps and overlays for people to look at. numpy + Pillow only."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import atomic_write

# Distinct, colour-blind-friendlier colours first (Okabe-Ito, then Tableau); more are generated.
_BASE = [
    (0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (255, 255, 255), (148, 103, 189), (140, 86, 75), (127, 127, 127),
    (188, 189, 34), (23, 190, 207), (214, 39, 40), (44, 160, 44),
]


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours; index i always gets the same colour."""
    colours = list(_BASE[:n])
    golden = 0.618033988749895
    for i in range(len(colours), n):
        r, g, b = colorsys.hsv_to_rgb((i * golden) % 1.0, 0.65, 0.95 - 0.3 * ((i // 7) % 2))
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


def label_image(labels: np.ndarray, colours: np.ndarray) -> Image.Image:
    """(H, W) class indices -> palette ('P' mode) image whose pixel values are the labels."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(colours.reshape(-1).tolist())
    return img


def overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """RGB uint8 image blended with the label colours."""
    blend = image.astype(np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha
    return Image.fromarray(blend.round().astype(np.uint8), mode="RGB")


def save_atomic(img: Image.Image, path: str | Path) -> None:
    """Save through a temporary file, so a crash never leaves half a picture (format from the suffix)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        img.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
