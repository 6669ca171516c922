"""On-disk cache of text-query embeddings, keyed by model identity and query word.

Torch-free (numpy arrays) so the torch and ONNX paths share it. Location:
``$SIMFEATUP_CACHE`` or ``~/.cache/simfeatup``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .templates import IMAGENET_TEMPLATES

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("SIMFEATUP_CACHE") or Path.home() / ".cache" / "simfeatup")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


class EmbeddingCache:
    """Per-word unit-norm embeddings of one text encoder.

    ``identity`` must change whenever the encoder's weights do (model name + weights tag or
    file checksum); ``None`` keeps the cache in memory only (e.g. random test models).
    """

    def __init__(self, identity: str | None, root: Path | None = None):
        self.memory: dict[str, np.ndarray] = {}
        self.folder = None
        if identity is not None:
            # The templates are part of the key: editing them must not reuse stale vectors.
            self.folder = (root or cache_root()) / "text" / _digest(identity, *IMAGENET_TEMPLATES)
        logger.debug(
            "text-embedding cache: %s",
            f"{self.folder} (for {identity})" if self.folder else "memory only (the weights have no stable identity)",
        )

    def _file(self, word: str) -> Path:
        return self.folder / f"{_digest(word)}.npy"

    def get(self, word: str) -> np.ndarray | None:
        """The cached vector of ``word`` (memory, then disk), or None."""
        if word in self.memory:
            return self.memory[word]
        if self.folder is not None and self._file(word).is_file():
            try:
                vector = np.load(self._file(word), allow_pickle=False)
            except (OSError, ValueError) as err:
                logger.debug("text-embedding cache: %s unreadable (%s), recomputed", self._file(word), err)
                return None  # a damaged entry is simply recomputed
            self.memory[word] = vector
            return vector
        return None

    def put(self, word: str, vector: np.ndarray) -> None:
        self.memory[word] = vector
        if self.folder is None:
            return
        try:
            with atomic_write(self._file(word)) as tmp, open(tmp, "wb") as f:
                np.save(f, vector, allow_pickle=False)
        except OSError as err:  # a read-only cache must not stop segmentation
            logger.warning("text-embedding cache %s is not writable (%s); continuing without it", self.folder, err)
            self.folder = None
