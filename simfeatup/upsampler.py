"""SimFeatUp: learned joint bilateral upsampling of patch features, guided by the RGB window (SPEC 3).

The reference computes each step with a CUDA extension, and its PyTorch fallback unfolds the
features into C x 121 x H x W (~12 GB at C=512, 224x224). Here the same sums are exact but cheap:
- each step's filter accumulates 121 shifted slices, a cache-sized channel chunk at a time
  (under ONNX export: one small matmul per 8 x 8 tile, which onnxruntime runs far faster);
- every step is linear in the features with one kernel for all channels, so the final 1x1 conv
  runs on the token grid, and with h*w < C the steps run on the h*w unit images (the columns of
  the operator) and one matmul mixes them into the C channels.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write

RADIUS = 5  # SPEC 3: the shared step filters an 11 x 11 window
STACK_RADIUS = 3  # SPEC 3.1: FeatUp's JBUStack (up1..up4) filters 7 x 7
KEY_DIM = 32  # SPEC 3: channels of the range projection
GUIDANCE_DIM = 3  # SPEC 3: RGB guidance
RESIDUAL = 0.1  # SPEC 3: kernel fixup and final fixup are both added with weight 0.1
KERNEL_DROPOUT = 0.1  # SPEC 3: Dropout2d inside range_proj and the kernel fixup
FINAL_DROPOUT = 0.2  # SPEC 3: Dropout2d before the final 1x1 conv
TEMP_MIN, TEMP_MAX = 1e-4, 1e4  # SPEC 3: clamp of the range temperature exp(t)
NORM_EPS = 1e-7  # SPEC 3: floor of the kernel sum before renormalising

# Channels per chunk of the adaptive filter are chosen so one chunk of the output is about this
# many bytes: it then stays in cache across the 121 offsets. Measured on a 2-core EPYC
# (2 MiB L2, 32 MiB L3), C=196..512 at 224x224 fp32: 4-10 MiB chunks are 2.5x faster than
# one unchunked pass and 1.2x faster than 1 MiB chunks.
CHUNK_BYTES = 8 << 20

FORMAT = "simfeatup-upsampler"
FORMAT_VERSION = 1


class UpsamplerFileError(ValueError):
    """An upsampler file that cannot be loaded: wrong format, missing tensor or wrong shape."""


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def reflect_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mirror-pad the last two dims by ``r`` like ``F.pad(mode="reflect")``, also for sides <= r.

    A side of n <= r pixels is mirrored repeatedly (period 2(n-1)); a 1-pixel side is repeated.
    """
    h, w = x.shape[-2:]
    if r < h and r < w:
        return F.pad(x, [r] * 4, mode="reflect")

    def mirror(n: int) -> torch.Tensor:
        i = torch.arange(-r, n + r, device=x.device)
        if n == 1:
            return torch.zeros_like(i)
        i = i.remainder(2 * (n - 1))
        return torch.where(i < n, i, 2 * (n - 1) - i)

    return x.index_select(-2, mirror(h)).index_select(-1, mirror(w))


def adaptive_filter(src_pad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """out[b, c, y, x] = sum_o kernel[b, o, y, x] * src_pad[b, c, y + dy(o), x + dx(o)].

    src_pad (B, C, H + 2r, W + 2r); kernel (B, d*d, H, W) with offsets row-major (o = dy*d + dx).
    Returns (B, C, H, W) in src_pad's dtype, never materialising (B, C, d*d, H, W).
    """
    kernel = kernel.to(src_pad.dtype)
    if _exporting():
        # 121 shifted multiply-adds become ~500 graph nodes per step that onnxruntime runs
        # 4-6x slower than one batched matmul per tile; eager PyTorch is faster with the slices.
        return _adaptive_filter_tiles(src_pad, kernel)
    return _ShiftedSliceFilter.apply(src_pad, kernel)


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


def _adaptive_filter_tiles(src_pad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """adaptive_filter as one matmul per T x T tile (for ONNX): band (T*T, S*S) @ window (S*S, C)."""
    H, W = kernel.shape[-2:]
    d = math.isqrt(kernel.shape[1])
    T = _tile_size(H, W)
    S = T + d - 1
    k = _to_tiles(kernel, T)  # (B, H/T, W/T, T*T, d*d)
    index = _window_index(T, d, kernel.device).expand(k.shape)
    band = k.new_zeros(*k.shape[:-1], S * S).scatter(-1, index, k)  # (B, H/T, W/T, T*T, S*S)
    return _from_tiles(band @ _tile_windows(src_pad, T, S), T)


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


def pool_guidance(guidance: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool (B, 3, H, W) down to ``size``; plain avg_pool2d for integer factors (ONNX)."""
    H, W = guidance.shape[-2:]
    th, tw = size
    if (th, tw) == (H, W):
        return guidance
    if H % th == 0 and W % tw == 0:
        return F.avg_pool2d(guidance, (H // th, W // tw))
    return F.adaptive_avg_pool2d(guidance, size)


class JBUStep(nn.Module):
    """One joint bilateral upsampling step with a learned range kernel (SPEC 3).

    Parameter names follow the authors' checkpoint: range_temp, sigma_spatial, range_proj.{0,3},
    fixup_proj.{0,3}.
    """

    def __init__(self, *, radius: int = RADIUS, key_dim: int = KEY_DIM, guidance_dim: int = GUIDANCE_DIM):
        super().__init__()
        self.radius = radius
        self.diameter = 2 * radius + 1
        n = self.diameter**2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1),
            nn.GELU(),
            nn.Dropout2d(KERNEL_DROPOUT),
            nn.Conv2d(key_dim, key_dim, 1),
        )
        # Input: the n kernel channels first, then the guidance (SPEC 3.1).
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(n + guidance_dim, n, 1),
            nn.GELU(),
            nn.Dropout2d(KERNEL_DROPOUT),
            nn.Conv2d(n, n, 1),
        )
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))

    def spatial_kernel(self) -> torch.Tensor:
        """Gaussian over the window on linspace(-1, 1, d) coordinates -> (d*d,), row-major."""
        t = torch.linspace(-1, 1, self.diameter, device=self.sigma_spatial.device, dtype=self.sigma_spatial.dtype)
        dist2 = (t[:, None] ** 2 + t[None, :] ** 2).flatten()
        return torch.exp(-dist2 / (2 * self.sigma_spatial**2))

    def kernel(self, guide: torch.Tensor) -> torch.Tensor:
        """Per-pixel filter weights from the pooled guidance (B, 3, H, W) -> (B, d*d, H, W)."""
        key = self.range_proj(guide)  # (B, key_dim, H, W)
        logits = range_logits(reflect_pad(key, self.radius), key)  # (B, d*d, H, W)
        temp = self.range_temp.exp().clamp(TEMP_MIN, TEMP_MAX)
        k = torch.softmax(temp * logits, dim=1) * self.spatial_kernel().view(1, -1, 1, 1)
        k = k / k.sum(1, keepdim=True).clamp(min=NORM_EPS)
        return k + RESIDUAL * self.fixup_proj(torch.cat([k, guide], dim=1))

    def forward(self, source: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """source (B, C, h, w), guide (B, 3, H, W) already pooled -> (B, C, H, W)."""
        src = F.interpolate(source, size=guide.shape[-2:], mode="bicubic", align_corners=False)
        return adaptive_filter(reflect_pad(src, self.radius), self.kernel(guide))


class SimFeatUp(nn.Module):
    """SimFeatUp upsampler: ceil(log2(patch)) JBU steps, then out + 0.1 * conv1x1(dropout(out)).

    shared=True is the SimFeatUp layout (one step ``up`` reused, radius 5); shared=False is FeatUp's
    JBUStack (``up1``..``upN``, one per step, radius 3 in the released weights).
    """

    def __init__(
        self,
        dim: int = 512,
        patch_size: int = 16,
        *,
        radius: int = RADIUS,
        key_dim: int = KEY_DIM,
        shared: bool = True,
    ):
        super().__init__()
        if patch_size < 2:
            raise ValueError(f"patch_size must be >= 2, got {patch_size}")
        self.dim, self.patch_size, self.radius, self.key_dim, self.shared = dim, patch_size, radius, key_dim, shared
        # Every step doubles the grid except the last, which lands on the pixel grid: a patch
        # of 14 takes 4 steps (x2, x2, x2, x1.75).
        self.n_steps = math.ceil(math.log2(patch_size))
        if shared:
            self.up = JBUStep(radius=radius, key_dim=key_dim)
        else:
            for i in range(1, self.n_steps + 1):
                self.add_module(f"up{i}", JBUStep(radius=radius, key_dim=key_dim))
        self.fixup_proj = nn.Sequential(nn.Dropout2d(FINAL_DROPOUT), nn.Conv2d(dim, dim, 1))

    @property
    def config(self) -> dict:
        """Constructor arguments: ``SimFeatUp(**m.config)`` rebuilds the architecture."""
        return {
            "dim": self.dim,
            "patch_size": self.patch_size,
            "radius": self.radius,
            "key_dim": self.key_dim,
            "shared": self.shared,
        }

    def steps(self) -> list[JBUStep]:
        if self.shared:
            return [self.up] * self.n_steps
        return [getattr(self, f"up{i}") for i in range(1, self.n_steps + 1)]

    def _upsample(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The JBU steps alone: x (B, C, h, w) -> (B, C, H, W); linear in x for a fixed guidance."""
        H, W = guidance.shape[-2:]
        h, w = x.shape[-2:]
        sizes = [(h << i, w << i) for i in range(1, self.n_steps)] + [(H, W)]
        for step, size in zip(self.steps(), sizes):
            x = step(x, pool_guidance(guidance, size))
        return x

    def forward(self, feats: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """feats (B, C, h, w) patch features; guidance (B, 3, h*p, w*p) CLIP-normalised RGB.

        Returns (B, C, h*p, w*p) in feats' dtype.
        """
        self._check(feats, guidance)
        B, C, h, w = feats.shape
        H, W = guidance.shape[-2:]
        guidance = guidance.to(feats.dtype)
        x = self._mix_channels(feats)
        n = h * w
        if n < C:
            # The steps are one image-dependent linear map, identical for every channel: apply it
            # to the n unit images (its columns) and mix them into the C channels with one matmul.
            basis = torch.eye(n, dtype=feats.dtype, device=feats.device).view(1, n, h, w).expand(B, n, h, w)
            op = self._upsample(basis, guidance)  # (B, n, H, W)
            out = torch.bmm(x.flatten(2), op.flatten(2)).view(B, C, H, W)
        else:
            out = self._upsample(x, guidance)
        return out + RESIDUAL * self.fixup_proj[1].bias.to(out.dtype).view(1, C, 1, 1)

    def _check(self, feats: torch.Tensor, guidance: torch.Tensor) -> None:
        B, C, h, w = feats.shape
        p = self.patch_size
        if C != self.dim or guidance.shape != (B, GUIDANCE_DIM, h * p, w * p):
            raise ValueError(
                f"SimFeatUp(dim={self.dim}, patch_size={p}) expects feats (B, {self.dim}, h, w) and guidance "
                f"(B, 3, h*{p}, w*{p}); got feats {tuple(feats.shape)} and guidance {tuple(guidance.shape)}"
            )

    def _mix_channels(self, feats: torch.Tensor) -> torch.Tensor:
        """The final fixup without its bias, applied on the token grid (B, C, h, w).

        The fixup mixes channels per pixel and every JBU step filters each channel with the same
        kernel, so the two commute: mixing before upsampling is the same operator, far cheaper.
        """
        drop, conv = self.fixup_proj
        return feats + RESIDUAL * F.conv2d(drop(feats), conv.weight)

    def forward_factored(self, feats: torch.Tensor, guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() as basis (B, C, r) with orthonormal columns and coords (B, r, H, W), r <= h*w+1.

        forward(feats, guidance) == einsum("bcr,brhw->bchw", basis, coords), and per-pixel norms and
        dot products are those of coords (with basis^T t for a query t), so a caller scoring
        against a few text queries never builds the (B, C, H, W) tensor. Not exportable to ONNX
        (QR); export forward().
        """
        self._check(feats, guidance)
        B, C, h, w = feats.shape
        x = self._mix_channels(feats).flatten(2)  # (B, C, n)
        bias = RESIDUAL * self.fixup_proj[1].bias.to(x.dtype).view(1, C, 1).expand(B, C, 1)
        # The output's columns lie in span([x, bias]); QR gives an orthonormal basis of it and the
        # coordinates R, so the spatial steps run on R's rows (r <= n + 1 channels) instead of C.
        # QR has no half-precision kernels: run it in at least float32.
        span = torch.cat([x, bias], dim=2).to(torch.promote_types(x.dtype, torch.float32))
        basis, coef = torch.linalg.qr(span)  # (B, C, r), (B, r, n + 1)
        basis, coef = basis.to(x.dtype), coef.to(x.dtype)
        coords = self._upsample(coef[:, :, :-1].reshape(B, -1, h, w), guidance.to(x.dtype))
        return basis, coords + coef[:, :, -1:, None]


def save_upsampler(module: SimFeatUp, path, *, backbone: dict | None = None, extra: dict | None = None) -> None:
    """Write ``path`` (safetensors, description JSON in its metadata) and ``path.with_suffix(".json")``.

    backbone: which features the weights expect (e.g. encoder provenance). extra: further
    top-level sections for the description, e.g. ``{"training": {...}}``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"{path}: give the weights path (e.g. upsampler.safetensors), not the .json sidecar")
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "upsampler": module.config,
        "backbone": dict(backbone or {}),
        "weights": path.name,
    }
    clash = set(extra or {}) & set(info)
    if clash:
        raise ValueError(f"extra may not redefine {sorted(clash)}")
    info.update(extra or {})
    text = json.dumps(info, indent=2, sort_keys=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"simfeatup": text})
    with atomic_write(path.with_suffix(".json")) as tmp:
        tmp.write_text(text + "\n")


def _read_info(path: Path) -> tuple[dict, Path]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UpsamplerFileError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UpsamplerFileError(f"{path}: not valid JSON ({e})") from None
        weights = path.parent / str(info.get("weights", path.with_suffix(".safetensors").name))
    else:
        weights = path
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise UpsamplerFileError(f"{path}: not a safetensors file ({e})") from None
        if "simfeatup" not in meta:
            raise UpsamplerFileError(f"{path}: safetensors file without simfeatup metadata; write it with save_upsampler")
        info = json.loads(meta["simfeatup"])
    if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
        raise UpsamplerFileError(
            f"{path}: format {info.get('format')!r} version {info.get('version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return info, weights


def load_upsampler(path) -> tuple[SimFeatUp, dict]:
    """Rebuild a saved upsampler from its .safetensors or its .json -> (module in eval mode, info).

    info holds "upsampler" (config), "backbone" and any extra sections. Every tensor's name and
    shape is checked against the config; a mismatch raises UpsamplerFileError (a ValueError).
    """
    from safetensors.torch import load_file

    info, weights = _read_info(Path(path))
    if not weights.is_file():
        raise UpsamplerFileError(f"{path}: weights file {weights} not found")
    module = SimFeatUp(**info["upsampler"])
    state = load_file(str(weights))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UpsamplerFileError(
            f"{weights}: tensors do not match config {info['upsampler']}: missing {missing}, unexpected {unexpected}"
        )
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise UpsamplerFileError(
                f"{weights}: tensor {k!r} has shape {tuple(state[k].shape)} but config {info['upsampler']} "
                f"expects {tuple(v.shape)}"
            )
    module.load_state_dict(state)
    return module.eval(), info
