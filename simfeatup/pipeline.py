"""The segmentation pipeline both backends share (SPEC 2): images + vocabulary -> label maps.

:class:`WindowSegmenter` holds everything but the model call: preprocessing, the window walk
and averaging (:mod:`simfeatup.windows`), query embeddings from the prompt templates
(:mod:`simfeatup.text`) and scores -> labels (:mod:`simfeatup.scores`). A backend supplies
two methods: ``encode_texts`` (texts -> unit-norm embeddings) and ``_window_logits`` (normalised
windows -> cosine logits), both on numpy arrays. Torch-free.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from . import imaging, scores, windows
from .cache import EmbeddingCache
from .constants import DEFAULT_LAMBDA
from .text import embed_queries
from .vocabulary import Vocabulary

logger = logging.getLogger(__name__)


class WindowSegmenter:
    """Sliding-window open-vocabulary segmentation; subclasses are the torch and ONNX backends.

    Attributes a subclass sets: ``long_side``, ``window``, ``stride`` (SPEC 2.1-2.2), ``patch_size``,
    ``window_batch`` (windows per model call) and ``cache`` (an :class:`EmbeddingCache`).
    """

    long_side: int
    window: int
    stride: int
    patch_size: int
    window_batch: int
    cache: EmbeddingCache
    default_lambda: float = DEFAULT_LAMBDA

    # ------------------------------------------------------------------ backend
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D) unit-norm float32 embeddings."""
        raise NotImplementedError

    def _window_logits(self, windows: np.ndarray, text: np.ndarray, lam: float) -> np.ndarray:
        """(B, 3, h, w) normalised windows, (Q, D) queries -> (B, Q, h, w) float32 cosine logits."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What computes the predictions, as resolved (for reports)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def geometry(self) -> dict:
        """The window walk's settings, as :func:`simfeatup.windows.averaged_logits` takes them."""
        return {"window": self.window, "stride": self.stride, "patch": self.patch_size, "batch": self.window_batch}

    def encode_queries(self, words: list[str]) -> np.ndarray:
        """Class words -> (Q, D) float32 query embeddings (SPEC 2, text side), through the cache."""
        return embed_queries(words, self.encode_texts, self.cache)

    def query_embeddings(self, vocabulary: Vocabulary, text: np.ndarray | None = None) -> np.ndarray:
        """(Q, D) float32 embeddings of ``vocabulary.queries``: ``text`` when given (shape checked), else encoded."""
        if text is None:
            text = self.encode_queries(vocabulary.queries)
        text = np.asarray(text, np.float32)
        if text.ndim != 2 or len(text) != len(vocabulary.queries):
            raise ValueError(
                f"text has shape {text.shape}: expected one embedding per query ({len(vocabulary.queries)}, D)"
            )
        return text

    def averaged_logits(
        self, images: list[np.ndarray], text: np.ndarray, *, lam: float | None = None
    ) -> list[np.ndarray]:
        """RGB uint8 images (H, W, 3) -> per-image (Q, h, w) mean window logits at the working size
        (long side ``long_side``), before SPEC 2.6's resize back to the original size."""
        lam = self.default_lambda if lam is None else float(lam)
        prepared = [imaging.preprocess(image, self.long_side) for image in images]
        if logger.isEnabledFor(logging.DEBUG):
            for image, x in zip(images, prepared):
                boxes = windows.window_boxes(*x.shape[1:], self.window, self.stride)
                logger.debug(
                    "image %dx%d -> working size %dx%d: %d window(s) of %d px, stride %d, %d per model call",
                    image.shape[1], image.shape[0], x.shape[2], x.shape[1], len(boxes), self.window, self.stride,
                    self.window_batch,
                )
        text = np.asarray(text, np.float32)
        return windows.averaged_logits(prepared, text, lam, self._window_logits, **self.geometry)

    def segment(
        self,
        images: list[np.ndarray],
        vocabulary: Vocabulary,
        *,
        scoring: scores.Scoring | None = None,
        text: np.ndarray | None = None,
        return_probs: bool = False,
    ) -> list[scores.Segmentation]:
        """Label maps (SPEC 2.7) of RGB uint8 images (H, W, 3) at their original size.

        ``scoring``: lam, prob_thd, bg_idx (default: :class:`Scoring` with this model's lambda).
        ``text``: precomputed (Q, D) embeddings of ``vocabulary.queries`` (default: encoded here).
        """
        scoring = scoring or scores.Scoring(lam=self.default_lambda)
        scoring.check(len(vocabulary))
        text = self.query_embeddings(vocabulary, text)
        started = time.perf_counter()
        averaged = self.averaged_logits(images, text, lam=scoring.lam)
        windowed = time.perf_counter()
        results = [
            scores.segmentation(logits, vocabulary, scoring, return_probs=return_probs, size=image.shape[:2])
            for logits, image in zip(averaged, images)
        ]
        logger.debug(
            "%d image(s): windows through the model %.2f s, scoring at full size %.2f s",
            len(images), windowed - started, time.perf_counter() - windowed,
        )
        return results
