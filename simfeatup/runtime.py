"""Segmentation with onnxruntime and a model folder from :func:`simfeatup.export.export_onnx`.

Never imports torch: only onnxruntime, numpy and the torch-free simfeatup modules (imaging,
scores, vocabulary, templates, cache, presets, tokenizer). Every pixel rule comes from the
same functions the torch segmenter uses, so both paths give the same label maps.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .backbone import Backbone, warn_if_trained_on_random
from .cache import EmbeddingCache
from .model_folder import (
    LAM,
    MANIFEST,
    TEXT,
    TOKENS,
    WINDOWS,
    ModelFolderError,
    check_graph_io,
    check_graph_metadata,
    read_manifest,
    static_shapes,
)
from .pipeline import WindowSegmenter
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# TensorRT is opt-in (providers=... or $SIMFEATUP_ORT_PROVIDERS): with dynamic window sizes it builds a
# new engine whenever a window shape leaves the range seen so far, minutes each for ViT-B/16.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDERS_ENV = "SIMFEATUP_ORT_PROVIDERS"
# Prompts per text-graph call: 80 at once grew onnxruntime's arena by ~400 MB (ViT-B/16), 16 by ~70 MB
# for the same total time.
TEXT_BATCH = 16


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
        logger.debug("onnxruntime providers requested: %s (available: %s)", requested, available)
        return list(requested)
    chosen = [p for p in PREFERRED_PROVIDERS if p in available] or available
    logger.debug("onnxruntime providers: %s, chosen from the available %s (%s overrides)", chosen, available,
                 PROVIDERS_ENV)
    return chosen


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


def _shapes(args) -> dict:
    """{name: [int or None per dimension]} of onnxruntime's NodeArg list (symbolic dimensions are None)."""
    return {a.name: [d if isinstance(d, int) else None for d in a.shape] for a in args}


def run_in_chunks(run, x: np.ndarray, size: int, out_axis: int = 0) -> np.ndarray:
    """``run`` on the rows of ``x`` in pieces of exactly ``size`` (the last one padded by repeating its
    final row), the padding's outputs (along ``out_axis`` of ``run``'s result) dropped: a static
    graph on any count (docs/model-folder.md "Static shapes"). Rows are independent in the graphs,
    so the padding changes nothing."""
    parts = []
    for start in range(0, len(x), size):
        piece = x[start : start + size]
        short = size - len(piece)
        if short:
            piece = np.concatenate([piece, np.repeat(piece[-1:], short, axis=0)])
        out = run(piece)
        parts.append(np.take(out, np.arange(size - short), axis=out_axis))
    return np.concatenate(parts, axis=out_axis)


class OnnxSegmenter(WindowSegmenter):
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
        self.long_side, self.window, self.stride, self.patch_size = (
            pre["long_side"],
            pre["window"],
            pre["stride"],
            pre["patch"],
        )
        self.default_lambda = float(self.manifest["default_lambda"])
        if window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {window_batch}")
        self.window_batch = window_batch
        self.static = static_shapes(self.manifest)
        if self.static:  # fixed shapes: the graph's own batch, windows padded to the full side
            self.window_batch = self.static["window_batch"]
        self.providers = choose_providers(providers)
        graphs = self.manifest["graphs"]
        self.image_session = self._session(graphs["image"]["file"])
        self.text_session = self._session(graphs["text"]["file"])
        check_graph_io(
            self.model_dir / MANIFEST, self.manifest, _shapes(self.image_session.get_inputs()),
            _shapes(self.text_session.get_inputs()), _shapes(self.text_session.get_outputs()),
        )
        for graph, session in (("image", self.image_session), ("text", self.text_session)):
            meta = session.get_modelmeta().custom_metadata_map
            check_graph_metadata(self.model_dir / graphs[graph]["file"], self.manifest, graph, meta)
        logger.info("onnxruntime %s with %s", ort.__version__, ", ".join(self.image_session.get_providers()))
        upsampler = self.manifest.get("upsampler") or {}
        if upsampler.get("backbone"):  # the record of the artefact the folder was exported from
            warn_if_trained_on_random(Backbone.from_dict(upsampler["backbone"]), f"the upsampler of {self.model_dir}")
        tok = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer(self.model_dir / tok["merges"], context_length=tok["context_length"])
        if cache is True or cache is False:
            # The text graph's checksum identifies its weights; a random model is still reproducible.
            files = self.manifest["files"]
            identity = f"onnx:{files[graphs['text']['file']]}:{files.get(graphs['text']['file'] + '.data', '')}"
            cache = EmbeddingCache(identity if cache else None)
        self.cache = cache

    def _session(self, name: str) -> ort.InferenceSession:
        options = session_options()
        started = time.perf_counter()
        try:
            session = ort.InferenceSession(str(self.model_dir / name), options, providers=self.providers)
        except Exception as err:  # onnxruntime raises its own (Fail, InvalidGraph, ...) types
            raise ModelFolderError(
                f"{self.model_dir / name}: onnxruntime cannot load it ({str(err).splitlines()[0]})"
            ) from None
        logger.debug(
            "%s: session in %.1f s, providers %s, %s, intra-op threads %s (0: onnxruntime's choice)",
            self.model_dir / name, time.perf_counter() - started, session.get_providers(),
            options.graph_optimization_level.name, options.intra_op_num_threads,
        )
        return session

    # ------------------------------------------------------------------ WindowSegmenter
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D) unit-norm embeddings from the text graph."""
        tokens = self.tokenizer(texts)
        if not len(tokens):
            return np.zeros((0, self.manifest["embed_dim"]), np.float32)
        if self.static:
            run = lambda t: self.text_session.run(None, {TOKENS: t})[0]  # noqa: E731
            return run_in_chunks(run, tokens, self.static["text_batch"])
        parts = [
            self.text_session.run(None, {TOKENS: tokens[i : i + TEXT_BATCH]})[0]
            for i in range(0, len(tokens), TEXT_BATCH)
        ]
        return np.concatenate(parts)

    def window_logits(self, windows: np.ndarray, text: np.ndarray, lam: float) -> np.ndarray:
        """(B, 3, h, w) normalised windows, (Q, D) queries -> (B, Q, h, w) cosine logits.

        A static folder takes any B and Q: batches and query sets of its fixed sizes are padded
        and their padding dropped (:func:`run_in_chunks`); h and w must be its window side.
        """
        windows = np.ascontiguousarray(windows, np.float32)
        text = np.ascontiguousarray(text, np.float32)
        lam = np.asarray(lam, np.float32)

        def run(w: np.ndarray, t: np.ndarray) -> np.ndarray:
            return self.image_session.run(None, {WINDOWS: w, TEXT: t, LAM: lam})[0]

        if not self.static:
            return run(windows, text)
        by_queries = lambda w: run_in_chunks(lambda t: run(w, t), text, self.static["queries"], 1)  # noqa: E731
        return run_in_chunks(by_queries, windows, self.static["window_batch"])

    @property
    def geometry(self) -> dict:
        """A static folder's windows are padded to the full window side, not to the patch multiple
        (docs/model-folder.md "Static shapes"): the window walk's padding rule pads to multiples of
        ``patch``, so it is given the window."""
        geometry = super().geometry
        if self.static:
            geometry["patch"] = self.window
        return geometry

    def _window_logits(self, windows: np.ndarray, text: np.ndarray, lam: float) -> np.ndarray:
        return self.window_logits(windows, text, lam)

    def describe(self) -> dict:
        return {"onnx": str(self.model_dir), **{k: self.manifest.get(k) for k in ("model", "upsampler", "dtype")}}


__all__ = ["OnnxSegmenter", "ModelFolderError", "read_manifest", "session_options", "choose_providers"]
