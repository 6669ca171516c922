"""The random transform tau of SimFeatUp training (SPEC 4.2), applied identically to any tensors.

tau = reflect-pad by ``max_pad``, zoom by z (bilinear, ``align_corners=False``), crop back to
the input size at an offset, then flip horizontally. Parameters are drawn once
(:func:`sample_jitter`) and applied by :func:`apply_jitter` to the image and to the high-res
features alike, so pixel (i, j) of both outputs comes from the same source location.

Instead of padding and zooming the whole tensor (the reference zooms 512 x 264 x 264 feature
maps by up to 2x before cropping), the crop is computed directly as one ``grid_sample``: the
output only ever costs what the input costs. Reflected sampling coordinates equal sampling
the reflect-padded tensor, because bilinear interpolation commutes with the reflection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# SPEC 4.2 -- horizontal flip (p 0.5); zoom (p 0.5) by U[1, 2]; reflect-pad 20 px and crop back.
FLIP_P = 0.5
ZOOM_P = 0.5
MAX_ZOOM = 2.0
MAX_PAD = 20


@dataclass(frozen=True)
class JitterParams:
    """One transform per sample: ``flip`` (B,) bool, ``zoom`` (B,) float >= 1,
    ``offset`` (B, 2) long -- (row, col) of the crop in the padded-then-zoomed image."""

    flip: Tensor
    zoom: Tensor
    offset: Tensor
    pad: int = MAX_PAD


def sample_jitter(
    batch: int,
    size: tuple[int, int],
    *,
    max_pad: int = MAX_PAD,
    max_zoom: float = MAX_ZOOM,
    generator: torch.Generator | None = None,
) -> JitterParams:
    """Draw ``batch`` independent transforms for inputs of spatial ``size`` (H, W).

    Drawn on the CPU (with ``generator`` when given) so a seed gives the same transforms on
    every device.
    """
    h, w = size
    flip = torch.rand(batch, generator=generator) < FLIP_P
    zoomed = torch.rand(batch, generator=generator) < ZOOM_P
    factor = 1.0 + torch.rand(batch, generator=generator, dtype=torch.float64) * (max_zoom - 1.0)
    zoom = torch.where(zoomed, factor, torch.ones_like(factor))
    # Any crop of the padded, zoomed image that stays inside it (as the reference samples it).
    room_h = ((h + 2 * max_pad) * zoom).floor().long() - h + 1
    room_w = ((w + 2 * max_pad) * zoom).floor().long() - w + 1
    u = torch.rand(batch, 2, generator=generator, dtype=torch.float64)
    offset = torch.stack([(u[:, 0] * room_h).long(), (u[:, 1] * room_w).long()], dim=1)
    return JitterParams(flip=flip, zoom=zoom, offset=offset, pad=max_pad)


def jitter_grid(params: JitterParams, size: tuple[int, int], *, device=None, dtype=None) -> Tensor:
    """Sampling grid (B, H, W, 2) for ``grid_sample(..., align_corners=True, padding_mode="reflection")``."""
    h, w = size
    zoom = params.zoom.to(torch.float64)[:, None]  # (B, 1)
    rows = torch.arange(h, dtype=torch.float64)[None]  # (1, H)
    cols = torch.arange(w, dtype=torch.float64)[None]  # (1, W)
    cols = torch.where(params.flip[:, None], (w - 1) - cols, cols)  # (B, W); flip is applied last
    # Output pixel u of the zoomed image reads padded pixel (u + 0.5) / z - 0.5 (align_corners=False).
    src_r = (params.offset[:, :1] + rows + 0.5) / zoom - 0.5 - params.pad  # (B, H) input pixels
    src_c = (params.offset[:, 1:] + cols + 0.5) / zoom - 0.5 - params.pad  # (B, W)
    # align_corners=True: -1 and 1 are the centres of the edge pixels, and "reflection" then
    # mirrors about them exactly like F.pad(mode="reflect").
    gy = 2.0 * src_r / max(h - 1, 1) - 1.0
    gx = 2.0 * src_c / max(w - 1, 1) - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, H, W, 2)
    return grid.to(device=device, dtype=dtype or torch.float32)


def apply_jitter(x: Tensor, params: JitterParams) -> Tensor:
    """Apply the transforms to ``x`` (B, C, H, W) of any C and float dtype -> (B, C, H, W)."""
    grid = jitter_grid(params, tuple(x.shape[-2:]), device=x.device, dtype=x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
