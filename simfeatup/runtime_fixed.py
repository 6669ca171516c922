"""onnxruntime segmentation with a fixed-vocabulary model folder (docs/model-folder-fixed.md).

The queries are baked into the image graph, so there is no text graph and no tokenizer; the
vocabulary and the scoring values come from the manifest. Windows, averaging, the resize back
and the scoring are the shared :class:`simfeatup.pipeline.WindowSegmenter` code, so the labels
equal a default folder's for the same classes. The folder's ``scoring.onnx`` is for consumers
in other languages; this runtime scores with :mod:`simfeatup.scores` (the two are checked
against each other at export). Never imports torch.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import imaging, windows
from .backbone import warn_if_folder_trained_on_random
from .model_folder import (
    MANIFEST,
    WINDOWS,
    ModelFolderError,
    check_fixed_graph_io,
    check_graph_metadata,
    is_fixed,
    read_manifest,
)
from .pipeline import WindowSegmenter
from .runtime import OnnxSegmenter, _shapes, choose_providers, open_session
from .scores import Scoring
from .vocabulary import Vocabulary, VocabularyError

logger = logging.getLogger(__name__)

QUERIES_FILE = "queries.npy"  # the embeddings baked into the image graph, kept for the record


def fixed_vocabulary(manifest: dict) -> tuple[Vocabulary, Scoring]:
    """The baked vocabulary and scoring values of a fixed-vocabulary folder's manifest."""
    voc = manifest["vocabulary"]
    try:
        vocabulary = Vocabulary(tuple(tuple(words) for words in voc["classes"]))
    except VocabularyError as err:  # baked before such lists were refused
        raise ModelFolderError(f"the folder's baked classes cannot be used: {err}; re-export it with "
                               "distinct class words") from None
    return vocabulary, Scoring(
        lam=float(voc["lam"]), prob_thd=float(voc["prob_thd"]), bg_idx=int(voc["bg_idx"])
    )


def open_model_folder(model_dir, *, providers=None, threads: int | None = None, window_batch: int = 1, cache=True):
    """The segmenter for a model folder: :class:`FixedOnnxSegmenter` (fixed vocabulary) or :class:`OnnxSegmenter`."""
    if is_fixed(read_manifest(model_dir, check_files=False)):
        return FixedOnnxSegmenter(model_dir, providers=providers, threads=threads, window_batch=window_batch)
    return OnnxSegmenter(model_dir, providers=providers, threads=threads, window_batch=window_batch, cache=cache)


class FixedOnnxSegmenter(WindowSegmenter):
    """Sliding-window segmentation (docs/method.md 2) with a fixed-vocabulary image graph."""

    def __init__(self, model_dir, *, providers=None, threads: int | None = None, window_batch: int = 1):
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        if not is_fixed(self.manifest):
            raise ModelFolderError(f"{self.model_dir}: not a fixed-vocabulary folder (no vocabulary in {MANIFEST})")
        pre = self.manifest["preprocessing"]
        self.long_side, self.window, self.stride, self.patch_size = (
            pre["long_side"], pre["window"], pre["stride"], pre["patch"],
        )
        if window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {window_batch}")
        self.window_batch = window_batch
        self.vocabulary, self.scoring = fixed_vocabulary(self.manifest)
        self.default_lambda = self.scoring.lam
        self.uint8 = self.manifest["image_input"] == "uint8"
        self.cache = None
        self.providers = choose_providers(providers)
        name = self.manifest["graphs"]["image"]["file"]
        self.image_session = open_session(self.model_dir / name, self.providers, threads)
        check_fixed_graph_io(self.model_dir / MANIFEST, self.manifest, _shapes(self.image_session.get_inputs()),
                             _shapes(self.image_session.get_outputs()))
        check_graph_metadata(self.model_dir / name, self.manifest, "image",
                             self.image_session.get_modelmeta().custom_metadata_map)
        queries = self.model_dir / QUERIES_FILE
        self.queries = np.load(queries) if queries.is_file() else None
        warn_if_folder_trained_on_random(self.manifest, self.model_dir)

    # ------------------------------------------------------------------ vocabulary checks
    def check_vocabulary(self, vocabulary: Vocabulary, lam: float | None = None) -> None:
        """Refuse classes (or a lambda) other than the baked ones, in one line naming the fix."""
        if vocabulary.classes != self.vocabulary.classes:
            baked = ";".join(",".join(c) for c in self.vocabulary.classes)
            raise ValueError(
                f"{self.model_dir} has a fixed vocabulary ({baked!r}): leave out --classes/--preset, "
                "or export another folder for other classes"
            )
        if lam is not None and float(lam) != self.scoring.lam:
            raise ValueError(f"{self.model_dir} was exported with lam {self.scoring.lam}: --lam {lam} needs "
                             "another export (export/to_onnx.py --lam)")

    # ------------------------------------------------------------------ WindowSegmenter
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        raise ModelFolderError(f"{self.model_dir} has a fixed vocabulary and no text graph: it encodes no text")

    def encode_queries(self, words: list[str]) -> np.ndarray:
        """The baked queries' embeddings (the graph holds them; ``words`` must be the baked queries)."""
        if list(words) != self.vocabulary.queries:
            self.check_vocabulary(Vocabulary.from_lines(words))
        if self.queries is not None:
            return self.queries
        return np.zeros((len(words), 0), np.float32)

    def _window_logits(self, batch: np.ndarray, text: np.ndarray, lam: float) -> np.ndarray:
        if self.uint8 and batch.dtype != np.uint8:  # scene mode (docs/method.md 9) cuts normalised windows
            raise ModelFolderError(
                f"{self.model_dir} takes uint8 windows (--uint8-input), which scene mode cannot give (nodata becomes "
                "the mean colour after normalisation, not a uint8 value): export the folder without --uint8-input"
            )
        if self.uint8:  # (B, 3, h, w) uint8 windows, unpadded -> the graph's (B, h, w, 3)
            batch = np.ascontiguousarray(batch.transpose(0, 2, 3, 1))
        else:
            batch = np.ascontiguousarray(batch, np.float32)
        return self.image_session.run(None, {WINDOWS: batch})[0]

    def averaged_logits(self, images, text, *, lam=None):
        """As :meth:`WindowSegmenter.averaged_logits`; a uint8 graph gets the resized uint8 image's windows
        unpadded (it normalises and pads inside, docs/model-folder-fixed.md)."""
        if lam is not None:
            self.check_vocabulary(self.vocabulary, lam)
        if not self.uint8:
            return super().averaged_logits(images, text, lam=lam)
        prepared = [imaging.resize_long_side(image, self.long_side).transpose(2, 0, 1) for image in images]
        geometry = {**self.geometry, "patch": 1}  # no padding outside the graph
        return windows.averaged_logits(prepared, np.asarray(text), self.scoring.lam, self._window_logits, **geometry)

    def segment(self, images, vocabulary=None, *, scoring=None, text=None, return_probs=False):
        """:meth:`WindowSegmenter.segment` with the baked vocabulary and scoring as defaults."""
        vocabulary = vocabulary or self.vocabulary
        self.check_vocabulary(vocabulary, scoring.lam if scoring is not None else None)
        return super().segment(images, vocabulary, scoring=scoring or self.scoring, text=text,
                               return_probs=return_probs)

    def describe(self) -> dict:
        return {"onnx": str(self.model_dir), "vocabulary": "fixed", "image_input": self.manifest["image_input"],
                **{k: self.manifest.get(k) for k in ("model", "upsampler", "dtype")}}


__all__ = ["FixedOnnxSegmenter", "open_model_folder", "fixed_vocabulary"]
