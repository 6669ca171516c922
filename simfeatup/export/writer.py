"""export_onnx(): write a verified model folder (SPEC 7; the format is :mod:`simfeatup.model_folder`)."""
from __future__ import annotations

import copy
import logging
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

import torch

from ..atomic import atomic_dir, remove_stale_temporaries
from ..constants import CLIP_MEAN, CLIP_STD, DEFAULT_LAMBDA, LOGIT_SCALE
from ..flags import check_output_folder
from ..model_folder import (
    DEFAULT_STATIC_QUERIES,
    DOCS,
    FORMAT,
    FORMAT_VERSION,
    IMAGE_GRAPH,
    MANIFEST,
    MERGES,
    STATIC_TEXT_BATCH,
    TEXT_GRAPH,
    sha256,
    write_manifest,
)
from .graph_form import layer_norms_in_fp32
from .graphs import check_opset, check_tokenizer, export_image, export_text, graph_opset, stage, write_metadata
from .quantize import quantize_image_graph
from .verify import verify_onnx

logger = logging.getLogger(__name__)

# the graphs' precision -> the dtype traced; int8 traces float32, then quantises (.quantize)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}


def export_onnx(
    out_dir,
    *,
    upsampler=None,
    model: str | None = None,
    pretrained: str | None = None,
    clip_config: dict | None = None,
    attention: str | None = None,
    segmenter=None,
    dtype: str = "fp32",
    opset: int | None = None,
    samples=None,
    overwrite: bool = False,
    vocabulary=None,
    scoring=None,
    preset: str | None = None,
    uint8_input: bool = False,
    static_window: int | None = None,
    batch: int = 1,
    queries: int = DEFAULT_STATIC_QUERIES,
) -> Path:
    """Write a verified ONNX model folder to ``out_dir`` and return its path.

    The backbone and upsampler are chosen as in :func:`simfeatup.segmenter.build_segmenter`
    (``upsampler``: artefact path, or None/"bilinear"); or pass a ready ``segmenter`` (e.g. a
    randomly initialised one for benchmarks). ``dtype`` "fp32" or "fp16" is the graphs' weight
    precision (inputs and outputs stay float32); "int8" quantises the image tower's linear layers
    (:mod:`.quantize`) and is verified by label agreement. ``samples``: images for the parity check
    (default: the repository's ``samples/``). Everything is written to a temporary folder
    beside ``out_dir`` and renamed into place only after :func:`verify_onnx` passed; on any
    failure nothing is left behind. Raises ValueError for bad arguments, OnnxExportError when
    the graphs do not reproduce torch.

    ``vocabulary`` (a :class:`simfeatup.vocabulary.Vocabulary`) with ``scoring`` (a
    :class:`simfeatup.scores.Scoring`; ``preset`` its name, for the record) bakes the queries into
    a fixed-vocabulary folder (:mod:`.fixed`, docs/model-folder-fixed.md); ``uint8_input`` then
    makes its image graph take raw uint8 windows.

    ``static_window``: graphs with no dynamic dim (docs/model-folder.md "Static shapes"): the
    image graph takes (``batch``, 3, window, window) windows and (``queries``, D) queries, the
    text graph (16, context) tokens; the window must be the method's (SPEC 2.2).
    """
    if uint8_input and vocabulary is None:
        raise ValueError("--uint8-input is for fixed-vocabulary folders: give --classes or --preset too")
    if static_window is not None and vocabulary is not None:
        raise ValueError(
            "--static-window with --classes/--preset is not supported yet (a fixed folder's uint8 windows are "
            "unpadded): export a static default folder, or a dynamic fixed-vocabulary one"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    for flag, value in (("--batch", batch), ("--queries", queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} {value!r}: give a whole number >= 1")
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} is a file: give the name of a folder to create")
        if any(out_dir.iterdir()) and not overwrite:
            raise ValueError(f"{out_dir} already exists and is not empty: choose another --out, or --overwrite")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
            raise ValueError(
                f"{out_dir} is not a model folder (no {MANIFEST}): --overwrite only replaces model folders; "
                "choose another --out"
            )

    # before the model loads: a wrong path must not cost a model load; the folder is staged beside its final name
    check_output_folder(out_dir, "--out", staged_beside=True)
    upsampler_info = {"kind": "bilinear"}
    if segmenter is None:
        from ..segmenter import build_segmenter

        with stage("loading the torch segmenter"):
            segmenter = build_segmenter(
                upsampler, model=model, pretrained=pretrained, clip_config=clip_config, attention=attention
            )
        if upsampler is not None and str(upsampler) != "bilinear":
            upsampler_info = _upsampler_info(Path(upsampler))
    else:
        if any(v is not None for v in (upsampler, model, pretrained, clip_config)):
            raise ValueError("pass either segmenter= or upsampler/model/pretrained/clip_config, not both")
        if segmenter.upsampler is not None:
            upsampler_info = {"kind": "simfeatup", "config": segmenter.upsampler.config, "source": "in-memory module"}
    # The torch reference stays float32 on CPU; an fp16 export traces a half copy of it.
    param = next(segmenter.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        segmenter = copy.deepcopy(segmenter).to(device="cpu", dtype=torch.float32)
    reference = segmenter.eval()
    static = None
    if static_window is not None:
        if static_window != reference.window:
            raise ValueError(
                f"--static-window {static_window}: the windows of this model are {reference.window} pixels "
                f"(SPEC 2.2); use --static-window {reference.window}"
            )
        static = {"window_batch": batch, "queries": queries, "text_batch": STATIC_TEXT_BATCH}
    check_tokenizer(reference.encoder)
    traced = reference
    if dtype == "fp16":
        traced = copy.deepcopy(reference).half()
        logger.info("fp16: %d LayerNorms kept in float32", layer_norms_in_fp32(traced))

    remove_stale_temporaries(out_dir.parent)  # staging folders of killed exports
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:  # in place only once verified
        started = time.perf_counter()
        with torch.no_grad():
            shapes = (static,) if static else ()  # a dynamic export calls the graphs as it always did
            export_image(traced, tmp / IMAGE_GRAPH, opset, *shapes)
            export_text(traced.encoder, tmp / TEXT_GRAPH, opset, *shapes)
        del traced
        quantization = quantize_image_graph(tmp / IMAGE_GRAPH) if dtype == "int8" else None
        if opset is not None:
            check_opset(tmp, opset)
        shutil.copyfile(_open_clip_merges(), tmp / MERGES)
        manifest = _manifest(reference, upsampler_info, dtype, tmp, static)
        if quantization is not None:
            manifest["quantization"] = quantization
        write_metadata(tmp, manifest)  # before the checksums: the graphs change
        manifest["files"] = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
        write_manifest(tmp, manifest)
        logger.info("graphs written in %.0f s", time.perf_counter() - started)
        with stage("verifying against torch (onnx.checker, dynamic dims, onnxruntime vs torch per sample)"):
            report = verify_onnx(tmp, reference, samples=samples)
        manifest["verification"] = report
        write_manifest(tmp, manifest)  # again: the report is covered by the manifest's own checksum
        if vocabulary is not None:
            from ..scores import Scoring
            from .fixed import make_fixed, verify_fixed

            scoring = scoring or Scoring()
            manifest = make_fixed(tmp, manifest, reference, vocabulary, scoring, preset=preset,
                                  uint8_input=uint8_input)
            write_manifest(tmp, manifest)
            fixed_report = verify_fixed(tmp, reference, vocabulary, scoring, samples=samples)
            manifest["verification"] = {**report, "fixed": fixed_report}
            write_manifest(tmp, manifest)
    logger.info("wrote %s", out_dir)
    return out_dir


def _open_clip_merges() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def _upsampler_info(path: Path) -> dict:
    """Provenance of an upsampler artefact: its config, backbone, training notes and checksum."""
    from ..upsampler import load_upsampler

    _, info = load_upsampler(path)
    weights = path.parent / info["weights"] if path.suffix == ".json" else path
    extra = {k: v for k, v in info.items() if k not in ("upsampler", "backbone", "weights", "format", "version")}
    return {
        "kind": "simfeatup",
        "config": info["upsampler"],
        "backbone": info.get("backbone", {}),
        "file": weights.name,
        "sha256": sha256(weights),
        **extra,
    }


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("simfeatup", "torch", "onnx", "onnxscript", "onnxruntime", "open_clip_torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _manifest(segmenter, upsampler_info: dict, dtype: str, folder: Path, static: dict | None) -> dict:
    encoder = segmenter.encoder
    tok = encoder.tokenizer
    used_opset = graph_opset(folder / IMAGE_GRAPH)
    if static:
        B, Q, N = static["window_batch"], static["queries"], static["text_batch"]
        H = W = segmenter.window
    else:
        B, Q, N, H, W = "B", "Q", "N", "H", "W"
    see = f"see {DOCS}"
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "docs": {
            "contract": DOCS,
            "image_graph": f"{DOCS}#the-image-graph",
            "text_graph": f"{DOCS}#the-text-graph",
            "preprocessing": f"{DOCS}#pre-processing",
            "scoring": f"{DOCS}#post-processing",
            "static": f"{DOCS}#static-shapes",
        },
        "dtype": dtype,
        "opset": used_opset,
        "static": static,
        "graphs": {
            "image": {
                "file": IMAGE_GRAPH,
                "inputs": {
                    "windows": f"({B}, 3, {H}, {W}) float32, CLIP-normalised, sides multiples of patch ({see})",
                    "text": f"({Q}, D) float32 unit-norm",
                    "lam": "() float32",
                },
                "outputs": {"logits": f"({B}, {Q}, {H}, {W}) float32 cosine logits incl. lam * [CLS] similarity"},
            },
            "text": {
                "file": TEXT_GRAPH,
                "inputs": {"tokens": f"({N}, {encoder.context_length}) int64"},
                "outputs": {"embeddings": f"({N}, D) float32 unit-norm"},
            },
        },
        "preprocessing": {
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "long_side": segmenter.long_side,
            "window": segmenter.window,
            "stride": segmenter.stride,
            "patch": segmenter.patch_size,
            "resize": f"cv2.INTER_LINEAR on uint8, long side to long_side (SPEC 2.1; {see}#1-resize)",
            "padding": (
                f"zeros after normalisation to the next {'window' if static else 'patch'} multiple, "
                f"top/left total//2 (SPEC 2.2; {see}#3-windows-and-padding)"
            ),
        },
        "embed_dim": encoder.embed_dim,
        "logit_scale": LOGIT_SCALE,
        "default_lambda": DEFAULT_LAMBDA,
        "tokenizer": {
            "merges": MERGES,
            "context_length": encoder.context_length,
            "clean": "lower",
            "sot": int(tok.sot_token_id),
            "eot": int(tok.eot_token_id),
        },
        "model": {**encoder.backbone.to_dict(), "embed_dim": encoder.embed_dim},  # simfeatup.backbone.Backbone
        "upsampler": upsampler_info,
        "exporter": {
            "tool": "torch.onnx.export(dynamo=True)",
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
