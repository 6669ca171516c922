"""The per-pixel window sums of a JBU step (SPEC 3), exact and memory-bounded, eager PyTorch.

- :func:`reflect_pad` / :func:`mirror_index`: the reflect padding of every step, any side length;
- :func:`adaptive_filter`: out(p) = sum over the d x d offsets o of K(p, o) src(p + o), as 121
  shifted multiply-adds over cache-sized channel chunks, with its own backward;
- :func:`range_logits`: <key(p + o), key(p)> for every offset, as one small matmul per tile;
- :func:`pointwise`: a stack of 1x1 convs over the channel axis of either layout.

Never materialises C x d^2 x H x W (the reference's fallback: ~12 GB at C=512, 224 x 224).
The ONNX graph form (:mod:`simfeatup.export.graph_form`) computes the same sums as tiled matmuls.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Channels per chunk of the adaptive filter are chosen so one chunk of the output is about this
# many bytes: it then stays in cache across the 121 offsets. Measured on a 2-core EPYC
# (2 MiB L2, 32 MiB L3), C=196..512 at 224x224 fp32: 4-10 MiB chunks are 2.5x faster than
# one unchunked pass and 1.2x faster than 1 MiB chunks.
CHUNK_BYTES = 8 << 20


def mirror_index(n, r: int, device=None) -> torch.Tensor:
    """Indices that mirror-pad an axis of ``n`` by ``r`` on both sides, as ``F.pad(mode="reflect")``.

    A side of n <= r pixels is mirrored repeatedly (period 2(n-1)); a 1-pixel side is repeated.
    ``n`` may be symbolic: the period is a tensor (a remainder by a symbolic int does not export).
    """
    i = torch.arange(-r, n + r, device=device)
    period = (i.new_ones(()) * (2 * (n - 1))).clamp(min=1)
    i = torch.remainder(i, period)
    return torch.where(i < n, i, period - i)


def reflect_pad(x: torch.Tensor, r: int, dims: tuple[int, int] = (-2, -1)) -> torch.Tensor:
    """Mirror-pad the two axes ``dims`` of ``x`` by ``r`` (:func:`mirror_index`), for any side length.

    The eager channels-first case with sides > r is ``F.pad``; other layouts (the ONNX graph
    form is channels-last) and short sides gather the same indices.
    """
    if dims == (-2, -1) and r < x.shape[-2] and r < x.shape[-1]:
        return F.pad(x, [r] * 4, mode="reflect")
    for dim in dims:
        x = x.index_select(dim, mirror_index(x.shape[dim], r, x.device))
    return x


def pointwise(layers: nn.Sequential, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """A Sequential of 1x1 convs, activations and dropouts over the channel axis ``dim``.

    dim 1 runs the layers as they are (channels-first); dim -1 (channels-last, the ONNX graph
    form) runs each 1x1 conv as the same weights in ``F.linear``. Dropouts act as modules in
    training and are identities in eval, in both layouts.
    """
    if dim == 1:
        return layers(x)
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            if layer.kernel_size != (1, 1):
                raise ValueError(f"expected 1x1 convolutions, got {layer}")
            x = F.linear(x, layer.weight.flatten(1), layer.bias)
        elif not (isinstance(layer, nn.modules.dropout._DropoutNd) and not layer.training):
            x = layer(x)
    return x


def adaptive_filter(src_pad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """out[b, c, y, x] = sum_o kernel[b, o, y, x] * src_pad[b, c, y + dy(o), x + dx(o)].

    src_pad (B, C, H + 2r, W + 2r); kernel (B, d*d, H, W) with offsets row-major (o = dy*d + dx).
    Returns (B, C, H, W) in src_pad's dtype, never materialising (B, C, d*d, H, W).
    """
    # The graph form (simfeatup.export) computes the same sums as one matmul per tile, which
    # onnxruntime runs far faster than 121 shifted products; eager PyTorch is faster with these.
    return _ShiftedSliceFilter.apply(src_pad, kernel.to(src_pad.dtype))


def _chunks(C: int, H: int, W: int, itemsize: int) -> range:
    """Channel chunk starts; chunk size = range step."""
    return range(0, C, max(1, min(C, CHUNK_BYTES // (H * W * itemsize))))


class _ShiftedSliceFilter(torch.autograd.Function):
    """adaptive_filter by 121 shifted multiply-adds per cache-sized channel chunk.

    Own backward: autograd through the slices would zero-fill a full-size gradient of src_pad
    per offset (121 per step), making backward ~10x the forward; here it is ~2x.
    """

    @staticmethod
    def forward(ctx, src_pad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(src_pad, kernel)
        C = src_pad.shape[1]
        H, W = kernel.shape[-2:]
        d = math.isqrt(kernel.shape[1])
        steps = _chunks(C, H, W, src_pad.element_size())
        parts = []
        for c0 in steps:
            src = src_pad[:, c0:c0 + steps.step]
            acc = src[..., :H, :W] * kernel[:, :1]
            for o in range(1, d * d):
                dy, dx = divmod(o, d)
                acc.addcmul_(src[..., dy:dy + H, dx:dx + W], kernel[:, o:o + 1])
            parts.append(acc)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        src_pad, kernel = ctx.saved_tensors
        C = src_pad.shape[1]
        H, W = kernel.shape[-2:]
        d = math.isqrt(kernel.shape[1])
        grad_src = torch.zeros_like(src_pad) if ctx.needs_input_grad[0] else None
        grad_kernel = torch.zeros_like(kernel) if ctx.needs_input_grad[1] else None
        steps = _chunks(C, H, W, src_pad.element_size())
        for c0 in steps:
            g = grad[:, c0:c0 + steps.step]
            for o in range(d * d):
                dy, dx = divmod(o, d)
                if grad_src is not None:
                    grad_src[:, c0:c0 + steps.step, dy:dy + H, dx:dx + W].addcmul_(g, kernel[:, o:o + 1])
                if grad_kernel is not None:
                    grad_kernel[:, o] += (g * src_pad[:, c0:c0 + steps.step, dy:dy + H, dx:dx + W]).sum(1)
        return grad_src, grad_kernel


# Tiled form of the d x d window sums: the output is cut into T x T tiles; each tile reads one
# (T + d - 1)^2 window of the padded input, so per-pixel window sums become one small dense
# matmul per tile ((T*T) x (T+d-1)^2), with the d*d offsets scattered/gathered by a fixed index.
TILE = 8  # largest tile side; the actual tile is the largest power of two <= TILE dividing H and W


def _tile_size(H: int, W: int) -> int:
    t = TILE
    while H % t or W % t:
        t //= 2
    return t


def _window_index(T: int, d: int, device) -> torch.Tensor:
    """(T*T, d*d): where offset o of tile pixel (i, j) sits in the flattened (T+d-1)^2 window."""
    S = T + d - 1
    i = torch.arange(T, device=device).view(T, 1, 1, 1)
    j = torch.arange(T, device=device).view(1, T, 1, 1)
    dy = torch.arange(d, device=device).view(1, 1, d, 1)
    dx = torch.arange(d, device=device).view(1, 1, 1, d)
    return ((i + dy) * S + (j + dx)).reshape(T * T, d * d)


def _to_tiles(x: torch.Tensor, T: int) -> torch.Tensor:
    """(B, c, H, W) -> (B, H/T, W/T, T*T, c)."""
    B, c, H, W = x.shape
    x = x.reshape(B, c, H // T, T, W // T, T).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, H // T, W // T, T * T, c)


def _from_tiles(x: torch.Tensor, T: int) -> torch.Tensor:
    """(B, H/T, W/T, T*T, c) -> (B, c, H, W)."""
    B, ty, tx, _, c = x.shape
    return x.reshape(B, ty, tx, T, T, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, ty * T, tx * T)


def _tile_windows(x_pad: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """(B, c, H + S - T, W + S - T) -> (B, H/T, W/T, S*S, c): each tile's input window."""
    B, c = x_pad.shape[:2]
    w = x_pad.unfold(2, S, T).unfold(3, S, T)  # (B, c, H/T, W/T, S, S)
    return w.permute(0, 2, 3, 4, 5, 1).reshape(B, w.shape[2], w.shape[3], S * S, c)


def range_logits(key_pad: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """<key(p + o), key(p)> for every offset: key_pad (B, k, H+2r, W+2r), key (B, k, H, W) -> (B, d*d, H, W).

    Tiled (all pairs in a tile's window, then the d*d wanted ones gathered): never builds the
    (B, k, d*d, H, W) unfold, and exports as a few matmuls instead of 121 shifted products.
    """
    H, W = key.shape[-2:]
    d = key_pad.shape[-1] - W + 1
    T = _tile_size(H, W)
    S = T + d - 1
    pairs = _to_tiles(key, T) @ _tile_windows(key_pad, T, S).transpose(-1, -2)  # (B, H/T, W/T, T*T, S*S)
    index = _window_index(T, d, key.device).expand(*pairs.shape[:-1], d * d)
    return _from_tiles(pairs.gather(-1, index), T)
