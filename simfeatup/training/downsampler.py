"""Learned attention downsampler of SimFeatUp training (SPEC 4.5): high-res features -> token grid.

It models what the backbone does to a patch: a learned, content-dependent weighted mean of
the (slightly blurred) high-res features inside each patch x patch cell.
"""
from __future__ import annotations

import torch
from kornia.filters import gaussian_blur2d
from torch import Tensor, nn

# SPEC 4.5 -- 5x5 Gaussian blur with sigma 1, Dropout(0.2) before the logit, keep-mask p 0.8.
BLUR_KERNEL = 5
BLUR_SIGMA = 1.0
LOGIT_DROPOUT = 0.2
KEEP_P = 0.8


class AttentionDownsampler(nn.Module):
    """Softmax-weighted mean over each ``patch x patch`` cell.

    The per-pixel logit is ``linear(C -> 1)`` of the blurred features; in training each cell's
    logits are zeroed with probability 1 - KEEP_P (one draw per output cell, as the reference);
    then ``logit * weight[pos] + bias[pos]`` with a learnable (patch, patch) weight and bias,
    softmax over the patch x patch positions.
    """

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        # A 1x1 conv is linear(C -> 1) applied to every pixel without a channels-last copy.
        self.logit = nn.Conv2d(dim, 1, kernel_size=1)
        self.dropout = nn.Dropout(LOGIT_DROPOUT)
        # Small noise breaks the symmetry between positions (init ~1 and ~0).
        self.weight = nn.Parameter(torch.ones(patch_size, patch_size) + 0.01 * torch.randn(patch_size, patch_size))
        self.bias = nn.Parameter(0.01 * torch.randn(patch_size, patch_size))

    def forward(self, feats: Tensor) -> Tensor:
        """``feats`` (B, C, H, W) with H, W multiples of the patch size -> (B, C, H/p, W/p)."""
        b, c, height, width = feats.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"feature size {height}x{width} is not a multiple of the patch size {p}")
        h, w = height // p, width // p
        blurred = gaussian_blur2d(feats, BLUR_KERNEL, (BLUR_SIGMA, BLUR_SIGMA))
        logits = self.logit(self.dropout(blurred))  # (B, 1, H, W)
        logits = logits.reshape(b, h, p, w, p).permute(0, 1, 3, 2, 4).reshape(b, h, w, p * p)
        if self.training:
            keep = torch.rand(b, h, w, 1, device=logits.device) < KEEP_P
            logits = logits * keep
        logits = logits * self.weight.reshape(-1) + self.bias.reshape(-1)
        attn = logits.softmax(dim=-1)  # (B, h, w, p*p)
        # Back to the pixel layout so the weighted mean is one broadcast multiply and a sum.
        attn = attn.reshape(b, h, w, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, height, width)
        weighted = (blurred * attn).reshape(b, c, h, p, w, p)
        return weighted.sum(dim=(3, 5))  # (B, C, h, w)
