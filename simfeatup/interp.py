"""PyTorch's bicubic resize (align_corners False) as weight matrices: one formula for the eager
models and their ONNX graphs.

As matrices the resize is two matmuls (onnxruntime's cubic Resize took 37% of a window on CPU,
the matmuls ~2%), and its sizes and scales may be symbolic, so one exported graph serves every
window size (SPEC 2.3's positional embedding, SPEC 3's x2 feature upsampling).
"""
from __future__ import annotations

import torch

BICUBIC_A = -0.75  # PyTorch's (and ONNX Resize's) cubic convolution coefficient (SPEC 7)


def bicubic_matrix(n_out, n_in: int, scale, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) weights of PyTorch's bicubic resize along one axis (align_corners False).

    Output i samples input position (i + 0.5) * scale - 0.5 with the cubic convolution
    (a = -0.75) over 4 taps clamped to the border: ``M @ x`` equals ``F.interpolate(...,
    mode="bicubic", align_corners=False)`` along that axis, where torch's scale is n_in / n_out
    for a target size and 1 / scale_factor for a scale factor. ``n_out`` and ``scale`` may be
    symbolic (a tensor scale keeps the arithmetic in the graph). Dtype and device of ``like``.
    """
    dst = torch.arange(n_out, dtype=like.dtype, device=like.device)
    src = (dst + 0.5) * scale - 0.5
    base = torch.floor(src)
    t = src - base
    x = torch.stack([t + 1, t, 1 - t, 2 - t], dim=1)  # distance to each of the 4 taps, (n_out, 4)
    a = BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    coef = torch.cat([far[:, :1], near[:, 1:3], far[:, 3:]], dim=1)
    taps = (base[:, None] + torch.arange(-1, 3, dtype=like.dtype, device=like.device)).clamp(0, n_in - 1)
    onehot = (taps[..., None] == torch.arange(n_in, dtype=like.dtype, device=like.device)).to(
        like.dtype
    )  # (n_out, 4, n_in)
    return (coef[..., None] * onehot).sum(1)


def padded_bicubic_matrix(n_out, n_in: int, pad: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out + 2 pad, n_in): :func:`bicubic_matrix` for a target size, its rows picked by the mirror
    index, so that ``M @ x`` is the resize reflect-padded by ``pad`` (SPEC 3: every step pads its
    source by the window radius). Computed in float32 at least, in ``like``'s device."""
    from .filters import mirror_index

    one = like.new_ones((), dtype=torch.promote_types(like.dtype, torch.float32))
    m = bicubic_matrix(n_out, n_in, (one * n_in) / (one * n_out), one)
    return m.index_select(0, mirror_index(n_out, pad, like.device)) if pad else m


def bicubic_resize(x: torch.Tensor, size, *, pad: int = 0) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bicubic", align_corners=False)`` as two matmuls.

    x (B, C, h, w) -> (B, C, *size); channels-last inference folds the resize into each step's
    filter instead (:meth:`simfeatup.filters.Strips.jbu`, :meth:`simfeatup.filters.Tiles.jbu`).
    The weights are computed in float32 (at least) and cast to x's dtype. ``pad``: the result
    reflect-padded by ``pad`` on every side (:func:`padded_bicubic_matrix`), made by the matmuls
    themselves: the padded values are the same dot products, with no copy of the resized map.
    """
    H, W = size
    h, w = x.shape[-2:]
    mh = padded_bicubic_matrix(H, h, pad, x).to(x.dtype)  # (H + 2 pad, h)
    mw = padded_bicubic_matrix(W, w, pad, x).to(x.dtype)  # (W + 2 pad, w)
    return mh @ x @ mw.T  # (B, C, H + 2 pad, W + 2 pad)
