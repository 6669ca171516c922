"""Class words -> unit-norm CLIP query embeddings (SPEC 2, text side), cached on disk.

Torch-free: the averaging over prompt templates is written once and takes the backend's
``encode_texts`` (texts -> (N, D) unit-norm embeddings), so the torch and ONNX segmenters
build their queries with the same code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .cache import EmbeddingCache
from .templates import prompts_for

EncodeTexts = Callable[[list[str]], np.ndarray]


def encoder_identity(provenance: dict) -> str | None:
    """A cache key for an encoder's text weights, or None when they are not reproducible."""
    pretrained = provenance.get("pretrained")
    if not pretrained:
        return None  # randomly initialised: never share vectors across runs
    path = Path(pretrained)
    if path.is_file():
        stat = path.stat()
        pretrained = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    # the activation changes the text features too (QuickGELU for OpenAI weights)
    return f"{provenance.get('model')}|{pretrained}|quick_gelu={provenance.get('quick_gelu')}"


def embed_queries(words: list[str], encode_texts: EncodeTexts, cache: EmbeddingCache | None = None) -> np.ndarray:
    """Each word in the 80 templates, encoded (unit norm), averaged, L2-normalised again -> (Q, D) float32."""
    cache = cache if cache is not None else EmbeddingCache(None)
    vectors = []
    for word in words:
        vector = cache.get(word)
        if vector is None:
            prompts = np.asarray(encode_texts(prompts_for(word)), np.float32)  # (80, D)
            mean = prompts.mean(axis=0)
            vector = mean / np.linalg.norm(mean)
            cache.put(word, vector)
        vectors.append(vector)
    return np.stack(vectors).astype(np.float32)


def encode_queries(encoder, words: list[str], *, cache: EmbeddingCache | bool = True) -> np.ndarray:
    """:func:`embed_queries` with a :class:`simfeatup.encoder.DenseCLIP`'s text tower -> (Q, D) float32.

    ``cache=True`` uses the on-disk cache when the weights are known, False memory only.
    """
    if cache is True or cache is False:
        cache = EmbeddingCache(encoder_identity(encoder.provenance) if cache else None)
    return embed_queries(words, encoder.encode_texts, cache)


__all__ = ["embed_queries", "encode_queries", "encoder_identity"]
