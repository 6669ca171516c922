"""Segmentation with onnxruntime and a model folder from :func:`simfeatup.export.export_onnx`.

Never imports torch: only onnxruntime, numpy and the torch-free simfeatup modules (imaging,
scores, vocabulary, templates, cache, presets, tokenizer). Every pixel rule comes from the
same functions the torch segmenter uses, so both paths give the same label maps.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import imaging, scores
from .cache import EmbeddingCache
from .constants import CLIP_MEAN, CLIP_STD, DEFAULT_BG_IDX, DEFAULT_PROB_THD, LOGIT_SCALE
from .templates import prompts_for
from .tokenizer import Tokenizer
from .vocabulary import Vocabulary

logger = logging.getLogger(__name__)

FORMAT = "simfeatup-onnx"  # the manifest's "format"; simfeatup.export writes it
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# TensorRT is opt-in (providers=... or $SIMFEATUP_ORT_PROVIDERS): with dynamic window sizes it builds a
# new engine whenever a window shape leaves the range seen so far, minutes each for ViT-B/16.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDERS_ENV = "SIMFEATUP_ORT_PROVIDERS"
# Prompts per text-graph call: 80 at once grew onnxruntime's arena by ~400 MB (ViT-B/16), 16 by ~70 MB
# for the same total time.
TEXT_BATCH = 16


class ModelFolderError(ValueError):
    """A model folder that cannot be used (missing, corrupt or from another exporter)."""


def session_options() -> ort.SessionOptions:
    """Graph fusions on, layout rewrites off, errors-only logging.

    ORT_ENABLE_ALL adds only CPU layout (NCHWc) rewrites: no gain on these graphs (0.30 s per
    ViT-B/16 window either way), and onnxruntime 1.32 segfaults applying them to the fp16 text
    graph.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    return options


def choose_providers(requested=None) -> list:
    """CUDA when this onnxruntime build offers it (``onnxruntime-gpu``), else CPU.

    ``requested`` (or ``$SIMFEATUP_ORT_PROVIDERS``, comma-separated), e.g.
    ``["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]``, overrides.
    """
    available = ort.get_available_providers()
    if requested is None and os.environ.get(PROVIDERS_ENV):
        requested = [p.strip() for p in os.environ[PROVIDERS_ENV].split(",") if p.strip()]
    if requested is not None:
        # a provider is a name or a (name, options) pair, as onnxruntime takes them
        names = [p[0] if isinstance(p, tuple) else p for p in requested]
        missing = [name for name in names if name not in available]
        if missing:
            raise ValueError(f"onnxruntime providers {missing} are not available here; available: {available} "
                             "(GPU providers need `pip install onnxruntime-gpu` instead of onnxruntime)")
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available] or available


def providers_for_device(device: str):
    """``--device`` for onnxruntime: auto (None: :func:`choose_providers` decides), cpu, cuda or cuda:N."""
    if device == "auto":
        return None
    if device == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]
    raise ValueError(f"device {device!r} has no onnxruntime provider here: use auto, cpu, cuda or cuda:N")


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (the manifest's checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(model_dir: Path, *, check_files: bool = True) -> dict:
    """Load ``manifest.json`` and (by default) check every file against its sha256."""
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise ModelFolderError(f"ONNX model folder not found: {model_dir} (create one with `python export/to_onnx.py --out DIR`)")
    if not path.is_file():
        raise ModelFolderError(f"{model_dir} has no {MANIFEST}: not a folder written by export/to_onnx.py")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ModelFolderError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ModelFolderError(f"{path}: format version {manifest.get('version')!r}, this simfeatup reads {FORMAT_VERSION}; "
                               "re-export the folder with this simfeatup version")
    # The runtime scores with simfeatup.imaging / simfeatup.scores, whose constants the graphs were verified with.
    pre = manifest.get("preprocessing", {})
    expected = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "logit_scale": LOGIT_SCALE}
    found = {"mean": pre.get("mean"), "std": pre.get("std"), "logit_scale": manifest.get("logit_scale")}
    if found != expected:
        raise ModelFolderError(f"{path}: preprocessing/scoring constants {found} differ from this simfeatup's {expected}; "
                               "re-export the folder with this simfeatup version")
    if check_files:
        for name, digest in manifest.get("files", {}).items():
            file = model_dir / name
            if not file.is_file():
                raise ModelFolderError(f"{file}: listed in {MANIFEST} but missing; re-export the model folder")
            if sha256(file) != digest:
                raise ModelFolderError(f"{file}: checksum mismatch with {MANIFEST} (corrupt or modified); re-export the model folder")
    return manifest


class OnnxSegmenter:
    """Sliding-window segmentation (SPEC 2) with the exported image and text graphs.

    ``window_batch`` windows go through the image graph per call, so memory stays flat however
    many windows an image has (ViT-B/16 on CPU: one window per call is as fast per window as
    two and peaks ~600 MB lower). ``cache``: True for the on-disk text-embedding cache (keyed by
    the text graph's checksum), False for memory only, or an :class:`EmbeddingCache`.
    """

    def __init__(self, model_dir, *, providers=None, window_batch: int = 1, cache=True):
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        pre = self.manifest["preprocessing"]
        self.long_side, self.window, self.stride, self.patch_size = pre["long_side"], pre["window"], pre["stride"], pre["patch"]
        self.default_lambda = float(self.manifest["default_lambda"])
        if window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {window_batch}")
        self.window_batch = window_batch
        self.providers = choose_providers(providers)
        graphs = self.manifest["graphs"]
        self.image_session = self._session(graphs["image"]["file"])
        self.text_session = self._session(graphs["text"]["file"])
        logger.info("onnxruntime %s with %s", ort.__version__, ", ".join(self.image_session.get_providers()))
        tok = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer(self.model_dir / tok["merges"], context_length=tok["context_length"])
        if cache is True or cache is False:
            # The text graph's checksum identifies its weights; a random model is still reproducible.
            identity = f"onnx:{self.manifest['files'][graphs['text']['file']]}:{self.manifest['files'].get(graphs['text']['file'] + '.data', '')}"
            cache = EmbeddingCache(identity if cache else None)
        self.cache = cache

    def _session(self, name: str) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(self.model_dir / name), session_options(), providers=self.providers)
        except Exception as err:  # onnxruntime raises its own (Fail, InvalidGraph, ...) types
            raise ModelFolderError(f"{self.model_dir / name}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None

    # ------------------------------------------------------------------ text
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D) unit-norm embeddings from the text graph."""
        tokens = self.tokenizer(texts)
        parts = [self.text_session.run(None, {"tokens": tokens[i : i + TEXT_BATCH]})[0] for i in range(0, len(tokens), TEXT_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, self.manifest["embed_dim"]), np.float32)

    def encode_queries(self, words: list[str]) -> np.ndarray:
        """Each word in the 80 templates, encoded, averaged, renormalised -> (Q, D) float32 (SPEC 2)."""
        vectors = []
        for word in words:
            vector = self.cache.get(word)
            if vector is None:
                prompts = self.encode_texts(prompts_for(word)).astype(np.float32)
                mean = prompts.mean(axis=0)
                vector = mean / np.linalg.norm(mean)
                self.cache.put(word, vector)
            vectors.append(vector)
        return np.stack(vectors).astype(np.float32)

    # ------------------------------------------------------------------ image
    def window_logits(self, windows: np.ndarray, text: np.ndarray, lam: float) -> np.ndarray:
        """(B, 3, h, w) normalised windows, (Q, D) queries -> (B, Q, h, w) cosine logits."""
        feeds = {"windows": np.ascontiguousarray(windows, np.float32), "text": np.ascontiguousarray(text, np.float32), "lam": np.asarray(lam, np.float32)}
        return self.image_session.run(None, feeds)[0]

    def logits(self, images: list[np.ndarray], text: np.ndarray, *, lam: float | None = None) -> list[np.ndarray]:
        """RGB uint8 images (H, W, 3) -> per-image (Q, H, W) averaged window logits at original size.

        ``lam``: the [CLS] weight, default the manifest's.

        The same windows, grouping, padding, accumulation order and final resize as
        :meth:`simfeatup.segmenter.Segmenter.logits`.
        """
        averaged = self.averaged_logits(images, text, lam=lam)
        return [imaging.resize_bilinear(logits, image.shape[:2]) for logits, image in zip(averaged, images)]

    def averaged_logits(self, images: list[np.ndarray], text: np.ndarray, *, lam: float | None = None) -> list[np.ndarray]:
        """Like :meth:`logits`, but at the working size (long side ``self.long_side``), before SPEC 2.6's resize."""
        lam = self.default_lambda if lam is None else lam
        prepared = [imaging.preprocess(image, self.long_side) for image in images]
        canvases = [np.zeros((len(text), *x.shape[1:]), np.float32) for x in prepared]
        counts = [np.zeros(x.shape[1:], np.float32) for x in prepared]

        sizes = [x.shape[1:] for x in prepared]
        for batch in imaging.window_batches(sizes, self.window, self.stride, self.patch_size, self.window_batch):
            windows = np.stack([_crop_and_pad(prepared[i], box, pads) for i, box, pads in batch])
            out = self.window_logits(windows, text, lam)
            for (i, (y0, y1, x0, x1), ((top, _), (left, _))), window_out in zip(batch, out):
                canvases[i][:, y0:y1, x0:x1] += window_out[:, top : top + y1 - y0, left : left + x1 - x0]
                counts[i][y0:y1, x0:x1] += 1

        return [canvas / count for canvas, count in zip(canvases, counts)]

    def segment(
        self,
        images: list[np.ndarray],
        vocabulary: Vocabulary,
        *,
        lam: float | None = None,
        prob_thd: float = DEFAULT_PROB_THD,
        bg_idx: int = DEFAULT_BG_IDX,
        return_probs: bool = False,
    ) -> list[scores.Segmentation]:
        """Label maps (SPEC 2.7) of RGB uint8 images for ``vocabulary``; lam None = the manifest default."""
        text = self.encode_queries(vocabulary.queries)
        lam = self.default_lambda if lam is None else lam
        return [
            scores.segmentation(logits, vocabulary, prob_thd=prob_thd, bg_idx=bg_idx, return_probs=return_probs, size=image.shape[:2])
            for logits, image in zip(self.averaged_logits(images, text, lam=lam), images)
        ]


def _crop_and_pad(x: np.ndarray, box, pads) -> np.ndarray:
    """(3, H, W) -> window zero-padded AFTER normalisation, i.e. with the mean colour (SPEC 2.2)."""
    y0, y1, x0, x1 = box
    return np.pad(x[:, y0:y1, x0:x1], ((0, 0), *pads))


__all__ = ["OnnxSegmenter", "ModelFolderError", "read_manifest", "session_options", "choose_providers"]
