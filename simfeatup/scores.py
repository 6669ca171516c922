"""Scores -> labels (SPEC 2.5, 2.7) and the settings that steer them. numpy only, shared by the
torch and ONNX paths."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from . import imaging
from .constants import DEFAULT_BG_IDX, DEFAULT_LAMBDA, DEFAULT_PROB_THD, LOGIT_SCALE

# Bytes of float32 logits + probabilities per strip of output rows (see segmentation()).
STRIP_BYTES = 32 << 20


@dataclass(frozen=True)
class Scoring:
    """How logits become labels: ``lam`` weighs the [CLS] similarity (SPEC 2.5); pixels whose best
    class probability is below ``prob_thd`` become class ``bg_idx`` (SPEC 2.7).

    Resolved once where the user's choices arrive (:meth:`resolve`: preset, then flags) and
    passed down whole.
    """

    lam: float = DEFAULT_LAMBDA
    prob_thd: float = DEFAULT_PROB_THD
    bg_idx: int = DEFAULT_BG_IDX

    def __post_init__(self):
        if not math.isfinite(self.lam):
            raise ValueError(f"lam={self.lam}: the [CLS] weight must be a finite number (the paper uses -0.3)")
        if not 0.0 <= self.prob_thd <= 1.0:  # also refuses NaN
            raise ValueError(f"prob_thd={self.prob_thd}: a probability threshold must lie in [0, 1]")
        if self.bg_idx < 0:
            raise ValueError(f"bg_idx={self.bg_idx}: a class index cannot be negative")

    @classmethod
    def resolve(cls, preset=None, *, lam: float | None = None, prob_thd: float | None = None,
                bg_idx: int | None = None) -> "Scoring":
        """The preset's values (else the defaults), each overridden by a value that is not None."""
        base = cls(preset.lam, preset.prob_thd, preset.bg_idx) if preset is not None else cls()
        given = {"lam": lam, "prob_thd": prob_thd, "bg_idx": bg_idx}
        return cls(**{**asdict(base), **{k: v for k, v in given.items() if v is not None}})

    def check(self, n_classes: int) -> None:
        """Refuse a ``bg_idx`` that is not one of the vocabulary's classes."""
        if self.bg_idx >= n_classes:
            raise ValueError(
                f"bg_idx {self.bg_idx} is not a class index: there are {n_classes} classes (0..{n_classes - 1})"
            )

    def as_dict(self) -> dict:
        return asdict(self)


def class_probabilities(
    logits: np.ndarray, query_class: np.ndarray, n_classes: int, *, logit_scale: float = LOGIT_SCALE
) -> np.ndarray:
    """(Q, H, W) cosine logits -> (K, H, W) class probabilities.

    Softmax of ``logit_scale * logits`` over ALL queries, then each class takes the max over
    its synonym queries.
    """
    scaled = logits.astype(np.float32) * np.float32(logit_scale)
    scaled -= scaled.max(axis=0, keepdims=True)
    np.exp(scaled, out=scaled)
    scaled /= scaled.sum(axis=0, keepdims=True)
    query_class = np.asarray(query_class)
    if len(query_class) == n_classes and np.array_equal(query_class, np.arange(n_classes)):
        return scaled
    probs = np.empty((n_classes, *scaled.shape[1:]), np.float32)
    for k in range(n_classes):
        probs[k] = scaled[query_class == k].max(axis=0)
    return probs


def labels_from_probabilities(probs: np.ndarray, *, prob_thd: float, bg_idx: int) -> np.ndarray:
    """(K, H, W) -> (H, W) labels: argmax class, or ``bg_idx`` where its probability < prob_thd."""
    labels = probs.argmax(axis=0)
    labels[probs.max(axis=0) < prob_thd] = bg_idx
    return labels.astype(np.uint8 if probs.shape[0] <= 256 else np.int32)


@dataclass
class Segmentation:
    """One image's result at its original size."""

    labels: np.ndarray  # (H, W) class indices
    probs: np.ndarray | None = None  # (K, H, W) class probabilities, when asked for


def segmentation(
    logits: np.ndarray, vocabulary, scoring: Scoring, *, return_probs: bool = False, size: tuple[int, int] | None = None
) -> Segmentation:
    """(Q, h, w) averaged window logits of one image -> its :class:`Segmentation` (SPEC 2.6, 2.7).

    ``size=(H, W)``: the logits are at the resized image's size and are brought to the original
    size here (SPEC 2.6's bilinear resize), in strips of rows, so memory for a large image stays
    about :data:`STRIP_BYTES` beyond the label map (and the probabilities, when asked for).
    """
    n_classes = len(vocabulary)
    H, W = size or logits.shape[1:]
    labels = np.empty((H, W), np.uint8 if n_classes <= 256 else np.int32)
    probs = np.empty((n_classes, H, W), np.float32) if return_probs else None
    # Per strip pixel: two float32 copies of the Q logits (the resize's blend, the softmax's
    # scaled copy), K float32 probabilities, an int64 argmax.
    step = max(1, STRIP_BYTES // ((4 * (2 * len(logits) + n_classes) + 8) * W))
    for r0 in range(0, H, step):
        rows = (r0, min(r0 + step, H))
        strip = imaging.resize_bilinear(logits, (H, W), rows) if size is not None else logits[:, rows[0] : rows[1]]
        p = class_probabilities(strip, vocabulary.query_class, n_classes)
        labels[rows[0] : rows[1]] = labels_from_probabilities(p, prob_thd=scoring.prob_thd, bg_idx=scoring.bg_idx)
        if return_probs:
            probs[:, rows[0] : rows[1]] = p
        del strip, p  # not alive while the next strip is built
    return Segmentation(labels, probs)
