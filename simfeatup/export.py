"""Export a segmenter to ONNX and prove the graphs compute what torch computes (SPEC 7).

Two graphs go into a model folder: ``image.onnx`` (normalised windows (B, 3, H, W) + unit-norm
queries (Q, D) + lambda -> window logits (B, Q, H, W), the [CLS] subtraction inside) and
``text.onnx`` (token ids (N, L) -> unit-norm embeddings (N, D)), plus the BPE merges and
``manifest.json``. Batch, H and W (multiples of the patch), Q and N are dynamic.

The image graph is ``Segmenter.window_logits`` traced with export-only substitutions so that
ONE graph serves every window size, exactly and fast on onnxruntime:
- DenseCLIP's positional-embedding resize (cached per Python-int size, which tracing would
  silently freeze at the example size) becomes bicubic weight matrices computed from h and w;
- SimFeatUp runs in an export form with the same parameters and formulas: the per-pixel 11x11
  filter and range-kernel dot products as tiled matmuls (never C x 121 x H x W), bicubic x2 as
  matmuls, reflect padding as a gather; its size-dependent branches (operator vs direct path,
  small-map padding) are decided once for the largest window;
- on the operator path (more channels than tokens, e.g. ViT-B/16) the cosine logits come from
  the low-rank form of the features instead of a normalised (B, C, H, W) map.
The parity check in :func:`verify_onnx` (several sizes, batch 2, real samples) is what proves
the substitutions exact.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import imaging
from .runtime import FORMAT, FORMAT_VERSION, sha256
from .constants import CLIP_MEAN, CLIP_STD, DEFAULT_LAMBDA, LOGIT_SCALE, POS_EMBED_SCALE_EPS, STRIDE

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGE_GRAPH = "image.onnx"
TEXT_GRAPH = "text.onnx"
MERGES = "bpe_simple_vocab_16e6.txt.gz"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

FP32_TOLERANCE = 1e-4  # issue 4: max abs logit difference ORT vs torch, fp32
# fp16 graphs vs fp32 torch: observed max |logit diff| ~1e-4 (random ViT-B/16 + SimFeatUp) and
# ~2e-4 (tiny test model); cosine logits of real CLIP reach ~0.35, so 1e-2 leaves ample headroom.
FP16_TOLERANCE = 1e-2
FP16_MIN_AGREEMENT = 0.99  # share of window pixels whose argmax survives fp16 (random ViT-B/16: 99.90%)
BICUBIC_A = -0.75  # PyTorch's (and ONNX Resize's) cubic convolution coefficient (SPEC 7)


class OnnxExportError(RuntimeError):
    """The export failed or its graphs disagree with torch; nothing was left on disk."""


# --------------------------------------------------------------------------- graph pieces
def bicubic_matrix(n_out, n_in: int, scale, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) weights of PyTorch's bicubic resize along one axis (align_corners False).

    Output i samples input position (i + 0.5) * scale - 0.5 with the cubic convolution
    (a = -0.75) over 4 taps clamped to the border: ``M @ x`` equals ``F.interpolate(...,
    mode="bicubic", align_corners=False)`` along that axis, where torch's scale is n_in / n_out
    for a target size and 1 / scale_factor for a scale factor. ``n_out`` and ``scale`` may be
    symbolic (a tensor scale keeps the arithmetic in the graph).
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
    onehot = (taps[..., None] == torch.arange(n_in, dtype=like.dtype, device=like.device)).to(like.dtype)  # (n_out, 4, n_in)
    return (coef[..., None] * onehot).sum(1)


def _pos_embed(encoder, h, w) -> torch.Tensor:
    """DenseCLIP.pos_embed for a symbolic h x w grid -> (1 + h*w, width) (SPEC 2.3).

    Scale factors (n + 0.1) / grid as in DenseCLIP; the native grid keeps the embedding
    untouched (identity weights, chosen in the graph).
    """
    pos = encoder.clip.visual.positional_embedding
    gh, gw = encoder.grid_size
    work = torch.promote_types(pos.dtype, torch.float32)
    grid = pos[1:].to(work).reshape(gh, gw, -1)  # (gh, gw, C)
    one = grid.new_ones(())
    hh, ww = one * h, one * w  # the sizes as tensors
    native = (hh == gh) & (ww == gw)
    mh = torch.where(native, torch.eye(gh, dtype=work)[:h], bicubic_matrix(h, gh, gh / (hh + POS_EMBED_SCALE_EPS), grid))
    mw = torch.where(native, torch.eye(gw, dtype=work)[:w], bicubic_matrix(w, gw, gw / (ww + POS_EMBED_SCALE_EPS), grid))
    resized = torch.einsum("ij,jkc,lk->ilc", mh, grid, mw).reshape(-1, grid.shape[-1])  # (h*w, C)
    return torch.cat([pos[:1].to(work), resized]).to(pos.dtype)


def _bicubic_resize(x: torch.Tensor, size) -> torch.Tensor:
    """F.interpolate(mode="bicubic", align_corners=False) of channels-last (B, h, w, C) as two matmuls.

    onnxruntime's cubic Resize took 37% of a window on CPU; the matmuls take ~2%.
    """
    B, h, w, C = x.shape
    H, W = size
    one = x.new_ones((), dtype=torch.float32)
    mh = bicubic_matrix(H, h, (one * h) / (one * H), one).to(x.dtype)  # (H, h)
    mw = bicubic_matrix(W, w, (one * w) / (one * W), one).to(x.dtype)  # (W, w)
    x = mw @ x  # (B, h, W, C)
    return (mh @ x.reshape(B, h, W * C)).reshape(B, H, W, C)


def _mirror(x: torch.Tensor, r: int) -> torch.Tensor:
    """upsampler.reflect_pad of channels-last (B, H, W, C), for every side >= 2, without a size branch."""
    def index(n):
        i = torch.arange(-r, n + r, device=x.device)
        period = i.new_ones(()) * (2 * (n - 1))  # a tensor: remainder by a symbolic int does not export
        i = torch.remainder(i, period)
        return torch.where(i < n, i, period - i)

    return x.index_select(1, index(x.shape[1])).index_select(2, index(x.shape[2]))


def _pointwise(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A Sequential of 1x1 convs, activations and (eval-mode) dropouts over the LAST axis."""
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            if layer.kernel_size != (1, 1):
                raise OnnxExportError(f"expected 1x1 convolutions in the upsampler, got {layer}")
            x = F.linear(x, layer.weight.flatten(1), layer.bias)
        elif not isinstance(layer, nn.modules.dropout._DropoutNd):  # dropouts are identities in eval
            x = layer(x)
    return x


class _Tiles(nn.Module):
    """The JBU step's per-pixel d x d windows (SPEC 3) as dense matmuls over T x T tiles.

    Tensors are channels-last, so onnxruntime gathers and transposes whole channel vectors.
    Each output tile needs one (T + d - 1)^2 source tile; the d*d shifted products of a tile
    become one matmul with a (T*T, S*S) weight matrix that is zero outside each pixel's
    window. That costs (T + d - 1)^2 / d^2 more multiply-adds than the sum, but one BLAS call
    beats 121 elementwise passes by far in onnxruntime (0.13 s instead of 0.9 s for 196
    channels at 224 x 224). Memory is O(tiles x S*S x channels); never channels x d^2 x H x W.
    """

    def __init__(self, T: int, d: int):
        super().__init__()
        self.T, self.d, self.S = T, d, T + d - 1
        S = self.S
        py, px, oy, ox = torch.meshgrid(*(torch.arange(n) for n in (T, T, d, d)), indexing="ij")
        p, o, q = py * T + px, oy * d + ox, (py + oy) * S + px + ox  # pixel, offset (row-major), source
        # weight[p, q] = kernel[p, o] where q = p + o, else the zero slot appended after T*T*d*d
        weight = torch.full((T * T, S * S), T * T * d * d, dtype=torch.long)
        weight[p.flatten(), q.flatten()] = (p * d * d + o).flatten()
        # buffers, built before tracing: the graph stores them as two constant index tensors
        self.register_buffer("weight_index", weight.flatten(), persistent=False)
        # <key(q), key(p)> for q = p + o, picked out of all (p, q) pairs in (p, o) order
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
        ar = torch.arange(S, device=x_pad.device)
        rows = (torch.arange(h, device=x_pad.device)[:, None] * T + ar).reshape(-1)
        cols = (torch.arange(w, device=x_pad.device)[:, None] * T + ar).reshape(-1)
        x = x_pad.index_select(1, rows).index_select(2, cols)  # (B, h*S, w*S, C)
        return x.reshape(B, h, S, w, S, C).permute(0, 1, 3, 2, 4, 5).reshape(B, h, w, S * S, C)

    def range_logits(self, key: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
        """<key(p + o), key(p)>: key (B, H, W, K) and its reflect padding -> (B, h, w, T*T, d*d)."""
        B, H, W, _ = key.shape
        h, w = H // self.T, W // self.T
        pairs = self.split(key) @ self.sources(key_pad, h, w).transpose(-1, -2)  # (B, h, w, T*T, S*S)
        picked = pairs.reshape(B, h, w, -1).index_select(-1, self.pair_index)
        return picked.reshape(B, h, w, self.T * self.T, self.d * self.d)

    def filter(self, src_pad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """upsampler.adaptive_filter: src_pad (B, H + d-1, W + d-1, C), kernel (B, h, w, T*T, d*d) -> (B, H, W, C)."""
        B, h, w = kernel.shape[:3]
        k = F.pad(kernel.reshape(B, h, w, -1), (0, 1))  # + the zero slot
        weight = k.index_select(-1, self.weight_index).reshape(B, h, w, self.T * self.T, self.S * self.S)
        return self.join(weight @ self.sources(src_pad, h, w))


class _GraphUpsampler(nn.Module):
    """SimFeatUp.forward in export form: the same parameters and formulas (SPEC 3), computed
    channels-last with tiled matmuls, matmul bicubic and gather padding, for every window size."""

    def __init__(self, upsampler, max_tokens: int):
        super().__init__()
        self.up = upsampler
        # SimFeatUp takes the operator path when the token count is below the channel count;
        # one graph serves every size, so decide once for the largest window.
        self.operator = max_tokens < upsampler.dim
        steps = upsampler.steps()
        # static output side per token of each step: 2, 4, 8, then the patch
        self.sides = [2 ** (i + 1) for i in range(len(steps) - 1)] + [upsampler.patch_size]
        self.tiles = nn.ModuleList(_Tiles(T, step.diameter) for T, step in zip(self.sides, steps))

    def _step(self, step, tiles: _Tiles, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """x (B, h', w', C) channels-last, guide (B, H, W, 3) pooled, H = T*h -> (B, H, W, C)."""
        from .upsampler import NORM_EPS, RESIDUAL, TEMP_MAX, TEMP_MIN

        r = step.radius
        key = _pointwise(step.range_proj, guide)  # (B, H, W, key_dim)
        logits = tiles.range_logits(key, _mirror(key, r))  # (B, h, w, T*T, d*d)
        temp = step.range_temp.exp().clamp(TEMP_MIN, TEMP_MAX)
        k = torch.softmax(temp * logits, dim=-1) * step.spatial_kernel()
        k = k / k.sum(-1, keepdim=True).clamp(min=NORM_EPS)
        k = k + RESIDUAL * _pointwise(step.fixup_proj, torch.cat([k, tiles.split(guide)], dim=-1))
        src = _bicubic_resize(x, guide.shape[1:3])
        return tiles.filter(_mirror(src, r), k.to(src.dtype))

    def _run(self, feats, guidance):
        """-> (x, out, bias): x (B, C, h, w) after the final 1x1 mixing (no bias), out (B, H, W, K)
        channels-last: the upsampled x (K = C, direct path) or the upsampled unit images of the
        h*w tokens (K = h*w, operator path), and the bias 0.1 * b of the final conv (C,)."""
        from .upsampler import RESIDUAL, pool_guidance

        up = self.up
        B, C, h, w = feats.shape
        H, W = guidance.shape[-2:]
        guidance = guidance.to(feats.dtype)
        conv = up.fixup_proj[1]  # [0] is the Dropout2d, an identity in eval
        # the final fixup mixes channels per pixel and commutes with the steps (as in SimFeatUp)
        x = feats + RESIDUAL * F.conv2d(feats, conv.weight)  # (B, C, h, w)
        if self.operator:
            n = h * w
            out = torch.eye(n, dtype=feats.dtype, device=feats.device).view(1, h, w, n).expand(B, h, w, n)
        else:
            out = x.permute(0, 2, 3, 1)
        for step, tiles, T in zip(up.steps(), self.tiles, self.sides):
            size = (H, W) if T == up.patch_size else (h * T, w * T)
            guide = pool_guidance(guidance, size).permute(0, 2, 3, 1)  # (B, h*T, w*T, 3)
            out = self._step(step, tiles, out, guide)
        return x, out, RESIDUAL * conv.bias.to(feats.dtype)

    def forward(self, feats, guidance):
        """feats (B, C, h, w), guidance (B, 3, h*p, w*p) -> (B, C, h*p, w*p), as SimFeatUp.forward."""
        x, out, bias = self._run(feats, guidance)
        B, C = x.shape[:2]
        H, W = out.shape[1:3]
        if self.operator:
            out = (x.flatten(2) @ out.reshape(B, H * W, -1).transpose(1, 2)).view(B, C, H, W)
        else:
            out = out.permute(0, 3, 1, 2)
        return out + bias.view(1, C, 1, 1)

    def cosine_logits(self, feats, guidance, text):
        """<f / |f|, t> of the upsampled features f for text (Q, D), without materialising f.

        Operator path: f(p) = X u(p) + b with u(p) the upsampled unit images at p, so
        <f, t> = (X^T t) . u + t . b and |f|^2 = u^T (X^T X) u + 2 (X^T b) . u + |b|^2: two
        (h*w)-wide products per pixel instead of a C-wide feature map (B, C, H, W) that is
        normalised and projected (a quarter of the window's time, 2 x 100 MB per window).
        Returns (B, Q, H, W) float32, as F.normalize + einsum in Segmenter.window_logits.
        """
        x, u, bias = (t.float() for t in self._run(feats, guidance))
        B, H, W, n = u.shape
        text = text.float()
        x = x.flatten(2)  # (B, C, n)
        u = u.reshape(B, H * W, n)
        num = u @ (text @ x).transpose(1, 2) + text @ bias  # (B, H*W, Q)
        gram = x.transpose(1, 2) @ x  # (B, n, n)
        # (B, n); not x^T @ bias: onnxruntime 1.32's MatmulTransposeFusion computes a transposed
        # batched matrix times a vector wrongly (relative error ~1)
        cross = bias @ x
        sq = ((u @ gram) * u).sum(-1) + 2 * (u @ cross[..., None]).squeeze(-1) + bias @ bias  # (B, H*W)
        norm = sq.clamp(min=0).sqrt().clamp(min=1e-12)  # F.normalize's eps
        return (num / norm[..., None]).transpose(1, 2).reshape(B, -1, H, W)


@contextlib.contextmanager
def _exportable(segmenter):
    """Swap in the export forms (see module docstring); restores the segmenter on exit."""
    from .segmenter import Segmenter

    encoder = segmenter.encoder
    encoder.pos_embed = lambda h, w: _pos_embed(encoder, h, w)
    try:
        up = None
        if segmenter.upsampler is not None:
            up = _GraphUpsampler(segmenter.upsampler, (segmenter.window // segmenter.patch_size) ** 2)
        # A second Segmenter over the same modules: window_logits itself is what gets traced.
        yield Segmenter(encoder, up, long_side=segmenter.long_side, window=segmenter.window, stride=segmenter.stride)
    finally:
        del encoder.pos_embed


class ImageGraph(nn.Module):
    """Export-only wrapper: (windows, text, lam) -> Segmenter.window_logits(...) of an export-form segmenter."""

    def __init__(self, segmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, windows, text, lam):
        """windows (B, 3, H, W) normalised, text (Q, D) unit-norm, lam () -> logits (B, Q, H, W) float32."""
        seg = self.segmenter
        up = seg.upsampler
        if up is None or not up.operator:
            return seg.window_logits(windows, text, lam)
        # window_logits with the projection and normalisation done on the low-rank form (SPEC 2.5)
        feats, cls = seg.encoder(windows)  # (B, D, h, w), (B, D)
        cls = F.normalize(cls.float(), dim=1)
        return up.cosine_logits(feats, windows, text) + lam * (cls @ text.float().T)[:, :, None, None]


class TextGraph(nn.Module):
    """Export-only wrapper: token ids (N, L) int64 -> unit-norm embeddings (N, D) float32."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, tokens):
        return self.encoder.encode_text(tokens).float()


# --------------------------------------------------------------------------- public API
def export_onnx(
    out_dir,
    *,
    upsampler=None,
    model: str | None = None,
    pretrained: str | None = None,
    clip_config: dict | None = None,
    attention: str | None = None,
    segmenter=None,
    dtype: str = "fp32",
    opset: int | None = None,
    samples=None,
    overwrite: bool = False,
) -> Path:
    """Write a verified ONNX model folder to ``out_dir`` and return its path.

    The backbone and upsampler are chosen as in :func:`simfeatup.segmenter.build_segmenter`
    (``upsampler``: artefact path, or None/"bilinear"); or pass a ready ``segmenter`` (e.g. a
    randomly initialised one for benchmarks). ``dtype`` "fp32" or "fp16" is the graphs' weight
    precision (inputs and outputs stay float32). ``samples``: images for the parity check
    (default: the repository's ``samples/``). Everything is written to a temporary folder
    beside ``out_dir`` and renamed into place only after :func:`verify_onnx` passed; on any
    failure nothing is left behind. Raises ValueError for bad arguments, OnnxExportError when
    the graphs do not reproduce torch.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (overwrite or not any(out_dir.iterdir()))):
        raise ValueError(f"{out_dir} already exists; choose another --out or pass overwrite=True (--overwrite)")

    upsampler_info = {"kind": "bilinear"}
    if segmenter is None:
        from .segmenter import build_segmenter

        segmenter = build_segmenter(upsampler, model=model, pretrained=pretrained, clip_config=clip_config, attention=attention)
        if upsampler is not None and str(upsampler) != "bilinear":
            upsampler_info = _upsampler_info(Path(upsampler))
    else:
        if any(v is not None for v in (upsampler, model, pretrained, clip_config)):
            raise ValueError("pass either segmenter= or upsampler/model/pretrained/clip_config, not both")
        if segmenter.upsampler is not None:
            upsampler_info = {"kind": "simfeatup", "config": segmenter.upsampler.config, "source": "in-memory module"}
    # The torch reference stays float32 on CPU; an fp16 export traces a half copy of it.
    param = next(segmenter.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        segmenter = copy.deepcopy(segmenter).to(device="cpu", dtype=torch.float32)
    reference = segmenter.eval()
    _check_tokenizer(reference.encoder)
    traced = copy.deepcopy(reference).half() if dtype == "fp16" else reference

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the model folder should not be
    try:
        started = time.perf_counter()
        with torch.no_grad():
            _export_image(traced, tmp / IMAGE_GRAPH, opset)
            _export_text(traced.encoder, tmp / TEXT_GRAPH, opset)
        del traced
        if opset is not None:
            _check_opset(tmp, opset)
        shutil.copyfile(_open_clip_merges(), tmp / MERGES)
        manifest = _manifest(reference, upsampler_info, dtype, tmp)
        _write_manifest(tmp, manifest)
        logger.info("exported %s in %.0f s; verifying against torch", out_dir, time.perf_counter() - started)
        report = verify_onnx(tmp, reference, samples=samples)
        manifest["verification"] = report
        _write_manifest(tmp, manifest)  # the report is not covered by the file checksums
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", out_dir)
    return out_dir


def verify_onnx(model_dir, segmenter, *, samples=None, sizes=None, seed: int = 0) -> dict:
    """Check a model folder against the float32 torch ``segmenter`` it was exported from.

    onnx.checker on both graphs, the dynamic input dims, then onnxruntime vs torch on random
    windows at several sizes (batch 2), on windows cut from real sample images, and on the
    text graph. fp32: max abs logit difference <= 1e-4 and the same label (argmax over
    queries) at every pixel; fp16: the error is logged and must stay below a bound. Returns
    the observed figures; raises OnnxExportError otherwise.
    """
    import onnx
    import onnxruntime as ort

    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    fp16 = manifest["dtype"] == "fp16"
    for name, dims in ((IMAGE_GRAPH, {"windows": 4, "text": 2}), (TEXT_GRAPH, {"tokens": 2})):
        path = model_dir / name
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as err:
            raise OnnxExportError(f"{name} fails onnx.checker: {err}") from None
        _check_dims(onnx.load(str(path), load_external_data=False), name, dims)

    from .runtime import session_options

    sessions = {n: ort.InferenceSession(str(model_dir / n), session_options(), providers=["CPUExecutionProvider"]) for n in (IMAGE_GRAPH, TEXT_GRAPH)}
    reference = segmenter  # fp16 graphs are judged against fp32 torch too: that is the error users see
    patch = segmenter.patch_size
    window = segmenter.window
    rng = np.random.default_rng(seed)
    D = segmenter.encoder.embed_dim
    text = rng.standard_normal((5, D)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    lam = np.float32(DEFAULT_LAMBDA)
    cases = []
    for H, W in sizes or [(window, window), (window, 6 * patch), (3 * patch, window), (patch, window), (5 * patch, 7 * patch)]:
        cases.append((f"random {H}x{W}", rng.standard_normal((2, 3, H, W)).astype(np.float32)))
    cases += _sample_windows(samples, window, patch)
    worst, flips, agreement = 0.0, 0, 1.0
    for label, windows in cases:
        with torch.no_grad():
            ref = reference.window_logits(torch.from_numpy(windows), torch.from_numpy(text), float(lam)).numpy()
        got = sessions[IMAGE_GRAPH].run(None, {"windows": windows, "text": text, "lam": np.asarray(lam)})[0]
        if got.shape != ref.shape:
            raise OnnxExportError(f"image graph gave {got.shape} for {label}, torch {ref.shape}")
        diff = float(np.abs(got - ref).max())
        same = got.argmax(1) == ref.argmax(1)
        worst = max(worst, diff)
        agreement = min(agreement, float(same.mean()))
        logger.info("parity %-28s max |logit diff| %.2e, labels %.4f%% equal", label, diff, 100 * same.mean())
        if not fp16:
            # A flip is only acceptable where torch itself has a tie below the tolerance.
            top2 = np.sort(ref, axis=1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
            bad = ~same & (margin > 2 * FP32_TOLERANCE)
            flips += int((~same).sum())
            if diff > FP32_TOLERANCE or bad.any():
                raise OnnxExportError(
                    f"image graph disagrees with torch on {label}: max |logit diff| {diff:.2e} "
                    f"(limit {FP32_TOLERANCE:g}), {int(bad.sum())} pixel(s) with a different label"
                )
    if fp16:
        logger.info("fp16 image graph: max |logit diff| %.3g vs fp32 torch (bound %g), labels >= %.2f%% equal",
                    worst, FP16_TOLERANCE, 100 * agreement)
        if worst > FP16_TOLERANCE or agreement < FP16_MIN_AGREEMENT:
            raise OnnxExportError(
                f"fp16 image graph too far from torch: max |logit diff| {worst:.3g} (bound {FP16_TOLERANCE}), "
                f"{100 * agreement:.2f}% labels equal (bound {100 * FP16_MIN_AGREEMENT:.0f}%)"
            )
    _verify_tokenizer(model_dir, reference.encoder)
    text_diff = _verify_text(sessions[TEXT_GRAPH], reference.encoder)
    bound = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    if text_diff > bound:
        raise OnnxExportError(f"text graph disagrees with torch: max |embedding diff| {text_diff:.2e} (limit {bound:g})")
    return {
        "max_abs_logit_diff": worst,
        "min_label_agreement": agreement,
        "tie_flips": flips,
        "max_abs_text_diff": text_diff,
        "cases": [label for label, _ in cases],
    }


# --------------------------------------------------------------------------- helpers
def _export_image(segmenter, path: Path, opset):
    from torch.export import Dim

    patch = segmenter.patch_size
    D = segmenter.encoder.embed_dim
    with _exportable(segmenter) as graph_segmenter:
        wrapper = ImageGraph(graph_segmenter).eval()
        # Batch 2 (not 1) in the example: a size-1 example dim gets specialised (SPEC 7).
        windows = torch.randn(2, 3, segmenter.window, segmenter.window)
        text = F.normalize(torch.randn(3, D), dim=1)
        lam = torch.tensor(DEFAULT_LAMBDA)
        h, w = Dim("h", min=1), Dim("w", min=1)
        dynamic = {
            "windows": {0: Dim("batch", min=1), 2: patch * h, 3: patch * w},
            "text": {0: Dim("queries", min=1)},
            "lam": None,
        }
        program = torch.onnx.export(
            wrapper,
            (windows, text, lam),
            None,
            dynamo=True,
            input_names=["windows", "text", "lam"],
            output_names=["logits"],
            dynamic_shapes=dynamic,
            opset_version=opset,
            optimize=True,  # folds the shape arithmetic: ~3x fewer nodes, no CastLike left for onnxruntime
            verbose=False,
        )
    program.save(str(path), external_data=True)


def _export_text(encoder, path: Path, opset):
    from torch.export import Dim

    tokens = encoder.tokenize(["a photo of a road.", "a bad photo of the building."])  # batch 2, see above
    program = torch.onnx.export(
        TextGraph(encoder).eval(),
        (tokens,),
        None,
        dynamo=True,
        input_names=["tokens"],
        output_names=["embeddings"],
        dynamic_shapes={"tokens": {0: Dim("texts", min=1)}},
        opset_version=opset,
        optimize=True,
        verbose=False,
    )
    program.save(str(path), external_data=True)


def _graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _check_opset(folder: Path, opset: int) -> None:
    """torch.onnx keeps its own opset when it cannot convert a graph: say so instead of shipping it."""
    for name in (IMAGE_GRAPH, TEXT_GRAPH):
        got = _graph_opset(folder / name)
        if got != opset:
            raise ValueError(f"--opset {opset}: the exporter could only write opset {got} for {name}; use --opset {got} or higher")


def _check_dims(model, name: str, symbolic: dict) -> None:
    """Dynamic dims must be symbolic in the saved graph, never a number baked in by tracing."""
    inputs = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    for input_name, rank in symbolic.items():
        dims = inputs.get(input_name)
        if dims is None or len(dims) != rank:
            raise OnnxExportError(f"{name}: input {input_name!r} missing or not of rank {rank}")
        want = {"windows": (0, 2, 3), "text": (0,), "tokens": (0,)}[input_name]
        fixed = [i for i in want if not dims[i].dim_param]
        if fixed:
            raise OnnxExportError(
                f"{name}: input {input_name!r} has fixed dims {[dims[i].dim_value for i in fixed]} at axes {fixed}; "
                "they must be dynamic (the exporter specialised them)"
            )


def _check_tokenizer(encoder) -> None:
    """The runtime re-implements open_clip's default CLIP BPE only: refuse other tokenizers."""
    import open_clip.tokenizer as oct

    tok = encoder.tokenizer
    if type(tok) is not oct.SimpleTokenizer or tok.clean_fn is not oct._clean_lower or tok.reduction_fn is not None:
        raise ValueError(
            f"{encoder.backbone.describe()} uses {type(tok).__name__} (clean/reduction options included); "
            "the ONNX runtime only reproduces CLIP's default BPE tokenizer (OpenAI/LAION ViT CLIP models)"
        )


def _verify_tokenizer(model_dir: Path, encoder) -> None:
    from .tokenizer import Tokenizer

    texts = ["a photo of a building.", "forêt, rivière", "道路", "🏠", "x " * 100]
    mine = Tokenizer(model_dir / MERGES, context_length=encoder.context_length)(texts)
    if not np.array_equal(mine, encoder.tokenize(texts).numpy()):
        raise OnnxExportError("simfeatup.tokenizer disagrees with the model's open_clip tokenizer")


def _verify_text(session, encoder) -> float:
    words = ["building", "road", "bâtiment", "道路"]
    tokens = encoder.tokenize([f"a photo of a {w}." for w in words])
    with torch.no_grad():
        ref = encoder.encode_text(tokens).float().numpy()
    got = session.run(None, {"tokens": tokens.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    logger.info("parity text graph: max |embedding diff| %.2e", diff)
    return diff


def default_samples() -> list[Path]:
    """The repository's bundled sample images, if this is a source checkout."""
    folder = Path(__file__).resolve().parents[1] / "samples"
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _sample_windows(samples, window: int, patch: int) -> list[tuple[str, np.ndarray]]:
    """Two windows per sample image, cut and padded exactly as the segmenters do."""
    paths = [Path(p) for p in samples] if samples is not None else default_samples()
    if not paths:
        logger.warning("no sample images: the parity check uses random windows only")
    cases = []
    for path in paths:
        x = imaging.preprocess(imaging.load_image(path))
        boxes = imaging.window_boxes(*x.shape[1:], window, STRIDE)
        picked = [boxes[0], boxes[-1]]
        shapes = {(b[1] - b[0], b[3] - b[2]) for b in picked}
        if len(shapes) != 1:  # windows of different sizes cannot share a batch
            picked = picked[:1]
        batch = []
        for y0, y1, x0, x1 in picked:
            (top, bottom), (left, right) = imaging.padding(y1 - y0, patch), imaging.padding(x1 - x0, patch)
            batch.append(np.pad(x[:, y0:y1, x0:x1], ((0, 0), (top, bottom), (left, right))))
        cases.append((f"sample {path.name}", np.stack(batch)))
    return cases


def _open_clip_merges() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def _upsampler_info(path: Path) -> dict:
    """Provenance of an upsampler artefact: its config, backbone, training notes and checksum."""
    from .upsampler import load_upsampler

    _, info = load_upsampler(path)
    weights = path.parent / info["weights"] if path.suffix == ".json" else path
    extra = {k: v for k, v in info.items() if k not in ("upsampler", "backbone", "weights", "format", "version")}
    return {"kind": "simfeatup", "config": info["upsampler"], "backbone": info.get("backbone", {}),
            "file": weights.name, "sha256": sha256(weights), **extra}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("simfeatup", "torch", "onnx", "onnxscript", "onnxruntime", "open_clip_torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _manifest(segmenter, upsampler_info: dict, dtype: str, folder: Path) -> dict:
    encoder = segmenter.encoder
    tok = encoder.tokenizer
    used_opset = _graph_opset(folder / IMAGE_GRAPH)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "opset": used_opset,
        "graphs": {
            "image": {"file": IMAGE_GRAPH, "inputs": {"windows": "(B, 3, H, W) float32, CLIP-normalised, H and W multiples of patch",
                                                   "text": "(Q, D) float32 unit-norm", "lam": "() float32"},
                      "outputs": {"logits": "(B, Q, H, W) float32 cosine logits incl. lam * [CLS] similarity"}},
            "text": {"file": TEXT_GRAPH, "inputs": {"tokens": f"(N, {encoder.context_length}) int64"},
                     "outputs": {"embeddings": "(N, D) float32 unit-norm"}},
        },
        "preprocessing": {
            "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "long_side": segmenter.long_side, "window": segmenter.window,
            "stride": segmenter.stride, "patch": segmenter.patch_size,
            "resize": "cv2.INTER_LINEAR on uint8, long side to long_side (SPEC 2.1)",
            "padding": "zeros after normalisation to the next patch multiple, top/left total//2 (SPEC 2.2)",
        },
        "embed_dim": encoder.embed_dim,
        "logit_scale": LOGIT_SCALE,
        "default_lambda": DEFAULT_LAMBDA,
        "tokenizer": {
            "merges": MERGES, "context_length": encoder.context_length, "clean": "lower",
            "sot": int(tok.sot_token_id), "eot": int(tok.eot_token_id),
        },
        "model": {**encoder.backbone.to_dict(), "embed_dim": encoder.embed_dim},  # simfeatup.backbone.Backbone
        "upsampler": upsampler_info,
        "exporter": {"tool": "torch.onnx.export(dynamo=True)", "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "files": {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST},
    }


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an existing folder is swapped out, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["export_onnx", "verify_onnx", "OnnxExportError", "ImageGraph", "TextGraph", "bicubic_matrix"]
