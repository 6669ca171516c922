"""What every runtime of an exported model folder shares: the manifest, the tokenizer, the text cache,
the graphs' feeds and checks. Subclasses (:class:`simfeatup.runtime.OnnxSegmenter`,
:class:`simfeatup.openvino_runtime.OpenVinoSegmenter`) load and run a graph; nothing else.

Imports neither torch nor any runtime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .backbone import Backbone, warn_if_trained_on_random
from .cache import EmbeddingCache
from .model_folder import LAM, MANIFEST, TEXT, TOKENS, WINDOWS, check_graph_io, read_manifest
from .pipeline import WindowSegmenter
from .tokenizer import Tokenizer

# Prompts per text-graph call: 80 at once grew onnxruntime's arena by ~400 MB (ViT-B/16), 16 by ~70 MB
# for the same total time.
TEXT_BATCH = 16


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
        graphs = self.manifest["graphs"]
        self.image_graph = self._load(graphs["image"]["file"], "image")
        self.text_graph = self._load(graphs["text"]["file"], "text")
        check_graph_io(self.model_dir / MANIFEST, self.manifest, *self._io_shapes())
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

    # ------------------------------------------------------------------ WindowSegmenter
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D) unit-norm embeddings from the text graph."""
        tokens = self.tokenizer(texts)
        parts = [
            self._run(self.text_graph, {TOKENS: tokens[i : i + TEXT_BATCH]}) for i in range(0, len(tokens), TEXT_BATCH)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.manifest["embed_dim"]), np.float32)

    def window_logits(self, windows: np.ndarray, text: np.ndarray, lam: float) -> np.ndarray:
        """(B, 3, h, w) normalised windows, (Q, D) queries -> (B, Q, h, w) cosine logits."""
        feeds = {
            WINDOWS: np.ascontiguousarray(windows, np.float32),
            TEXT: np.ascontiguousarray(text, np.float32),
            LAM: np.asarray(lam, np.float32),
        }
        return self._run(self.image_graph, feeds)

    def _window_logits(self, windows: np.ndarray, text: np.ndarray, lam: float) -> np.ndarray:
        return self.window_logits(windows, text, lam)

    def describe(self) -> dict:
        return {
            "onnx": str(self.model_dir),
            "runtime": self.runtime,
            **{k: self.manifest.get(k) for k in ("model", "upsampler", "dtype")},
        }
