"""Text queries -> unit-norm CLIP embeddings (SPEC 2, text side), cached on disk."""
from __future__ import annotations

import numpy as np
import torch

from .cache import EmbeddingCache
from .templates import prompts_for


@torch.inference_mode()
def encode_queries(encoder, words: list[str], *, cache: EmbeddingCache | bool = True) -> torch.Tensor:
    """Each word in the 80 templates, encoded, L2-normalised, averaged, L2-normalised again.

    ``encoder`` is a :class:`simfeatup.encoder.DenseCLIP`. Returns (Q, D) float32 on the
    encoder's device. ``cache=True`` uses the on-disk cache when the weights are known
    (keyed by ``encoder.backbone.cache_identity()``).
    """
    if cache is True:
        cache = EmbeddingCache(encoder.backbone.cache_identity())
    elif cache is False:
        cache = EmbeddingCache(None)
    vectors = []
    for word in words:
        vector = cache.get(word)
        if vector is None:
            tokens = encoder.tokenize(prompts_for(word))
            prompts = encoder.encode_text(tokens).float()  # (80, D) unit-norm
            mean = prompts.mean(dim=0)
            vector = (mean / mean.norm()).cpu().numpy()
            cache.put(word, vector)
        vectors.append(vector)
    return torch.from_numpy(np.stack(vectors)).to(_device(encoder))


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


__all__ = ["encode_queries"]
