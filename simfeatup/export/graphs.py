"""Tracing the segmenter's two graphs to ONNX and the checks on what the exporter wrote (SPEC 7)."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import DEFAULT_LAMBDA
from ..entry import Failure
from ..model_folder import (
    EMBEDDINGS,
    IMAGE_GRAPH,
    LAM,
    LOGITS,
    METADATA_PREFIX,
    TEXT,
    TEXT_GRAPH,
    TOKENS,
    WINDOWS,
    graph_metadata,
)
from .graph_form import graph_form

logger = logging.getLogger(__name__)


@contextmanager
def stage(what: str):
    """Log (INFO) that ``what`` starts, then how long it took: an export is minutes of silence otherwise."""
    logger.info("%s ...", what)
    started = time.perf_counter()
    yield
    logger.info("%s: done in %.1f s", what, time.perf_counter() - started)


def _optimise_and_save(program, path: Path, graph: str) -> None:
    # torch.onnx.export(optimize=True) runs this same pass inside; run here it can be timed. It folds the
    # shape arithmetic: ~3x fewer nodes, no CastLike left for onnxruntime.
    with stage(f"{graph} graph: optimising"):
        program.optimize()
    with stage(f"{graph} graph: saving {path.name} (+ its .data weights)"):
        program.save(str(path), external_data=True)


class OnnxExportError(Failure):
    """The export failed or its graphs disagree with torch; nothing was left on disk."""


class ImageGraph(nn.Module):
    """Export-only wrapper: (windows, text, lam) -> Segmenter.window_logits of a graph-form segmenter."""

    def __init__(self, segmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, windows, text, lam):
        """windows (B, 3, H, W) normalised, text (Q, D) unit-norm, lam () -> logits (B, Q, H, W) float32."""
        return self.segmenter.window_logits(windows, text, lam)


class TextGraph(nn.Module):
    """Export-only wrapper: token ids (N, L) int64 -> unit-norm embeddings (N, D) float32."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, tokens):
        return self.encoder.encode_text(tokens).float()


def export_image(segmenter, path: Path, opset, static: dict | None = None):
    """The image graph; ``static`` ({window_batch, queries, ...}): every dim fixed (docs/model-folder.md)."""
    from torch.export import Dim

    patch = segmenter.patch_size
    D = segmenter.encoder.embed_dim
    with graph_form(segmenter, static=static is not None) as graph_segmenter:
        wrapper = ImageGraph(graph_segmenter).eval()
        # Batch 2 (not 1) in the example: a size-1 example dim gets specialised (SPEC 7).
        batch, queries = (static["window_batch"], static["queries"]) if static else (2, 3)
        windows = torch.randn(batch, 3, segmenter.window, segmenter.window)
        text = F.normalize(torch.randn(queries, D), dim=1)
        lam = torch.tensor(DEFAULT_LAMBDA)
        h, w = Dim("h", min=1), Dim("w", min=1)
        dynamic = None if static else {
            WINDOWS: {0: Dim("batch", min=1), 2: patch * h, 3: patch * w},
            TEXT: {0: Dim("queries", min=1)},
            LAM: None,
        }
        with stage(f"image graph: tracing (torch.export, {'static' if static else 'dynamic'} window and query sizes)"):
            program = torch.onnx.export(
                wrapper,
                (windows, text, lam),
                None,
                dynamo=True,
                input_names=[WINDOWS, TEXT, LAM],
                output_names=[LOGITS],
                dynamic_shapes=dynamic,
                opset_version=opset,
                optimize=False,  # below, timed
                verbose=False,
            )
    _optimise_and_save(program, path, "image")


def export_text(encoder, path: Path, opset, static: dict | None = None):
    """The text graph; ``static`` ({text_batch, ...}): a fixed number of token rows (docs/model-folder.md)."""
    from torch.export import Dim

    texts = ["a photo of a road.", "a bad photo of the building."]  # batch 2, see above
    if static:
        texts = [texts[i % 2] for i in range(static["text_batch"])]
    tokens = encoder.tokenize(texts)
    kind = "static number of texts" if static else "dynamic number of texts"
    with stage(f"text graph: tracing (torch.export, {kind})"):
        program = torch.onnx.export(
            TextGraph(encoder).eval(),
            (tokens,),
            None,
            dynamo=True,
            input_names=[TOKENS],
            output_names=[EMBEDDINGS],
            dynamic_shapes=None if static else {TOKENS: {0: Dim("texts", min=1)}},
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
    _optimise_and_save(program, path, "text")


def graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_opset(folder: Path, opset: int) -> None:
    """torch.onnx keeps its own opset when it cannot convert a graph: say so instead of shipping it."""
    for name in (IMAGE_GRAPH, TEXT_GRAPH):
        got = graph_opset(folder / name)
        if got != opset:
            raise ValueError(
                f"--opset {opset}: the exporter could only write opset {got} for {name}; use --opset {got} or higher"
            )


def check_dims(model, name: str, symbolic: dict, *, static: bool = False) -> None:
    """Dynamic dims must be symbolic in the saved graph, never a number baked in by tracing.

    ``static``: the opposite, for static folders: no dim of any input or output is symbolic.
    """
    if static:
        for value in (*model.graph.input, *model.graph.output):
            dims = value.type.tensor_type.shape.dim
            loose = [i for i, d in enumerate(dims) if d.dim_param or not d.HasField("dim_value")]
            if loose:
                raise OnnxExportError(
                    f"{name}: {value.name!r} has symbolic dims at axes {loose} "
                    f"({[d.dim_param for d in dims]}); a static export must fix every dim"
                )
        return
    inputs = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    for input_name, rank in symbolic.items():
        dims = inputs.get(input_name)
        if dims is None or len(dims) != rank:
            raise OnnxExportError(f"{name}: input {input_name!r} missing or not of rank {rank}")
        want = {WINDOWS: (0, 2, 3), TEXT: (0,), TOKENS: (0,)}[input_name]
        fixed = [i for i in want if not dims[i].dim_param]
        if fixed:
            raise OnnxExportError(
                f"{name}: input {input_name!r} has fixed dims {[dims[i].dim_value for i in fixed]} at axes {fixed}; "
                "they must be dynamic (the exporter specialised them)"
            )


def write_metadata(folder: Path, manifest: dict) -> None:
    """Each graph's metadata_props := :func:`simfeatup.model_folder.graph_metadata` (docs/model-folder.md).

    Only the graph's protobuf is rewritten: its weights stay in the external ``.data`` file,
    untouched (loaded without external data, saved with the same references).
    """
    import onnx

    for graph, entry in manifest["graphs"].items():  # image and text, or image and scoring (fixed vocabulary)
        path = folder / entry["file"]
        model = onnx.load(str(path), load_external_data=False)
        props = graph_metadata(manifest, graph)
        # ours are all replaced (a fixed folder's image graph drops the text side's keys); others kept
        kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, {**dict(kept), **props})
        onnx.save(model, str(path))


def check_tokenizer(encoder) -> None:
    """The runtime re-implements open_clip's default CLIP BPE only: refuse other tokenizers."""
    import open_clip.tokenizer as oct

    tok = encoder.tokenizer
    if type(tok) is not oct.SimpleTokenizer or tok.clean_fn is not oct._clean_lower or tok.reduction_fn is not None:
        raise ValueError(
            f"{encoder.backbone.describe()} uses {type(tok).__name__} (clean/reduction options included); "
            "the ONNX runtime only reproduces CLIP's default BPE tokenizer (OpenAI/LAION ViT CLIP models)"
        )
