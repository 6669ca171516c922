"""Sliding-window open-vocabulary segmentation with the torch backend (SPEC 2).

Pixel rules (resize, normalise, windows, padding, final resize) and scores -> labels come
from :mod:`simfeatup.imaging` and :mod:`simfeatup.scores`, which the ONNX runtime shares.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import imaging, scores
from .constants import DEFAULT_BG_IDX, DEFAULT_LAMBDA, DEFAULT_PROB_THD, LONG_SIDE, STRIDE, WINDOW
from .vocabulary import Vocabulary

logger = logging.getLogger(__name__)


class Segmenter(torch.nn.Module):
    """Frozen dense CLIP + optional SimFeatUp upsampler (``None`` = bilinear ablation)."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        upsampler: torch.nn.Module | None = None,
        *,
        long_side: int = LONG_SIDE,
        window: int = WINDOW,
        stride: int = STRIDE,
        window_batch: int = 4,
    ):
        super().__init__()
        self.encoder = encoder
        self.upsampler = upsampler.eval() if upsampler is not None else None
        self.long_side, self.window, self.stride = long_side, window, stride
        self.window_batch = window_batch
        self.patch_size = encoder.patch_size

    @property
    def _param(self) -> torch.Tensor:
        return next(self.encoder.parameters())

    def window_logits(self, windows: torch.Tensor, text: torch.Tensor, lam: float | torch.Tensor = DEFAULT_LAMBDA) -> torch.Tensor:
        """Cosine logits of each pixel of each window against each query (SPEC 2.3-2.5).

        windows: (B, 3, h, w) CLIP-normalised, h and w multiples of the patch size.
        text: (Q, D) unit-norm query embeddings. Returns (B, Q, h, w) float32:
        ``<f, t> + lam * <c, t>`` with f the (upsampled) pixel feature and c the [CLS]
        feature, both L2-normalised.
        """
        feats, cls = self.encoder(windows)  # (B, D, h/p, w/p), (B, D)
        if self.upsampler is not None:
            feats = self.upsampler(feats, windows)  # (B, D, h, w)
        feats = F.normalize(feats.float(), dim=1)
        cls = F.normalize(cls.float(), dim=1)
        text = text.float()
        logits = torch.einsum("bdhw,qd->bqhw", feats, text) + lam * (cls @ text.T)[:, :, None, None]
        if self.upsampler is None:  # SPEC 2.4: the bilinear ablation resizes the LOGITS
            logits = F.interpolate(logits, size=windows.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def logits(self, images: list[np.ndarray], text: torch.Tensor, *, lam: float = DEFAULT_LAMBDA) -> list[np.ndarray]:
        """RGB uint8 images (H, W, 3) -> per-image (Q, H, W) averaged window logits at original size.

        Windows of all images are batched together through the encoder (SPEC 2.2, 2.6).
        """
        averaged = self.averaged_logits(images, text, lam=lam)
        return [imaging.resize_bilinear(logits, image.shape[:2]) for logits, image in zip(averaged, images)]

    @torch.inference_mode()
    def averaged_logits(self, images: list[np.ndarray], text: torch.Tensor, *, lam: float = DEFAULT_LAMBDA) -> list[np.ndarray]:
        """Like :meth:`logits`, but at the working size (long side ``self.long_side``), before SPEC 2.6's resize."""
        param = self._param
        prepared = [torch.from_numpy(imaging.preprocess(image, self.long_side)) for image in images]
        canvases = [torch.zeros(len(text), *x.shape[1:]) for x in prepared]
        counts = [torch.zeros(x.shape[1:]) for x in prepared]

        sizes = [x.shape[1:] for x in prepared]
        for batch in imaging.window_batches(sizes, self.window, self.stride, self.patch_size, self.window_batch):
            windows = torch.stack([_crop_and_pad(prepared[i], box, pads) for i, box, pads in batch])
            out = self.window_logits(windows.to(param.device, param.dtype), text.to(param.device), lam).cpu()
            for (i, (y0, y1, x0, x1), ((top, _), (left, _))), window_out in zip(batch, out):
                canvases[i][:, y0:y1, x0:x1] += window_out[:, top : top + y1 - y0, left : left + x1 - x0]
                counts[i][y0:y1, x0:x1] += 1

        return [(canvas / count).numpy() for canvas, count in zip(canvases, counts)]

    def segment(
        self,
        images: list[np.ndarray],
        vocabulary: Vocabulary,
        text: torch.Tensor,
        *,
        lam: float = DEFAULT_LAMBDA,
        prob_thd: float = DEFAULT_PROB_THD,
        bg_idx: int = DEFAULT_BG_IDX,
        return_probs: bool = False,
    ) -> list[scores.Segmentation]:
        """Label maps (SPEC 2.7) for RGB uint8 images; ``text`` from :func:`simfeatup.text.encode_queries`."""
        return [
            scores.segmentation(logits, vocabulary, prob_thd=prob_thd, bg_idx=bg_idx, return_probs=return_probs, size=image.shape[:2])
            for logits, image in zip(self.averaged_logits(images, text, lam=lam), images)
        ]


def _crop_and_pad(x: torch.Tensor, box, pads) -> torch.Tensor:
    """(3, H, W) -> window zero-padded AFTER normalisation, i.e. with the mean colour (SPEC 2.2)."""
    y0, y1, x0, x1 = box
    (top, bottom), (left, right) = pads
    return F.pad(x[:, y0:y1, x0:x1], (left, right, top, bottom))


def build_segmenter(
    upsampler: str | Path | None = None,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    clip_config: dict | None = None,
    attention: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    window_batch: int = 4,
) -> Segmenter:
    """A ready segmenter from user-facing choices.

    ``upsampler``: a SimFeatUp artefact (``.safetensors`` or its ``.json``) or None/"bilinear".
    The backbone (model name or ``clip_config`` / model-config .json, weights, attention) defaults
    to the one the artefact was trained for, else ViT-B-16/openai with SegEarth-OV attention;
    see :func:`simfeatup.backbone.resolve`. ``segmenter.encoder.backbone`` records what runs.
    """
    from .backbone import Backbone, resolve
    from .encoder import DenseCLIP
    from .upsampler import load_upsampler

    module, artefact, artefact_dir = None, None, None
    if upsampler is not None and str(upsampler) != "bilinear":
        module, info = load_upsampler(upsampler)
        artefact = Backbone.from_dict(info["backbone"]) if info.get("backbone") else None
        artefact_dir = Path(upsampler).parent
    backbone, weights = resolve(artefact, model=model, pretrained=pretrained, config=clip_config, attention=attention,
                                artefact_dir=artefact_dir)
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
    segmenter = Segmenter(encoder, module, window_batch=window_batch)
    return segmenter.to(device=device, dtype=dtype).eval()
