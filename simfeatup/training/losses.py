"""SimFeatUp training objective (SPEC 4.4, 4.6, 4.7): random projection, uncertainty-weighted
feature reconstruction, and image reconstruction from the high-res features."""
from __future__ import annotations

import torch
from torch import Tensor, nn

# SPEC 4.4 -- both sides are projected to 30 random directions, fresh for every jitter.
PROJ_DIM = 30
# SPEC 4.6 -- s = exp(conv1x1(L') + 0.1), clamped >= 1e-4, conv init scaled by 0.1.
SCALE_OFFSET = 0.1
SCALE_MIN = 1e-4
SCALE_INIT = 0.1


def random_projection(
    batch: int,
    dim: int,
    out_dim: int = PROJ_DIM,
    *,
    generator: torch.Generator | None = None,
    device=None,
    dtype=None,
) -> Tensor:
    """Gaussian (B, dim, out_dim) matrices with unit-norm columns, one per sample.

    Drawn on the CPU (with ``generator`` when given) so a seed is reproducible on any device.
    """
    proj = torch.randn(batch, dim, out_dim, generator=generator)
    proj = proj / proj.norm(dim=1, keepdim=True)
    return proj.to(device=device, dtype=dtype or torch.float32)


def project(feats: Tensor, proj: Tensor) -> Tensor:
    """(B, C, h, w) features x (B, C, k) projection -> (B, k, h, w)."""
    return torch.einsum("bchw,bck->bkhw", feats, proj)


class UncertaintyHead(nn.Module):
    """Per-token scale s (B, 1, h, w) predicted from the target features (B, C, h, w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Conv2d(dim, 1, kernel_size=1)
        with torch.no_grad():
            # Starts near s = exp(0.1) everywhere so early steps weigh all tokens alike.
            self.net.weight.mul_(SCALE_INIT)
            self.net.bias.mul_(SCALE_INIT)

    def forward(self, feats: Tensor) -> Tensor:
        return torch.exp(self.net(feats) + SCALE_OFFSET).clamp_min(SCALE_MIN)


def reconstruction_loss(down: Tensor, target: Tensor, scale: Tensor) -> Tensor:
    """L_rec = mean((down - target)^2 / (2 s^2) + log s) over batch, channels and tokens.

    ``down``/``target`` (B, k, h, w) projected features; ``scale`` (B, 1, h, w). The squared
    error is taken per projected channel and averaged like everything else, exactly as the
    authors' code does (their ``||.||^2`` is a mean over the k directions, not a sum).
    """
    sq = (down - target).square()
    return (sq / (2 * scale.square()) + scale.log()).mean()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ImageHead(nn.Module):
    """CRN: high-res features (B, C, H, W) -> image (B, 3, H, W) in [-1, 1] (SPEC 4.7)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=1),
            LayerNorm2d(dim),
            nn.GELU(),
            nn.Conv2d(dim, 3, kernel_size=1),
            nn.Tanh(),
        )

    def forward(self, feats: Tensor) -> Tensor:
        return self.net(feats)


def image_loss(img: Tensor, rec: Tensor) -> Tensor:
    """L_img = mean((img - rec)^2); ``img`` is the CLIP-normalised jittered image (B, 3, H, W)."""
    return (img - rec).square().mean()
