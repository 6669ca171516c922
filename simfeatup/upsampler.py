"""SimFeatUp: learned joint bilateral upsampling of patch features, guided by the RGB window (SPEC 3).

The reference computes each step with a CUDA extension, and its PyTorch fallback unfolds the
features into C x 121 x H x W (~12 GB at C=512, 224x224). Here the same sums are exact but cheap:
- inference runs each step channels-last as dense matmuls over narrow strips (eager) or small
  tiles (the ONNX graph form), both through :meth:`JBUStep.forward_tiled`; training
  accumulates 121 shifted slices, a cache-sized channel chunk at a time, with its own backward;
- every step is linear in the features with one kernel for all channels, so the final 1x1 conv
  runs on the token grid, and with h*w < C the steps run on the h*w unit images (the columns of
  the operator) and one matmul mixes them into the C channels;
- scoring against text queries (:meth:`SimFeatUp.cosine_logits`) works on those h*w columns
  too, never on a C-channel full-resolution map.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import filters
from .atomic import atomic_write
from .filters import adaptive_filter, pointwise, range_logits, reflect_pad
from .interp import bicubic_resize

RADIUS = 5  # SPEC 3: the shared step filters an 11 x 11 window
STACK_RADIUS = 3  # SPEC 3.1: FeatUp's JBUStack (up1..up4) filters 7 x 7
KEY_DIM = 32  # SPEC 3: channels of the range projection
GUIDANCE_DIM = 3  # SPEC 3: RGB guidance
RESIDUAL = 0.1  # SPEC 3: kernel fixup and final fixup are both added with weight 0.1
KERNEL_DROPOUT = 0.1  # SPEC 3: Dropout2d inside range_proj and the kernel fixup
FINAL_DROPOUT = 0.2  # SPEC 3: Dropout2d before the final 1x1 conv
TEMP_MIN, TEMP_MAX = 1e-4, 1e4  # SPEC 3: clamp of the range temperature exp(t)
NORM_EPS = 1e-7  # SPEC 3: floor of the kernel sum before renormalising

FORMAT = "simfeatup-upsampler"
FORMAT_VERSION = 1


class UpsamplerFileError(ValueError):
    """An upsampler file that cannot be loaded: wrong format, missing tensor or wrong shape."""


def factored_cosine(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, text: torch.Tensor, *, orthonormal: bool = False
) -> torch.Tensor:
    """Cosine logits <f / |f|, t> of features given as f(p) = x u(p) + bias, never building f.

    x (B, C, n): the mixed token features, or an orthonormal basis of their span; u (B, P, n):
    each pixel's coordinates on x (the upsampling operator's rows, or the operator applied to
    the features' coordinates in that basis); bias (C,); text (Q, C). Then
    <f, t> = (x^T t) . u + t . b and |f|^2 = u^T (x^T x) u + 2 (x^T b) . u + |b|^2: n-wide
    products per pixel instead of a C-wide feature map to normalise and project. With
    ``orthonormal`` x^T x is the identity and |f|^2 needs only |u|^2 (a 196 x 196 Gram product per
    pixel saved at ViT-B/16). Returns (B, Q, P) float32, as F.normalize + einsum. The eager
    upsampler and its ONNX graph form both score with this.
    """
    x, u, bias, text = x.float(), u.float(), bias.float(), text.float()
    # x^T t for every query and x^T b, as rows of one (B, Q + 1, n) matrix: one product with u.
    # (bias @ x, not x^T @ bias: onnxruntime 1.32's MatmulTransposeFusion computes a transposed
    # batched matrix times a vector wrongly, relative error ~1)
    both = u @ torch.cat([text @ x, (bias @ x)[:, None, :]], dim=1).transpose(1, 2)  # (B, P, Q + 1)
    num, cross = both[..., :-1] + text @ bias, both[..., -1]  # (B, P, Q), (B, P): <f, t> and (x^T b) . u
    if orthonormal:
        quad = torch.linalg.vector_norm(u, dim=-1).square()  # |u|^2, no (B, P, n) temporary
    else:  # u^T (x^T x) u as a product and a sum: onnxruntime's Einsum took 8x longer for this row-wise dot
        quad = (u @ (x.transpose(1, 2) @ x) * u).sum(-1)
    sq = quad + 2 * cross + bias @ bias  # (B, P)
    norm = sq.clamp(min=0).sqrt().clamp(min=1e-12)  # F.normalize's eps
    return (num / norm[..., None]).transpose(1, 2)


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
        key = pointwise(self.range_proj, guide)  # (B, key_dim, H, W)
        return self.kernel_from_range(range_logits(reflect_pad(key, self.radius), key), guide)

    def kernel_from_range(self, logits: torch.Tensor, guide: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Range logits <P(p + o), P(p)> and the guidance -> the step's kernel K (SPEC 3).

        K = softmax over offsets of T * logits, times the spatial Gaussian, renormalised, plus
        0.1 * fixup([K, guide]). ``dim``: the axis of the d*d offsets and of the 3 guidance
        channels (1 eager; -1 in the channels-last graph form, whose logits come in tiles).
        """
        shape = [1] * logits.ndim
        shape[dim] = -1
        temp = self.range_temp.exp().clamp(TEMP_MIN, TEMP_MAX)
        k = torch.softmax(temp * logits, dim=dim) * self.spatial_kernel().view(shape)
        k = k / k.sum(dim, keepdim=True).clamp(min=NORM_EPS)
        if dim == 1 or self.training:
            return k + RESIDUAL * pointwise(self.fixup_proj, torch.cat([k, guide], dim=dim), dim)
        return k + RESIDUAL * self._fixup_channels_last(torch.cat([k, guide], dim=-1))

    def _fixup_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """fixup_proj in eval over the last axis, its d*d outputs zero-padded to a multiple of 16.

        The same sums (the padding rows and columns are zeros, GELU(0) = 0), but a GEMM with 128
        output columns ran 1.6x faster than with 121 (MKL, AVX-512, 1 thread).
        """
        first, act, _, last = self.fixup_proj
        n = last.out_channels
        pad = -n % 16
        w0 = F.pad(first.weight.flatten(1), (0, 0, 0, pad))
        w1 = F.pad(last.weight.flatten(1), (0, pad, 0, pad))
        h = act(F.linear(x, w0, F.pad(first.bias, (0, pad))))
        return F.linear(h, w1, F.pad(last.bias, (0, pad)))[..., :n]

    def forward(self, source: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """source (B, C, h, w), guide (B, 3, H, W) already pooled -> (B, C, H, W)."""
        src_pad = bicubic_resize(source, guide.shape[-2:], pad=self.radius)
        return adaptive_filter(src_pad, self.kernel(guide))

    def forward_tiled(self, source: torch.Tensor, guide: torch.Tensor, tiles, **layout) -> torch.Tensor:
        """The same step channels-last, for inference and the ONNX graph form.

        source (B, h, w, C), guide (B, H, W, 3) already pooled -> (B, H, W, C). ``tiles`` (a
        :class:`simfeatup.filters.Tiles`, whose tile side divides H and W, or eager
        :class:`simfeatup.filters.Strips`) computes the range logits, calls the step's kernel
        formula and filters the bicubic-resized source, so nothing is permuted between steps.
        ``layout``: passed on to ``tiles.jbu`` (``join=False``: :class:`Tiles`' tile layout).
        """
        r = self.radius
        key = pointwise(self.range_proj, guide, dim=-1)  # (B, H, W, key_dim)
        kernel_of = lambda logits, g: self.kernel_from_range(logits, g, dim=-1)  # noqa: E731
        return tiles.jbu(kernel_of, key, reflect_pad(key, r, dims=(1, 2)), guide, source, **layout)


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

    def _sizes(self, h: int, w: int, guidance: torch.Tensor) -> list[tuple[int, int]]:
        """Output size of every step: the token grid doubled, then the pixel grid."""
        return [(h << i, w << i) for i in range(1, self.n_steps)] + [tuple(guidance.shape[-2:])]

    def _autograd(self, *tensors: torch.Tensor) -> bool:
        """Whether a gradient may be asked for: then the steps run channels-first with their backward."""
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.parameters())

    def _upsample(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The JBU steps alone, channels-first: x (B, C, h, w) -> (B, C, H, W); linear in x for a fixed guidance."""
        guidance = guidance.to(x.dtype)
        if not self._autograd(x, guidance):
            return self._upsample_tiled(x.permute(0, 2, 3, 1), guidance).permute(0, 3, 1, 2)
        for step, size in zip(self.steps(), self._sizes(*x.shape[-2:], guidance)):
            x = step(x, pool_guidance(guidance, size))
        return x

    def _upsample_tiled(self, x: torch.Tensor, guidance: torch.Tensor, tiles=None, tile_layout=False) -> torch.Tensor:
        """The JBU steps channels-last (:meth:`JBUStep.forward_tiled`): x (B, h, w, K) -> (B, H, W, K).

        ``tiles``: one :class:`simfeatup.filters.Tiles` per step. The graph form passes square
        tiles with static sides for every window size; eager, each step runs
        :class:`simfeatup.filters.Strips` of the largest width <= ``filters.STRIP`` dividing its
        output width. ``tile_layout`` (graph form): the last step's output in its tiles' layout.
        """
        sizes = self._sizes(*x.shape[1:3], guidance)
        steps = self.steps()
        for i, (step, size) in enumerate(zip(steps, sizes)):
            t = tiles[i] if tiles is not None else filters.Strips(filters.tile_side(size[1], size[1], filters.STRIP),
                                                                  step.diameter)
            layout = {"join": False} if tile_layout and i == len(steps) - 1 else {}
            x = step.forward_tiled(x, pool_guidance(guidance, size).permute(0, 2, 3, 1), t, **layout)
        return x

    def forward(self, feats: torch.Tensor, guidance: torch.Tensor, *, tiles=None, operator=None) -> torch.Tensor:
        """feats (B, C, h, w) patch features; guidance (B, 3, h*p, w*p) CLIP-normalised RGB.

        Returns (B, C, h*p, w*p) in feats' dtype. ``tiles`` and ``operator`` are the graph form's
        (:mod:`simfeatup.export.graph_form`): its tiles per step and its operator-or-direct choice,
        made once for every window size; by default the operator is used when h*w < C.
        """
        self._check(feats, guidance)
        B, C, h, w = feats.shape
        H, W = guidance.shape[-2:]
        x = self._mix_channels(feats)
        if h * w < C if operator is None else operator:
            u = self._operator(x, guidance, tiles)  # (B, H, W, n)
            out = (x.flatten(2) @ u.reshape(B, H * W, -1).transpose(1, 2)).view(B, C, H, W)
        elif tiles is None:
            out = self._upsample(x, guidance)
        else:
            out = self._upsample_tiled(x.permute(0, 2, 3, 1), guidance.to(x.dtype), tiles).permute(0, 3, 1, 2)
        return out + self.bias().to(out.dtype).view(1, C, 1, 1)

    def cosine_logits(
        self, feats: torch.Tensor, guidance: torch.Tensor, text: torch.Tensor, *, tiles=None, operator=None
    ) -> torch.Tensor:
        """<f / |f|, t> of the upsampled features f = forward(feats, guidance) for text (Q, C).

        Returns (B, Q, H, W) float32. With fewer tokens than channels (ViT-B/16: 196 < 512) f is
        never built: :func:`factored_cosine` scores the operator's h*w columns instead.
        ``tiles``, ``operator``: as in :meth:`forward`.
        """
        self._check(feats, guidance)
        B, C, h, w = feats.shape
        H, W = guidance.shape[-2:]
        if not (h * w < C if operator is None else operator):
            f = self(feats, guidance, tiles=tiles, operator=False)
            return torch.einsum("bchw,qc->bqhw", F.normalize(f.float(), dim=1), text.float())
        x = self._mix_channels(feats)
        if tiles is not None or self._autograd(x, guidance):
            # the Gram form: ONNX has no QR, and QR's backward is undefined for rank-deficient tokens (a
            # uniform window); the graph form scores pixels in its last step's tile order
            u = self._operator(x, guidance, tiles, tile_layout=tiles is not None)  # (B, H, W, n) or tiled
            logits = factored_cosine(x.flatten(2), u.reshape(B, H * W, -1), self.bias(), text)  # (B, Q, H*W)
            if tiles is None:
                return logits.reshape(B, -1, H, W)
            return tiles[-1].join(logits.transpose(1, 2).reshape(*u.shape[:-1], -1)).permute(0, 3, 1, 2)
        # x = basis @ coords with an orthonormal basis: the steps run on the coordinates (as many
        # images as unit images, the same cost) and the norm needs no Gram matrix
        exact = torch.promote_types(x.dtype, torch.float32)
        basis, coords = torch.linalg.qr(x.flatten(2).to(exact))  # (B, C, n), (B, n, n)
        v = self._operator(x, guidance, coords=coords.transpose(1, 2).to(x.dtype))  # (B, H, W, n)
        logits = factored_cosine(basis, v.reshape(B, H * W, -1), self.bias(), text, orthonormal=True)
        return logits.reshape(B, -1, H, W)

    def _operator(self, x: torch.Tensor, guidance: torch.Tensor, tiles=None, coords=None,
                  tile_layout=False) -> torch.Tensor:
        """The steps applied to images on the h*w token grid -> (B, H, W, m), or with ``tile_layout``
        the last step's tile layout (B, H/T, W/T, T*T, m).

        coords (B, h*w, m): image j has value coords[:, k, j] at token k; by default the n = h*w
        unit images, whose results are the rows of the linear map per pixel. ``tile_layout``: as
        in :meth:`_upsample_tiled`. Every step is one image-dependent linear map, identical for
        every channel (SPEC 3), so with n < C running it on n images and mixing them into C
        channels is cheaper.
        """
        B, _, h, w = x.shape
        n = h * w
        guidance = guidance.to(x.dtype)
        if coords is None:
            coords = torch.eye(n, dtype=x.dtype, device=x.device).expand(B, n, n)
        images = coords.reshape(B, h, w, -1)
        if tiles is None and self._autograd(x, guidance, coords):
            return self._upsample(images.permute(0, 3, 1, 2), guidance).permute(0, 2, 3, 1)
        return self._upsample_tiled(images, guidance, tiles, tile_layout)

    def bias(self) -> torch.Tensor:
        """(C,) what the final fixup adds to every pixel: 0.1 * its conv's bias (SPEC 3)."""
        return RESIDUAL * self.fixup_proj[1].bias

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
        raise UpsamplerFileError(f"{path}: no such file (train one with python train/fit.py, which logs where it "
                                 "writes it, or convert the authors' with simfeatup convert-weights)")
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
            hint = (": a PyTorch checkpoint? convert it once with simfeatup convert-weights"
                    if path.suffix.lower() in (".ckpt", ".pt", ".pth") else "")
            raise UpsamplerFileError(f"{path}: not a safetensors file ({e}){hint}") from None
        if "simfeatup" not in meta:
            raise UpsamplerFileError(
                f"{path}: safetensors file without simfeatup metadata; write it with save_upsampler"
            )
        info = json.loads(meta["simfeatup"])
    if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
        raise UpsamplerFileError(
            f"{path}: format {info.get('format')!r} version {info.get('version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return info, weights


def read_info(path) -> dict:
    """The description of a saved upsampler (.safetensors or its .json), without reading its tensors."""
    return _read_info(Path(path))[0]


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
