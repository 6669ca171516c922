"""Frozen open_clip ViT -> dense patch features and [CLS] with a modified last block (SPEC 2.3).

The vision path is written over the public module attributes of open_clip's
``VisionTransformer`` (conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks, ln_post, proj); open_clip itself is used as installed, never forked.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from simfeatup.backbone import (
    DEFAULT_ATTENTION,
    FEATURE_SOURCES,
    Backbone,
    resolve,
)  # noqa: F401
from simfeatup.clip_weights import build_clip, runs_quick_gelu
from simfeatup.constants import DEFAULT_MODEL, DEFAULT_PRETRAINED, POS_EMBED_SCALE_EPS
from simfeatup.interp import bicubic_matrix

logger = logging.getLogger(__name__)

# Every attention mode (simfeatup.backbone.ATTENTION_MODES, SPEC 2.3) shares the same head:
# ln_1 -> attention -> out_proj, no residual, no MLP.


class DenseCLIP(nn.Module):
    """Frozen CLIP ViT giving a feature per patch and the [CLS] feature (SPEC 2.3).

    ``clip`` is an open_clip ``CLIP``/``CustomTextCLIP`` whose ``visual`` is a
    ``VisionTransformer`` with class-token pooling. It is frozen and kept in eval mode.
    ``backbone`` (a :class:`~simfeatup.backbone.Backbone`) says which model and weights ``clip``
    is; ``self.backbone`` is that record completed with what runs (attention, patch size,
    activation). Build one with :meth:`from_backbone`.
    """

    def __init__(self, clip, *, attention=DEFAULT_ATTENTION, tokenizer=None, backbone: Backbone | None = None):
        super().__init__()
        visual = getattr(clip, "visual", None)
        _check_supported(visual)
        ph, pw = visual.patch_size
        if ph != pw:
            raise ValueError(f"non-square patches {visual.patch_size} are not supported")
        # The record of what runs; replace() validates the attention mode.
        self.backbone = replace(
            backbone or Backbone(), attention=attention, patch_size=int(ph), quick_gelu=runs_quick_gelu(clip)
        )
        self.clip = clip.eval().requires_grad_(False)
        self.patch_size = int(ph)
        self.embed_dim = int(visual.output_dim)
        self.grid_size = tuple(int(g) for g in visual.grid_size)  # native token grid, (14, 14) for ViT-B/16
        self.context_length = int(_text_module(clip).context_length)
        # open_clip's default BPE tokenizer ships inside the package, so this works offline.
        self.tokenizer = tokenizer or open_clip.SimpleTokenizer(context_length=self.context_length)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        # The cache holds derived copies of weights: drop it whenever the weights may change.
        self.register_load_state_dict_post_hook(DenseCLIP._clear_pos_cache)

    @property
    def attention(self) -> str:
        """Last-block mode (SPEC 2.3), kept in ``self.backbone``."""
        return self.backbone.attention

    @attention.setter
    def attention(self, mode: str) -> None:
        self.backbone = replace(self.backbone, attention=mode)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_backbone(
        cls,
        backbone: Backbone,
        weights_path: str | os.PathLike | None = None,
        *,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> "DenseCLIP":
        """Build what ``backbone`` describes (see :func:`simfeatup.backbone.resolve`).

        The architecture is ``backbone.model`` (an open_clip name) or ``backbone.config``; the
        weights are ``weights_path`` (a local open_clip state dict, strict keys and shapes,
        torch.load(weights_only=True) or safetensors), else the tag or file
        ``backbone.pretrained``, else random (drawn with ``seed``). ``quick_gelu`` None follows
        the tag's registry entry; for a local file it assumes the model's OpenAI weights (the
        SPEC backbone) -- set False for LAION/DataComp files. Raises
        ``WeightsUnavailableError`` when the weights cannot be fetched or read.
        """
        clip, record = build_clip(backbone, weights_path, seed=seed, cache_dir=cache_dir)
        tokenizer = open_clip.get_tokenizer(backbone.model) if backbone.model else None
        return cls(clip, attention=backbone.attention, tokenizer=tokenizer, backbone=record)

    @classmethod
    def from_config(cls, cfg: dict, *, attention=DEFAULT_ATTENTION, seed=0) -> "DenseCLIP":
        """Randomly initialised ``open_clip.CLIP(**cfg)`` (tests, shape checks)."""
        return cls.from_backbone(Backbone(config=cfg, attention=attention), seed=seed)

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        pretrained: str = DEFAULT_PRETRAINED,
        *,
        attention=DEFAULT_ATTENTION,
        quick_gelu: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> "DenseCLIP":
        """Build ``model`` (an open_clip name or a model-config .json) with weights ``pretrained``.

        ``pretrained`` is an open_clip tag ("openai") or a local weights file
        (.bin/.pt/.pth/.safetensors, an open_clip state dict). ``quick_gelu``: see
        :meth:`from_backbone`.
        """
        backbone, weights = resolve(model=model, pretrained=pretrained, attention=attention)
        if quick_gelu is not None:
            backbone = replace(backbone, quick_gelu=quick_gelu)
        return cls.from_backbone(backbone, weights, cache_dir=cache_dir)

    # ----------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        """Keep the frozen CLIP in eval mode whatever the parent module asks."""
        super().train(mode)
        self.clip.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        self._pos_cache.clear()  # .to()/.half() change the embedding's device or dtype
        return super()._apply(fn, *args, **kwargs)

    def _clear_pos_cache(self, _incompatible_keys=None) -> None:
        self._pos_cache.clear()

    # ----------------------------------------------------------------- vision
    def pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Positional embedding for an h x w token grid -> (1 + h*w, width), [CLS] first.

        The native grid returns the weights themselves; other sizes are computed once per size
        and cached (:meth:`resized_pos_embed`).
        """
        if (h, w) == self.grid_size:
            return self.clip.visual.positional_embedding
        cached = self._pos_cache.get((h, w))
        if cached is None:
            with torch.no_grad():
                cached = self._pos_cache[(h, w)] = self.resized_pos_embed(h, w)
        return cached

    def resized_pos_embed(self, h, w) -> torch.Tensor:
        """The patch positional embeddings resized bicubically to an h x w grid -> (1 + h*w, width).

        SCALE FACTORS ((h + 0.1)/g, (w + 0.1)/g), as the reference does (SPEC 2.3): sample
        position = (dst + 0.5) * g / (n + 0.1) - 0.5, so an axis that keeps its native length is
        still resampled; the native grid itself is left untouched (by :meth:`pos_embed`, or in the
        graph for symbolic sizes). The [CLS] position is never resized. ``h`` and ``w`` may be
        symbolic (the ONNX graph form calls this uncached).
        """
        pos = self.clip.visual.positional_embedding
        gh, gw = self.grid_size
        work = torch.promote_types(pos.dtype, torch.float32)  # bf16/fp16 bicubic would lose precision
        grid = pos[1:].to(work).reshape(gh, gw, -1)  # (gh, gw, C)
        one = grid.new_ones(())
        hh, ww = one * h, one * w  # the sizes as tensors: the same arithmetic eager and traced
        mh = bicubic_matrix(h, gh, gh / (hh + POS_EMBED_SCALE_EPS), grid)  # (h, gh)
        mw = bicubic_matrix(w, gw, gw / (ww + POS_EMBED_SCALE_EPS), grid)  # (w, gw)
        if not (isinstance(h, int) and isinstance(w, int)):
            # one graph for every size: the native grid (windows of 224) keeps the weights untouched
            native = (hh == gh) & (ww == gw)
            mh = torch.where(native, torch.eye(gh, dtype=work, device=grid.device)[:h], mh)
            mw = torch.where(native, torch.eye(gw, dtype=work, device=grid.device)[:w], mw)
        resized = torch.einsum("ij,jkc,lk->ilc", mh, grid, mw).reshape(-1, grid.shape[-1])  # (h*w, C)
        return torch.cat([pos[:1].to(work), resized]).to(pos.dtype)

    def forward(self, x: torch.Tensor, *, source: str = "final") -> tuple[torch.Tensor, torch.Tensor]:
        """Dense features of CLIP-normalised images.

        x: (B, 3, H, W), H and W multiples of ``patch_size``; cast to the module dtype.
        source: "final" = modified last block (SPEC 2.3); "penultimate" = last block
        skipped, ln_post + proj on the output of block N-1 (what the authors trained on).
        Returns feats (B, D, H/p, W/p) and cls (B, D), NOT normalised, module dtype.
        """
        if source not in FEATURE_SOURCES:
            raise ValueError(f"source={source!r} is not one of {FEATURE_SOURCES}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; pad it first")
        h, w = H // p, W // p
        visual = self.clip.visual
        x = x.to(visual.conv1.weight.dtype)

        # Embeddings. open_clip's _embeds cannot take another grid; patch_dropout is skipped
        # on purpose (dense prediction needs every token; it is an identity in eval anyway).
        t = visual.conv1(x).flatten(2).transpose(1, 2)  # (B, h*w, width)
        cls_tok = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(B, -1, -1)
        t = torch.cat([cls_tok, t], dim=1) + self.pos_embed(h, w).to(t.dtype)  # (B, 1+h*w, width)
        t = visual.ln_pre(t)

        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            t = t.transpose(0, 1)  # NLD -> LND, the layout the blocks expect
        for blk in blocks[:-1]:
            t = blk(t)
        if not batch_first:
            t = t.transpose(0, 1)

        if source == "final":
            t = self._last_block(blocks[-1], t)
        t = visual.ln_post(t) @ visual.proj  # (B, 1+h*w, D): every token, not only [CLS]
        feats = t[:, 1:].reshape(B, h, w, -1).permute(0, 3, 1, 2)  # (B, D, h, w)
        return feats.contiguous(), t[:, 0]

    def _last_block(self, blk: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
        """Replaced last block (SPEC 2.3): attention branch only, no residual, no MLP.

        x: (B, L, width) -> (B, L, width). (A_qq + A_kk + A_vv) v = A_qq v + A_kk v + A_vv v,
        so each term is one fused SDPA call whose default scale 1/sqrt(head_dim) is the
        SPEC's s; no L x L attention matrix is kept around.
        """
        attn = blk.attn
        B, L, C = x.shape
        nh = attn.num_heads
        y = blk.ln_1(x)
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3C)
        q, k, v = qkv.view(B, L, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # each (B, nh, L, hd)
        sdpa = F.scaled_dot_product_attention
        if self.attention == "segearth":
            out = sdpa(q, q, v) + sdpa(k, k, v) + sdpa(v, v, v)
        elif self.attention == "clearclip":
            out = sdpa(q, q, v)
        elif self.attention == "sclip":
            out = sdpa(q, q, v) + sdpa(k, k, v)
        elif self.attention == "maskclip":
            out = v  # identity attention: every token keeps its own value
        else:  # "vanilla": CLIP's own q-k attention, same residual-free head as the others
            out = sdpa(q, k, v)
        out = out.transpose(1, 2).reshape(B, L, C)
        # ls_1 is part of the block's attention branch (an Identity for OpenAI/LAION CLIP).
        return blk.ls_1(attn.out_proj(out))

    # ----------------------------------------------------------------- text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Texts -> token ids (N, context_length), int64, CPU."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L) -> unit-norm text embeddings (N, D) in the module dtype."""
        device = self.clip.visual.conv1.weight.device
        return self.clip.encode_text(tokens.to(device), normalize=True)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> unit-norm embeddings (N, D) float32 numpy (the segmenters' text interface)."""
        return self.encode_text(self.tokenize(texts)).float().cpu().numpy()


# --------------------------------------------------------------------- helpers
def _text_module(clip):
    # CLIP keeps the text tower's attributes on itself; CustomTextCLIP under .text.
    return getattr(clip, "text", clip)


def _check_supported(visual) -> None:
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"DenseCLIP needs an open_clip VisionTransformer image tower, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError("DenseCLIP needs [CLS]-token pooling (no attentional pool, pool_type='tok')")
    blocks = visual.transformer.resblocks
    if not all(type(b) is ResidualAttentionBlock and b.attn.in_proj_weight is not None for b in blocks):
        raise ValueError("DenseCLIP needs standard open_clip ResidualAttentionBlocks (no qk_norm/custom blocks)")
