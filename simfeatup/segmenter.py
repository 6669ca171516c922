"""Open-vocabulary segmentation with the torch backend (SPEC 2).

Everything but the model call (windows, averaging, queries, scores -> labels) is
:class:`simfeatup.pipeline.WindowSegmenter`, which the ONNX runtime shares.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import EmbeddingCache
from .constants import DEFAULT_LAMBDA, LONG_SIDE, STRIDE, WINDOW
from .pipeline import WindowSegmenter

logger = logging.getLogger(__name__)

# Windows per forward by default: one at a time on CPU, where bench/e2e.py measured it faster per
# window than 2-4 (the working set stays in cache) and it needs the least memory; 4 on accelerators.
CPU_WINDOW_BATCH, ACCELERATOR_WINDOW_BATCH = 1, 4
# bfloat16 is applied to the image tower only (docs/method.md section 8): the ViT's GEMMs are what bf16 units speed
# up, while the text tower runs once per vocabulary (and its embeddings are cached under the weights' identity,
# so they must not depend on the dtype) and the upsampler's kernel softmax and the factored cosine's norms
# |f|^2 = u^T G u keep float32's mantissa. The scores and the softmax are float32 on every path.
VISION_ONLY_DTYPES = (torch.bfloat16,)


class Segmenter(torch.nn.Module, WindowSegmenter):
    """Frozen dense CLIP + optional SimFeatUp upsampler (``None`` = bilinear ablation).

    ``window_batch``: windows per forward, by default by device (see :attr:`window_batch`).
    ``cache``: True for the on-disk text-embedding cache (when the weights are reproducible),
    False for memory only, or an :class:`EmbeddingCache`.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        upsampler: torch.nn.Module | None = None,
        *,
        long_side: int = LONG_SIDE,
        window: int = WINDOW,
        stride: int = STRIDE,
        window_batch: int | None = None,
        cache: EmbeddingCache | bool = True,
    ):
        super().__init__()
        self.encoder = encoder
        self.upsampler = upsampler.eval() if upsampler is not None else None
        self.long_side, self.window, self.stride = long_side, window, stride
        self._window_batch = window_batch
        self.patch_size = encoder.patch_size
        if cache is True or cache is False:
            cache = EmbeddingCache(encoder.backbone.cache_identity() if cache else None)
        self.cache = cache

    @property
    def window_batch(self) -> int:
        """Windows per model call: as given, else :data:`CPU_WINDOW_BATCH` or :data:`ACCELERATOR_WINDOW_BATCH`."""
        if self._window_batch is not None:
            return self._window_batch
        return CPU_WINDOW_BATCH if self._param.device.type == "cpu" else ACCELERATOR_WINDOW_BATCH

    @property
    def _param(self) -> torch.Tensor:
        return next(self.encoder.clip.visual.parameters())

    @property
    def upsampler_dtype(self) -> torch.dtype:
        """The upsampler's dtype (float32 under a bf16 image tower), else the image tower's."""
        return next(self.upsampler.parameters()).dtype if self.upsampler is not None else self._param.dtype

    def to_dtype(self, dtype: torch.dtype) -> "Segmenter":
        """Cast for inference: everything to ``dtype``, except that a :data:`VISION_ONLY_DTYPES` dtype
        reaches the image tower only (text tower and upsampler stay float32)."""
        if next(self.parameters()).device.type == "cpu":
            from .hardware import cpu_dtype_advice

            name = str(dtype).removeprefix("torch.")
            advice = cpu_dtype_advice(name)
            if advice:
                logger.warning("%s: %s", name, advice[1])
        if dtype not in VISION_ONLY_DTYPES:
            return self.to(dtype=dtype)
        self.float()
        self.encoder.clip.visual.to(dtype=dtype)
        self.encoder._clear_pos_cache()  # sized copies of the positional embedding in the old dtype
        return self

    def window_logits(
        self, windows: torch.Tensor, text: torch.Tensor, lam: float | torch.Tensor = DEFAULT_LAMBDA
    ) -> torch.Tensor:
        """Cosine logits of each pixel of each window against each query (SPEC 2.3-2.5).

        windows: (B, 3, h, w) CLIP-normalised, h and w multiples of the patch size.
        text: (Q, D) unit-norm query embeddings. Returns (B, Q, h, w) float32:
        ``<f, t> + lam * <c, t>`` with f the (upsampled) pixel feature and c the [CLS]
        feature, both L2-normalised.
        """
        feats, cls = self.encoder(windows)  # (B, D, h/p, w/p), (B, D); the encoder casts to its own dtype
        text = text.float()
        if self.upsampler is not None:
            dtype = self.upsampler_dtype
            logits = self.upsampler.cosine_logits(feats.to(dtype), windows.to(dtype), text)  # (B, Q, h, w)
        else:  # SPEC 2.4: the bilinear ablation scores the token grid and resizes the LOGITS
            logits = torch.einsum("bdhw,qd->bqhw", F.normalize(feats.float(), dim=1), text)
            logits = F.interpolate(logits, size=windows.shape[-2:], mode="bilinear", align_corners=False)
        cls = F.normalize(cls.float(), dim=1)
        return logits + lam * (cls @ text.T)[:, :, None, None]

    def without_upsampler(self) -> "Segmenter":
        """The bilinear ablation of this segmenter: the same encoder (shared, not copied), cache and windows."""
        return Segmenter(self.encoder, None, long_side=self.long_side, window=self.window, stride=self.stride,
                         window_batch=self._window_batch, cache=self.cache).eval()

    # ------------------------------------------------------------------ WindowSegmenter
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode_texts(texts)

    @torch.inference_mode()
    def _window_logits(self, windows: np.ndarray, text: np.ndarray, lam: float) -> np.ndarray:
        param = self._param
        # the windows are the upsampler's guidance too: sent in its dtype, the encoder casts its own copy
        out = self.window_logits(
            torch.from_numpy(windows).to(param.device, self.upsampler_dtype), torch.from_numpy(text).to(param.device),
            lam,
        )
        return out.cpu().numpy()

    def describe(self) -> dict:
        up = (
            {"kind": "simfeatup", "config": self.upsampler.config}
            if self.upsampler is not None
            else {"kind": "bilinear"}
        )
        return {
            "torch": {
                **self.encoder.backbone.to_dict(),
                "upsampler": up,
                "dtype": str(self._param.dtype).removeprefix("torch."),
                "upsampler_dtype": str(self.upsampler_dtype).removeprefix("torch."),
            }
        }


def build_segmenter(
    upsampler: str | Path | None = None,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    clip_config: dict | None = None,
    attention: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    window_batch: int | None = None,
) -> Segmenter:
    """A ready segmenter from user-facing choices.

    ``upsampler``: a SimFeatUp artefact (``.safetensors`` or its ``.json``) or None/"bilinear".
    The backbone (model name or ``clip_config`` / model-config .json, weights, attention) defaults
    to the one the artefact was trained for, else ViT-B-16/openai with SegEarth-OV attention;
    see :func:`simfeatup.backbone.resolve`. ``segmenter.encoder.backbone`` records what runs.
    """
    from .backbone import Backbone, resolve, warn_if_trained_on_random
    from .encoder import DenseCLIP
    from .upsampler import load_upsampler

    module, artefact, artefact_dir = None, None, None
    if upsampler is not None and str(upsampler) != "bilinear":
        module, info = load_upsampler(upsampler)
        artefact = Backbone.from_dict(info["backbone"]) if info.get("backbone") else None
        artefact_dir = Path(upsampler).parent
        warn_if_trained_on_random(artefact, f"the upsampler {upsampler}")
    backbone, weights = resolve(
        artefact, model=model, pretrained=pretrained, config=clip_config, attention=attention, artefact_dir=artefact_dir
    )
    encoder = DenseCLIP.from_backbone(backbone, weights)
    if module is not None:
        dim = module.config["dim"]
        if dim != encoder.embed_dim:
            raise ValueError(
                f"upsampler {upsampler} has feature size {dim} but the backbone gives {encoder.embed_dim}: "
                "use the backbone it was trained for (see its .json) or retrain it"
            )
        if module.config.get("patch_size") != encoder.patch_size:
            raise ValueError(
                f"upsampler {upsampler} was built for patch {module.config.get('patch_size')} "
                f"but the backbone has patch {encoder.patch_size}"
            )
    segmenter = Segmenter(encoder, module, window_batch=window_batch).to(device=device).to_dtype(dtype).eval()
    logger.debug("torch segmenter: %s", segmenter.describe()["torch"])
    return segmenter
