"""Training previews: input crop | low-res features | upsampled features, PCA'd to RGB.

Both feature maps go through the SAME 3-component PCA basis (fit on the low-res tokens) and
the same colour range, so the only visible difference is resolution: edges that sharpen
over training are the upsampler learning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pca_rgb(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """``low`` (C, h, w), ``high`` (C, H, W) -> RGB maps (3, h, w), (3, H, W) in [0, 1]."""
    tokens = low.flatten(1).T.float()  # (h*w, C)
    mean = tokens.mean(0, keepdim=True)
    # Top-3 right singular vectors of the centred tokens = the PCA basis.
    _, _, vh = torch.linalg.svd(tokens - mean, full_matrices=False)
    basis = vh[:3].T  # (C, 3); fewer than 3 when C < 3 is not a case we train
    lo = (tokens - mean) @ basis  # (h*w, 3)
    hi = (high.flatten(1).T.float() - mean) @ basis  # (H*W, 3)
    vmin, vmax = lo.min(0).values, lo.max(0).values
    span = (vmax - vmin).clamp_min(1e-8)

    def to_rgb(x: Tensor, shape) -> Tensor:
        return ((x - vmin) / span).clamp(0, 1).T.reshape(3, *shape)

    return to_rgb(lo, low.shape[1:]), to_rgb(hi, high.shape[1:])


def preview(image: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``image`` uint8 (3, H, W), ``low`` (C, h, w), ``high`` (C, H, W) -> uint8 (3, H, 3W) strip."""
    lo, hi = pca_rgb(low.detach(), high.detach())
    # Nearest keeps the token grid visible as blocks rather than faking detail.
    lo = F.interpolate(lo[None], size=high.shape[1:], mode="nearest")[0]
    strip = torch.cat([image.float().cpu() / 255.0, lo.cpu(), hi.cpu()], dim=2)
    return (strip * 255.0).round().clamp(0, 255).to(torch.uint8)
