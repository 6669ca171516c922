"""Training previews: image | low-res features | upsampled (SimFeatUp) | bilinear, PCA'd to RGB.

One row per sample (the first :data:`PREVIEW_ROWS` of the batch). The three feature panels of
a row go through the SAME 3-component PCA basis, fitted on that sample's low-res tokens, and the
same colour range, so the only visible difference is how the features were brought to full
resolution: edges that sharpen over training, beyond bilinear's blur, are the upsampler learning.
Small crops are enlarged by an integer factor (nearest: a token stays a visible block).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from simfeatup.visualize import enlargement, grid

PREVIEW_ROWS = 4
TITLES = ("image", "low-res features", "upsampled (SimFeatUp)", "bilinear")
NOTE = "features: 3-component PCA to RGB, one basis per row (fitted on its low-res features)"


def pca_rgb(low: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """``low`` (C, h, w) and maps (C, H, W) of the same features -> RGB maps (3, ., .) in [0, 1].

    The basis and the colour range are those of ``low``'s tokens, for every map.
    """
    tokens = low.flatten(1).T.float()  # (h*w, C)
    mean = tokens.mean(0, keepdim=True)
    # Top-3 right singular vectors of the centred tokens = the PCA basis.
    _, _, vh = torch.linalg.svd(tokens - mean, full_matrices=False)
    basis = vh[:3].T  # (C, 3); fewer than 3 when C < 3 is not a case we train
    lo = (tokens - mean) @ basis  # (h*w, 3)
    vmin, vmax = lo.min(0).values, lo.max(0).values
    span = (vmax - vmin).clamp_min(1e-8)

    def to_rgb(feats: Tensor) -> Tensor:
        x = (feats.flatten(1).T.float() - mean) @ basis  # (N, 3)
        return ((x - vmin) / span).clamp(0, 1).T.reshape(-1, *feats.shape[1:])

    return tuple(to_rgb(f) for f in (low, *others))


def _hwc(x: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (x.detach().float().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def preview_rows(images: Tensor, low: Tensor, high: Tensor, rows: int = PREVIEW_ROWS) -> list[list[np.ndarray]]:
    """``images`` uint8 (B, 3, H, W), ``low`` (B, C, h, w), ``high`` (B, C, H, W) -> the panels of
    the first ``rows`` samples, each (H, W, 3) uint8 in the order of :data:`TITLES`."""
    low, high = low.detach(), high.detach()
    size = high.shape[-2:]
    bilinear = F.interpolate(low.float(), size=size, mode="bilinear", align_corners=False)  # (B, C, H, W)
    out = []
    for i in range(min(rows, images.shape[0])):
        lo, hi, bi = pca_rgb(low[i], high[i], bilinear[i])
        lo = F.interpolate(lo[None], size=size, mode="nearest")[0]  # the token grid as blocks
        out.append([images[i].detach().cpu().permute(1, 2, 0).numpy(), _hwc(lo), _hwc(hi), _hwc(bi)])
    return out


def preview(images: Tensor, low: Tensor, high: Tensor, rows: int = PREVIEW_ROWS) -> Image.Image:
    """The captioned preview picture of a batch (see :func:`preview_rows`), enlarged when small."""
    panels = preview_rows(images, low, high, rows)
    return grid(panels, TITLES, scale=enlargement(*panels[0][0].shape[:2]), note=NOTE)
