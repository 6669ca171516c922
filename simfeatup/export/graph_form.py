"""The graph form of the segmenter's window model: what ``torch.onnx.export`` traces (SPEC 7).

One exported graph serves every window size, exactly and fast on onnxruntime. The graph form
calls the same formulas as the eager modules (:mod:`simfeatup.upsampler`, :mod:`simfeatup.interp`,
:meth:`DenseCLIP.resized_pos_embed`, :func:`simfeatup.upsampler.factored_cosine`) and differs
only in memory layout and evaluation order:
- DenseCLIP's positional embedding is computed in the graph from the symbolic h and w instead
  of cached per Python-int size (which tracing would freeze at the example size);
- SimFeatUp runs its channels-last inference steps (:meth:`JBUStep.forward_tiled`, as eager
  inference does) with square tiles whose sides divide one token's pixels (at most 8 x 8),
  the same for every window size (eager inference runs :class:`simfeatup.filters.Strips`,
  strided views that ONNX cannot express); its operator-vs-direct choice is made once, for
  the largest window.
:func:`simfeatup.export.verify.verify_onnx` (several sizes, batch 2, real samples) proves the
graphs equal to the eager modules.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..filters import TILE, Tiles


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
        # static tile side of each step: its output side per token (2, 4, 8, then the patch), or
        # the largest divisor of it <= TILE. A tile's range logits pair its T^2 pixels with
        # (T + d - 1)^2 keys, and its filter reads ~(T/2 + 5)^2 input pixels at x2 (13 x 13 for
        # T = 8, 1.4x the window sum's 121): larger tiles cost more per pixel in both, smaller
        # ones more gathered duplicates (8 x 8 was the fastest in onnxruntime, one thread)
        per_token = [2 ** (i + 1) for i in range(len(steps) - 1)] + [upsampler.patch_size]
        self.sides = [max(t for t in range(1, TILE + 1) if side % t == 0) for side in per_token]
        # each step's input side over its output side, per token: bounds the source window of a tile
        scales = [a / b for a, b in zip([1, *per_token[:-1]], per_token)]
        self.tiles = nn.ModuleList(Tiles(T, step.diameter, s) for T, step, s in zip(self.sides, steps, scales))

    def forward(self, feats: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """feats (B, C, h, w), guidance (B, 3, h*p, w*p) -> (B, C, h*p, w*p), as SimFeatUp.forward."""
        return self.up(feats, guidance, tiles=self.tiles, operator=self.operator)

    def cosine_logits(self, feats: torch.Tensor, guidance: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """SimFeatUp.cosine_logits: (B, Q, H, W) float32, on the operator's columns when it is used."""
        return self.up.cosine_logits(feats, guidance, text, tiles=self.tiles, operator=self.operator)


@contextlib.contextmanager
def graph_form(segmenter, *, static: bool = False):
    """A Segmenter over the same modules in graph form (see the module docstring); restores the encoder on exit.

    ``static``: for a graph of one window size, whose sizes are Python ints when traced: the
    eager (cached) positional embedding is exact there, the symbolic form is not needed.
    """
    from ..segmenter import Segmenter

    encoder = segmenter.encoder
    if not static:
        encoder.pos_embed = encoder.resized_pos_embed  # uncached, symbolic sizes
    try:
        up = None
        if segmenter.upsampler is not None:
            up = GraphUpsampler(segmenter.upsampler, (segmenter.window // segmenter.patch_size) ** 2)
        # window_logits itself is what gets traced
        geometry = {"long_side": segmenter.long_side, "window": segmenter.window, "stride": segmenter.stride}
        yield Segmenter(encoder, up, **geometry, cache=False)
    finally:
        if not static:
            del encoder.pos_embed


def layer_norms_in_fp32(model: nn.Module) -> int:
    """Replace every LayerNorm of a half-precision ``model`` by one that normalises in float32.

    fp16 graphs (docs/model-folder.md "fp16"): the input is cast to float32, normalised with
    float32 weights and cast back, so the graph holds Cast -> LayerNormalization (float32) ->
    Cast. The variance of ViT activations can exceed float16's range (TensorRT warns about
    exactly this for fp16 LayerNorm after attention). Returns how many were replaced.
    """
    from open_clip.transformer import LayerNormFp32

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    for name, norm in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fp32 = LayerNormFp32(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                             bias=norm.bias is not None)
        fp32.load_state_dict({k: v.float() for k, v in norm.state_dict().items()})
        setattr(parent, child, fp32)  # exports trace on the CPU
    return len(found)
