"""The graph form of the segmenter's window model: what ``torch.onnx.export`` traces (SPEC 7).

One exported graph serves every window size, exactly and fast on onnxruntime. The graph form
calls the same formulas as the eager modules (:mod:`simfeatup.upsampler`, :mod:`simfeatup.interp`,
:meth:`DenseCLIP.resized_pos_embed`, :func:`simfeatup.upsampler.factored_cosine`) and differs
only in memory layout and evaluation order:
- DenseCLIP's positional embedding is computed in the graph from the symbolic h and w instead
  of cached per Python-int size (which tracing would freeze at the example size);
- SimFeatUp runs channels-last, each step's per-pixel 11x11 filter and range-kernel dot products
  as dense matmuls over tiles of one token's pixels (never C x 121 x H x W); its operator-vs-direct
  choice is made once, for the largest window.
:func:`simfeatup.export.verify.verify_onnx` (several sizes, batch 2, real samples) proves the
graphs equal to the eager modules.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..filters import Tiles, pointwise, reflect_pad
from ..interp import bicubic_resize
from ..upsampler import factored_cosine, pool_guidance


class GraphUpsampler(nn.Module):
    """SimFeatUp in graph form: the same parameters and step formulas, channels-last with tiled
    matmuls, for every window size."""

    def __init__(self, upsampler, max_tokens: int):
        super().__init__()
        self.up = upsampler
        # SimFeatUp takes the operator path when the token count is below the channel count;
        # one graph serves every size, so decide once for the largest window.
        self.operator = max_tokens < upsampler.dim
        steps = upsampler.steps()
        # static output side per token of each step: 2, 4, 8, then the patch
        self.sides = [2 ** (i + 1) for i in range(len(steps) - 1)] + [upsampler.patch_size]
        self.tiles = nn.ModuleList(Tiles(T, step.diameter) for T, step in zip(self.sides, steps))

    def _step(self, step, tiles: Tiles, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """JBUStep.forward channels-last: x (B, h', w', C), guide (B, H, W, 3) pooled, H = T*h -> (B, H, W, C)."""
        r = step.radius
        key = pointwise(step.range_proj, guide, dim=-1)  # (B, H, W, key_dim)
        logits = tiles.range_logits(key, reflect_pad(key, r, dims=(1, 2)))  # (B, h, w, T*T, d*d)
        k = step.kernel_from_range(logits, tiles.split(guide), dim=-1)
        src = bicubic_resize(x, guide.shape[1:3], channels_last=True)
        return tiles.filter(reflect_pad(src, r, dims=(1, 2)), k.to(src.dtype))

    def _upsample(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """SimFeatUp._upsample: x (B, h, w, K) channels-last, guidance (B, 3, H, W) -> (B, H, W, K)."""
        up = self.up
        h, w = x.shape[1:3]
        H, W = guidance.shape[-2:]
        for step, tiles, T in zip(up.steps(), self.tiles, self.sides):
            size = (H, W) if T == up.patch_size else (h * T, w * T)
            guide = pool_guidance(guidance, size).permute(0, 2, 3, 1)  # (B, h*T, w*T, 3)
            x = self._step(step, tiles, x, guide)
        return x

    def _operator(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """SimFeatUp._operator channels-last: the steps on the h*w unit images -> (B, H, W, n)."""
        B, _, h, w = x.shape
        n = h * w
        basis = torch.eye(n, dtype=x.dtype, device=x.device).view(1, h, w, n).expand(B, h, w, n)
        return self._upsample(basis, guidance.to(x.dtype))

    def forward(self, feats: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """feats (B, C, h, w), guidance (B, 3, h*p, w*p) -> (B, C, h*p, w*p), as SimFeatUp.forward."""
        up = self.up
        B, C = feats.shape[:2]
        H, W = guidance.shape[-2:]
        x = up._mix_channels(feats)  # (B, C, h, w)
        if self.operator:
            op = self._operator(x, guidance)  # (B, H, W, n)
            out = (x.flatten(2) @ op.reshape(B, H * W, -1).transpose(1, 2)).view(B, C, H, W)
        else:
            out = self._upsample(x.permute(0, 2, 3, 1), guidance.to(x.dtype)).permute(0, 3, 1, 2)
        return out + up.bias().to(out.dtype).view(1, C, 1, 1)

    def cosine_logits(self, feats: torch.Tensor, guidance: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """SimFeatUp.cosine_logits: (B, Q, H, W) float32, on the operator's columns when it is used."""
        if not self.operator:
            return torch.einsum("bchw,qc->bqhw", F.normalize(self(feats, guidance).float(), dim=1), text.float())
        up = self.up
        B = feats.shape[0]
        H, W = guidance.shape[-2:]
        x = up._mix_channels(feats)
        u = self._operator(x, guidance)  # (B, H, W, n)
        return factored_cosine(x.flatten(2), u.reshape(B, H * W, -1), up.bias(), text).reshape(B, -1, H, W)


@contextlib.contextmanager
def graph_form(segmenter):
    """A Segmenter over the same modules in graph form (see the module docstring); restores the encoder on exit."""
    from ..segmenter import Segmenter

    encoder = segmenter.encoder
    encoder.pos_embed = encoder.resized_pos_embed  # uncached, symbolic sizes
    try:
        up = None
        if segmenter.upsampler is not None:
            up = GraphUpsampler(segmenter.upsampler, (segmenter.window // segmenter.patch_size) ** 2)
        # window_logits itself is what gets traced
        geometry = {"long_side": segmenter.long_side, "window": segmenter.window, "stride": segmenter.stride}
        yield Segmenter(encoder, up, **geometry, cache=False)
    finally:
        del encoder.pos_embed
