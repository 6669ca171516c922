"""The per-pixel window sums of a JBU step (SPEC 3), exact and memory-bounded, eager PyTorch.

- :func:`reflect_pad` / :func:`mirror_index`: the reflect padding of every step, any side length;
- :func:`adaptive_filter`: out(p) = sum over the d x d offsets o of K(p, o) src(p + o): tiled
  matmuls (:class:`Tiles`; eager JBU steps use their strided twin :class:`Strips`) for
  inference; 121 shifted multiply-adds over cache-sized channel
  chunks, with their own backward, for training;
- :func:`range_logits`: <key(p + o), key(p)> for every offset, as one small matmul per tile;
- :func:`pointwise`: a stack of 1x1 convs over the channel axis of either layout.

Never materialises C x d^2 x H x W (the reference's fallback: ~12 GB at C=512, 224 x 224).
The ONNX graph form (:mod:`simfeatup.export.graph_form`) uses the same :class:`Tiles`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .interp import padded_bicubic_matrix

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
    Returns (B, C, H, W) in src_pad's dtype, never materialising (B, C, d*d, H, W). Inference runs
    the tiled matmuls of :class:`Tiles`; under autograd the 121 shifted slices with their own
    lean backward (the tiles would keep (T*T, S*S) weights per tile for it).
    """
    kernel = kernel.to(src_pad.dtype)
    if torch.is_grad_enabled() and (src_pad.requires_grad or kernel.requires_grad):
        return _ShiftedSliceFilter.apply(src_pad, kernel)
    H, W = kernel.shape[-2:]
    t = tiles(tile_side(H, W, TILE), math.isqrt(kernel.shape[1]), kernel.device)
    out = t.filter(src_pad.permute(0, 2, 3, 1), t.split(kernel.permute(0, 2, 3, 1)))  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


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
# That costs (T + d - 1)^2 / d^2 more multiply-adds than the sum, but one BLAS call beats 121
# memory-bound elementwise passes by far (at 224 x 224 with 196 channels: ~5x in eager PyTorch,
# ~7x in onnxruntime). Memory is O(tiles x S*S x channels); never channels x d^2 x H x W.
# Largest tile side in eager PyTorch: 8 x 8 tiles did the last 224 x 224 step at 196 channels in
# 0.48 s against 0.52 s for 16 x 16 and 0.66 s for 4 x 4 (2 busy cores); under autograd the range
# logits keep (T*T, S*S) pairs per tile, which 8 keeps small. (The graph form: sides dividing a token, <= TILE.)
TILE = 8
# Width of the eager strips (:class:`Strips`), with the resize folded into the filter: at 224 x 224
# with 196 channels, 8 (9 x 12 sources per row) ran cosine_logits ~6% faster than 16 (9 x 16:
# fewer, larger matmuls, but 1.7x the range logits' pairs) and 32 ~12% slower (1 thread).
STRIP = 8


def tile_side(H: int, W: int, largest: int) -> int:
    """The largest power of two <= ``largest`` dividing both H and W."""
    t = largest
    while H % t or W % t:
        t //= 2
    return t


def _tracing() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


class Tiles(nn.Module):
    """A JBU step's per-pixel d x d windows (SPEC 3) as dense matmuls over T x T tiles, channels-last.

    The one tiled implementation of the window sums, for eager inference and the ONNX graph form
    alike. Only how values are moved differs: traced for ONNX, tiles are gathered with
    index_select (symbolic sizes, fast in onnxruntime); eager, with unfold views and
    scatter/gather (index_select along middle axes is ~10x slower in eager PyTorch).
    """

    def __init__(self, T: int, d: int, scale: float | None = None):
        super().__init__()
        self.T, self.d, self.S, self.scale = T, d, T + d - 1, scale
        S = self.S
        py, px, oy, ox = torch.meshgrid(*(torch.arange(n) for n in (T, T, d, d)), indexing="ij")
        p, q = py * T + px, (py + oy) * S + px + ox  # tile pixel, its source for offset (oy, ox) (row-major)
        # the (p, q) pairs in (p, offset) order: where offset (oy, ox) of tile pixel p sits in the flattened S x S
        # source window, as flat indices for index_select in the traced range logits (eager: :meth:`_windows_of`)
        self.register_buffer("pair_index", (p * S * S + q).flatten(), persistent=False)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h*T, w*T, C) -> (B, h, w, T*T, C)."""
        B, H, W, C = x.shape
        T = self.T
        return x.reshape(B, H // T, T, W // T, T, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H // T, W // T, T * T, C)

    def join(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, T*T, C) -> (B, h*T, w*T, C)."""
        B, h, w, _, C = x.shape
        T = self.T
        return x.reshape(B, h, w, T, T, C).permute(0, 1, 3, 2, 4, 5).reshape(B, h * T, w * T, C)

    def sources(self, x_pad: torch.Tensor, h, w) -> torch.Tensor:
        """Overlapping source tiles: (B, h*T + d-1, w*T + d-1, C) -> (B, h, w, S*S, C)."""
        B, C = x_pad.shape[0], x_pad.shape[-1]
        T, S = self.T, self.S
        if not _tracing():
            windows = x_pad.unfold(1, S, T).unfold(2, S, T)  # (B, h, w, C, S, S), a view
            return windows.permute(0, 1, 2, 4, 5, 3).reshape(B, h, w, S * S, C)
        ar = torch.arange(S, device=x_pad.device)
        rows = torch.arange(h, device=x_pad.device)[:, None] * T + ar
        cols = torch.arange(w, device=x_pad.device)[:, None] * T + ar
        return _tile_gather(x_pad, rows, cols)

    def range_logits(self, key: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
        """<key(p + o), key(p)>: key (B, H, W, K) and its reflect padding -> (B, h, w, T*T, d*d)."""
        B, H, W, _ = key.shape
        h, w = H // self.T, W // self.T
        pairs = self.split(key) @ self.sources(key_pad, h, w).transpose(-1, -2)  # (B, h, w, T*T, S*S)
        if not _tracing():
            return self._windows_of(pairs).reshape(B, h, w, self.T * self.T, self.d * self.d)
        picked = pairs.reshape(B, h, w, -1).index_select(-1, self.pair_index)
        return picked.reshape(B, h, w, self.T * self.T, self.d * self.d)

    def _windows_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The d x d window of every tile pixel inside its row of ``weight`` (B, h, w, T*T, S*S), as a
        strided view (B, h, w, T, T, d, d): pixel (py, px), offset (oy, ox) sits at column
        (py + oy) * S + px + ox of row py * T + px, i.e. at py * (T*S*S + S) + px * (S*S + 1) + oy * S + ox."""
        T, d, S = self.T, self.d, self.S
        b, i, j = weight.stride()[:3]
        shape = (*weight.shape[:3], T, T, d, d)
        return weight.as_strided(shape, (b, i, j, T * S * S + S, S * S + 1, S, 1), weight.storage_offset())

    def jbu(self, kernel_of, key: torch.Tensor, key_pad: torch.Tensor, guide: torch.Tensor,
            source: torch.Tensor, join: bool = True) -> torch.Tensor:
        """A JBU step's sums: range logits of key (B, H, W, K) with its padding, ``kernel_of(logits,
        guide)`` over the last axis (the step's kernel formula), then the filter of the step's source
        (B, h, w, C) bicubic-resized to (H, W) and reflect-padded -> (B, H, W, C), or with
        ``join=False`` the tile layout (B, H/T, W/T, T*T, C) (a per-pixel consumer saves the transpose).

        As in :class:`Strips`, the resize is folded into the filter: each tile's kernels are pushed
        through the resize weights onto the L x L source pixels the tile's padded window reads
        (13 x 13 at x2 for 8 x 8 tiles, against 18 x 18 on the resized map), and the filter is one
        (T*T, L*L) @ (L*L, C) matmul per tile on the source. L is a bound from the step's scale
        (``scale``: input over output side), since the graph's sizes are symbolic; eager, the
        exact width.
        """
        B, H, W, _ = key.shape
        T, d, S = self.T, self.d, self.S
        h, w = H // T, W // T
        n_y, n_x, C = source.shape[1:]
        r = (d - 1) // 2
        if self.scale is None and _tracing():
            raise ValueError("Tiles.jbu in a traced graph needs the step's scale (Tiles(T, d, scale))")
        kernel = kernel_of(self.range_logits(key, key_pad), self.split(guide))  # (B, h, w, T*T, d*d)
        # S padded rows span (S - 1) * scale input rows, plus the 4 cubic taps: a bound for every size
        bound = None if self.scale is None else math.ceil((S - 1) * self.scale) + 4
        ar = torch.arange(T, device=key.device)
        starts_y, starts_x = (torch.arange(n, device=key.device) * T for n in (h, w))  # first padded row of a tile
        by, first_y, Ly = _local_resample(padded_bicubic_matrix(H, n_y, r, source), starts_y, S, bound)  # (h, S, Ly)
        bx, first_x, Lx = _local_resample(padded_bicubic_matrix(W, n_x, r, source), starts_x, S, bound)
        window = (ar[:, None] + torch.arange(d, device=key.device)).flatten()  # padded rows py + dy of a tile
        by = by.index_select(1, window).reshape(h, T, d, Ly)
        bx = bx.index_select(1, window).reshape(w, T, d, Lx)
        k = kernel.to(by.dtype).reshape(B, h, w, T, T, d, d)
        k = k @ bx.reshape(1, 1, w, 1, T, d, Lx)  # (B, h, w, T, T, d, Lx): dx contracted
        k = by.transpose(-1, -2).reshape(1, h, 1, T, 1, Ly, d) @ k  # (B, h, w, T, T, Ly, Lx): dy contracted
        weight = k.reshape(B, h, w, T * T, Ly * Lx).to(source.dtype)
        rows = _clamped(first_y[:, None] + torch.arange(Ly, device=key.device), n_y)  # (h, Ly)
        cols = _clamped(first_x[:, None] + torch.arange(Lx, device=key.device), n_x)  # (w, Lx)
        out = weight @ _tile_gather(source, rows, cols)
        return self.join(out) if join else out

    def filter(self, src_pad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """The adaptive filter on a resized, padded map, eager (:func:`adaptive_filter`; the graph form
        filters the unresized source in :meth:`jbu`): src_pad (B, H + d-1, W + d-1, C), kernel
        (B, h, w, T*T, d*d) -> (B, H, W, C)."""
        B, h, w = kernel.shape[:3]
        weight = kernel.new_zeros(B, h, w, self.T * self.T, self.S * self.S)
        self._windows_of(weight).copy_(kernel.view(B, h, w, self.T, self.T, self.d, self.d))
        return self.join(weight @ self.sources(src_pad, h, w))


class Strips:
    """Eager twin of :class:`Tiles` over vertical strips T pixels wide, channels-last, whose filter
    reads the step's source before its bicubic resize.

    Range logits: output row y of strip j needs the d key rows y..y+d-1 of its (T + d - 1)-wide
    padded strip, which are contiguous: one (T, K) @ (K, d*S) matmul per row through a strided
    view (no copy). Filter: the resize (:func:`simfeatup.interp.padded_bicubic_matrix`, rows By,
    columns Bx) and the window sum are both linear, so out(y, x) = sum_q Wc(y, x, q) src(q) with
    Wc(y, x, qy, qx) = sum_(dy, dx) K(y, x, dy, dx) By(y + dy, qy) Bx(x + dx, qx). Row y of strip
    j touches only Ly source rows and its strip only Lx source columns (9 x 12 at x2 with T=8
    and d=11), so each output row of every strip is one (T, Ly*Lx) @ (Ly*Lx, C) matmul on the
    source: 0.9x the window sum's 121 multiply-adds per channel at x2, against 1.6x on the
    resized map, and the (H + d-1, W + d-1, C) resized map is never built. Strides cannot be
    expressed in ONNX: the graph form keeps :class:`Tiles`, which folds the resize the same way.
    """

    def __init__(self, T: int, d: int):
        self.T, self.d, self.S = T, d, T + d - 1

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, W/T, H, T, C)."""
        B, H, W, C = x.shape
        return x.view(B, H, W // self.T, self.T, C).permute(0, 2, 1, 3, 4).contiguous()

    def sources(self, x_pad: torch.Tensor) -> torch.Tensor:
        """(B, H + d-1, W + d-1, C) -> (B, W/T, H + d-1, S, C): the overlapping padded strips."""
        return x_pad.unfold(2, self.S, self.T).permute(0, 2, 1, 4, 3).contiguous()

    def _rows(self, strip: torch.Tensor) -> torch.Tensor:
        """A padded strip (H + d-1, S, K) as the H matrices (K, d*S) of rows y..y+d-1 (a view)."""
        rows, S, K = strip.shape
        return strip.as_strided((rows - self.d + 1, K, self.d * S), (S * K, 1, K), strip.storage_offset())

    def _windows_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The d x d window of every strip pixel inside its row of ``rows`` (..., T, d*S), as a
        strided view (..., T, d, d): offset (oy, ox) of pixel t sits at column oy*S + t + ox."""
        d, S = self.d, self.S
        shape = (*rows.shape[:-1], d, d)
        return rows.as_strided(shape, (*rows.stride()[:-2], d * S + 1, S, 1), rows.storage_offset())

    def jbu(self, kernel_of, key: torch.Tensor, key_pad: torch.Tensor, guide: torch.Tensor,
            source: torch.Tensor) -> torch.Tensor:
        """:meth:`Tiles.jbu` with the step's source (B, h, w, C) before its resize -> (B, H, W, C).

        One strip at a time, its logits and kernel (~2 MB at 224 x 224) stay in cache from the
        range matmul to the resampled filter weights Wc; then one batched matmul per output row
        over the strips, written in place into the (B, H, W, C) output."""
        keys, guides = self.split(key), self.split(guide)  # (B, n, H, T, .)
        key_src = self.sources(key_pad)  # (B, n, H + d-1, S, K)
        B, n, H, T, _ = keys.shape
        d, r = self.d, (self.d - 1) // 2
        h, w, C = source.shape[1:]
        dev = source.device
        by, first_y, Ly = _local_resample(padded_bicubic_matrix(H, h, r, source), torch.arange(H, device=dev), d)
        bx, first_x, Lx = _local_resample(padded_bicubic_matrix(n * T, w, r, source), torch.arange(n, device=dev) * T,
                                          self.S)  # by (H, d, Ly), bx (n, S, Lx)
        bx = bx.unfold(1, d, 1).permute(0, 1, 3, 2).contiguous()  # (n, T, d, Lx): columns t..t+d-1 of strip j
        cols = (first_x[:, None] + torch.arange(Lx, device=dev)).flatten()
        strips = source[:, :, cols].view(B, h, n, Lx, C).permute(0, 2, 1, 3, 4).contiguous()  # (B, n, h, Lx, C)
        resampled = by.new_empty(B, n, H, T, Ly * Lx)
        for b in range(B):
            for j in range(n):
                rows = torch.bmm(keys[b, j], self._rows(key_src[b, j]))  # (H, T, d*S)
                k = kernel_of(self._windows_of(rows).reshape(H, T, d * d), guides[b, j]).to(by.dtype)
                k = k.view(H, T, d, d).transpose(1, 2).reshape(H, d, T * d)  # rows dy, columns (t, dx)
                k = (by.transpose(1, 2) @ k).view(H, Ly, T, d).permute(2, 0, 1, 3).reshape(T, H * Ly, d)
                k = torch.bmm(k, bx[j])  # (T, H*Ly, Lx): one matmul per pixel column
                resampled[b, j].view(H, T, Ly, Lx).copy_(k.view(T, H, Ly, Lx).transpose(0, 1))
        resampled = resampled.to(source.dtype)
        out = source.new_empty(B, H, n * T, C)
        sb, sj = strips.stride()[:2]
        starts = (first_y * (Lx * C)).tolist()
        for b in range(B):
            for y in range(H):
                src = strips.as_strided((n, Ly * Lx, C), (sj, C, 1), strips.storage_offset() + b * sb + starts[y])
                torch.bmm(resampled[b, :, y], src, out=out[b, y].view(n, T, C))
        return out


def _tile_gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x (B, n_y, n_x, C), the rows (h, Ly) and columns (w, Lx) of every tile -> (B, h, w, Ly*Lx, C).

    One gather by a flat index, straight into the tile layout: gathering rows, then columns,
    then permuting took onnxruntime twice as long (a 26 M-value transpose at 224 x 224).
    """
    B, _, n_x, C = x.shape
    h, Ly = rows.shape
    w, Lx = cols.shape
    flat = (rows[:, None, :, None] * n_x + cols[None, :, None, :]).reshape(-1)  # (h, w, Ly, Lx)
    return x.reshape(B, -1, C).index_select(1, flat).reshape(B, h, w, Ly * Lx, C)


def _clamped(index: torch.Tensor, n) -> torch.Tensor:
    """``index`` clamped to [0, n - 1]; ``n`` may be symbolic."""
    return torch.minimum(index, index.new_ones(()) * (n - 1)).clamp(min=0)


def _local_resample(m: torch.Tensor, starts: torch.Tensor, span: int, L: int | None = None):
    """The blocks of a resize matrix ``m`` (n_out, n_in) that windows of ``span`` output rows use.

    For each window of rows starts[i]..starts[i] + span - 1 of ``m``: the first of L input
    columns holding all its nonzero weights, and the block of those rows and columns ->
    (blocks (N, span, L), firsts (N,), L). L: the widest such range (eager), or a bound given by
    the caller (the graph form, whose sizes are symbolic); the first is clamped so the block
    stays inside ``m``, and columns past its edge (an input narrower than L) get zero weights.
    """
    n_in = m.shape[1]
    ar = torch.arange(span, device=m.device)
    cols = torch.arange(n_in, device=m.device)
    nonzero = m != 0
    rows = starts[:, None] + ar  # (N, span)
    lo = torch.where(nonzero, cols, n_in).amin(1)[rows].amin(1)
    if L is None:
        L = int((torch.where(nonzero, cols, -1).amax(1)[rows].amax(1) - lo).max()) + 1
    first = torch.minimum(lo, cols.new_ones(()) * (n_in - L)).clamp(min=0)
    idx = first[:, None] + torch.arange(L, device=m.device)  # (N, L)
    picked = m[rows.flatten()].reshape(-1, span, n_in).gather(2, _clamped(idx, n_in)[:, None, :].expand(-1, span, L))
    return torch.where((idx < n_in)[:, None, :], picked, picked.new_zeros(())), first, L


_TILES: dict[tuple, Tiles] = {}


def tiles(T: int, d: int, device) -> Tiles:
    """A cached :class:`Tiles` with its indices on ``device``."""
    key = (T, d, str(device))
    if key not in _TILES:
        with torch.inference_mode(False):  # cached indices must serve autograd too, wherever first built
            _TILES[key] = Tiles(T, d).to(device)
    return _TILES[key]


def range_logits(key_pad: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """<key(p + o), key(p)> for every offset: key_pad (B, k, H+2r, W+2r), key (B, k, H, W) -> (B, d*d, H, W).

    Channels-first, through :class:`Tiles` (never the (B, k, d*d, H, W) unfold).
    """
    H, W = key.shape[-2:]
    d = key_pad.shape[-1] - W + 1
    t = tiles(tile_side(H, W, TILE), d, key.device)
    logits = t.range_logits(key.permute(0, 2, 3, 1), key_pad.permute(0, 2, 3, 1))  # (B, h, w, T*T, d*d)
    return t.join(logits).permute(0, 3, 1, 2)
