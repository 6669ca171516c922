"""Class words -> unit-norm CLIP query embeddings (SPEC 2, text side), cached on disk.

Torch-free: the averaging over prompt templates is written once and takes the backend's
``encode_texts`` (texts -> (N, D) unit-norm embeddings), so the torch and ONNX segmenters
build their queries with the same code.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from .cache import EmbeddingCache
from .templates import prompts_for

EncodeTexts = Callable[[list[str]], np.ndarray]

logger = logging.getLogger(__name__)


def embed_queries(words: list[str], encode_texts: EncodeTexts, cache: EmbeddingCache | None = None) -> np.ndarray:
    """Each word in the 80 templates, encoded (unit norm), averaged, L2-normalised again -> (Q, D) float32."""
    cache = cache if cache is not None else EmbeddingCache(None)
    started = time.perf_counter()
    vectors, encoded = [], []
    for word in words:
        vector = cache.get(word)
        if vector is None:
            prompts = np.asarray(encode_texts(prompts_for(word)), np.float32)  # (80, D)
            mean = prompts.mean(axis=0)
            vector = mean / np.linalg.norm(mean)
            cache.put(word, vector)
            encoded.append(word)
        vectors.append(vector)
    logger.debug(
        "text queries: %d word(s), %d from the cache, %d encoded (%s) in %.2f s",
        len(words), len(words) - len(encoded), len(encoded), ", ".join(encoded) or "none",
        time.perf_counter() - started,
    )
    return np.stack(vectors).astype(np.float32)


def encode_queries(encoder, words: list[str], *, cache: EmbeddingCache | bool = True) -> np.ndarray:
    """:func:`embed_queries` with a :class:`simfeatup.encoder.DenseCLIP`'s text tower -> (Q, D) float32.

    ``cache=True`` uses the on-disk cache when the weights are known (keyed by
    ``encoder.backbone.cache_identity()``), False memory only.
    """
    if cache is True or cache is False:
        cache = EmbeddingCache(encoder.backbone.cache_identity() if cache else None)
    return embed_queries(words, encoder.encode_texts, cache)


__all__ = ["embed_queries", "encode_queries"]
