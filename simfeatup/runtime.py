"""Segmentation with onnxruntime and a model folder from :func:`simfeatup.export.export_onnx`.

Never imports torch: only onnxruntime, numpy and the torch-free simfeatup modules (imaging,
scores, vocabulary, templates, cache, presets, tokenizer); what every runtime of a folder shares
is :mod:`simfeatup.folder_segmenter`. Every pixel rule comes from the
same functions the torch segmenter uses, so both paths give the same label maps.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .folder_segmenter import FolderSegmenter
from .model_folder import ModelFolderError, read_manifest

logger = logging.getLogger(__name__)

# TensorRT is opt-in (providers=... or $SIMFEATUP_ORT_PROVIDERS): with dynamic window sizes it builds a
# new engine whenever a window shape leaves the range seen so far, minutes each for ViT-B/16.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDERS_ENV = "SIMFEATUP_ORT_PROVIDERS"


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


def open_session(path: Path, providers, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session of the graph file ``path`` with :func:`session_options`; one line when it cannot load.

    ``threads``: intra-op threads (None: onnxruntime's choice, one per physical core)."""
    options = session_options()
    if threads:
        options.intra_op_num_threads = threads
    started = time.perf_counter()
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own (Fail, InvalidGraph, ...) types
        raise ModelFolderError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None
    logger.debug(
        "%s: session in %.1f s, providers %s, %s, intra-op threads %s (0: onnxruntime's choice)",
        path, time.perf_counter() - started, session.get_providers(),
        options.graph_optimization_level.name, options.intra_op_num_threads,
    )
    return session


class OnnxSegmenter(FolderSegmenter):
    """Sliding-window segmentation (SPEC 2) with the exported graphs on onnxruntime.

    ``providers``: as :func:`choose_providers` takes them. ``threads``: CPU threads per graph call
    (None: onnxruntime's choice). ``window_batch``, ``cache``: see
    :class:`~simfeatup.folder_segmenter.FolderSegmenter`.
    """

    runtime = "onnxruntime"

    def __init__(self, model_dir, *, providers=None, threads: int | None = None, window_batch: int = 1, cache=True):
        self.providers = choose_providers(providers)
        self.threads = threads
        super().__init__(model_dir, window_batch=window_batch, cache=cache)
        logger.info("onnxruntime %s with %s", ort.__version__, ", ".join(self.image_session.get_providers()))

    @property
    def image_session(self) -> ort.InferenceSession:
        return self.image_graph

    @property
    def text_session(self) -> ort.InferenceSession:
        return self.text_graph

    def _load(self, name: str, graph: str) -> ort.InferenceSession:
        return open_session(self.model_dir / name, self.providers, self.threads)

    def _run(self, graph: ort.InferenceSession, feeds: dict) -> np.ndarray:
        return graph.run(None, feeds)[0]

    def _io_shapes(self) -> tuple[dict, dict, dict]:
        return (_shapes(self.image_session.get_inputs()), _shapes(self.text_session.get_inputs()),
                _shapes(self.text_session.get_outputs()))

    def _metadata(self, graph: str) -> dict:
        session = self.image_session if graph == "image" else self.text_session
        return session.get_modelmeta().custom_metadata_map


__all__ = ["OnnxSegmenter", "ModelFolderError", "read_manifest", "session_options", "choose_providers"]
