"""What every runtime of an exported model folder shares: the manifest, the tokenizer, the text cache,
the graphs' feeds and checks. Subclasses (:class:`simfeatup.runtime.OnnxSegmenter`,
:class:`simfeatup.openvino_runtime.OpenVinoSegmenter`) load and run a graph; nothing else.

Imports neither torch nor any runtime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .backbone import warn_if_folder_trained_on_random
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
    is_fixed,
    read_manifest,
    static_shapes,
)
from .pipeline import WindowSegmenter
from .tokenizer import Tokenizer

# Prompts per text-graph call: 80 at once grew onnxruntime's arena by ~400 MB (ViT-B/16), 16 by ~70 MB
# for the same total time.
TEXT_BATCH = 16


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


class FolderSegmenter(WindowSegmenter):
    """Sliding-window segmentation (SPEC 2) with a model folder's image and text graphs.

    ``window_batch`` windows go through the image graph per call, so memory stays flat however
    many windows an image has (ViT-B/16 on CPU: one window per call is as fast per window as
    two and peaks ~600 MB lower). ``cache``: True for the on-disk text-embedding cache (keyed by
    the text graph's checksum), False for memory only, or an :class:`EmbeddingCache`.
    """

    runtime = "?"  # the name reports give the subclass

    def __init__(self, model_dir, *, window_batch: int = 1, cache=True):
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        if is_fixed(self.manifest):
            raise ModelFolderError(
                f"{self.model_dir} has a fixed vocabulary (no text graph): {self.runtime} reads default folders; "
                "segment it with the default runtime (onnxruntime)"
            )
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
        graphs = self.manifest["graphs"]
        self.image_graph = self._load(graphs["image"]["file"], "image")
        self.text_graph = self._load(graphs["text"]["file"], "text")
        check_graph_io(self.model_dir / MANIFEST, self.manifest, *self._io_shapes())
        for graph in ("image", "text"):
            path = self.model_dir / graphs[graph]["file"]
            check_graph_metadata(path, self.manifest, graph, self._metadata(graph))
        warn_if_folder_trained_on_random(self.manifest, self.model_dir)
        tok = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer(self.model_dir / tok["merges"], context_length=tok["context_length"])
        if cache is True or cache is False:
            # The text graph's checksum identifies its weights; a random model is still reproducible.
            files = self.manifest["files"]
            identity = f"onnx:{files[graphs['text']['file']]}:{files.get(graphs['text']['file'] + '.data', '')}"
            cache = EmbeddingCache(identity if cache else None)
        self.cache = cache

    # ------------------------------------------------------------------ what a runtime supplies
    def _load(self, name: str, graph: str):
        """The folder's graph file ``name`` ready to run (``graph``: "image" or "text");
        :class:`ModelFolderError` when the runtime cannot load it."""
        raise NotImplementedError

    def _run(self, graph, feeds: dict) -> np.ndarray:
        """The graph's (first and only) output for ``feeds``."""
        raise NotImplementedError

    def _io_shapes(self) -> tuple[dict, dict, dict]:
        """{name: [int or None per dimension]} of the image graph's inputs, the text graph's inputs and outputs."""
        raise NotImplementedError

    def _metadata(self, graph: str) -> dict:
        """The ``graph``'s ("image" or "text") ONNX metadata_props as {key: value}."""
        raise NotImplementedError

    # ------------------------------------------------------------------ WindowSegmenter
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D) unit-norm embeddings from the text graph."""
        tokens = self.tokenizer(texts)
        if not len(tokens):
            return np.zeros((0, self.manifest["embed_dim"]), np.float32)
        if self.static:
            return run_in_chunks(lambda t: self._run(self.text_graph, {TOKENS: t}), tokens, self.static["text_batch"])
        parts = [
            self._run(self.text_graph, {TOKENS: tokens[i : i + TEXT_BATCH]}) for i in range(0, len(tokens), TEXT_BATCH)
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
            return self._run(self.image_graph, {WINDOWS: w, TEXT: t, LAM: lam})

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
        return {
            "onnx": str(self.model_dir),
            "runtime": self.runtime,
            **{k: self.manifest.get(k) for k in ("model", "upsampler", "dtype")},
        }
