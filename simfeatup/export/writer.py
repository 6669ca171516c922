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
from ..model_folder import FORMAT, FORMAT_VERSION, IMAGE_GRAPH, MANIFEST, MERGES, TEXT_GRAPH, sha256, write_manifest
from .graphs import check_opset, check_tokenizer, export_image, export_text, graph_opset
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
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
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

    upsampler_info = {"kind": "bilinear"}
    if segmenter is None:
        from ..segmenter import build_segmenter

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
    check_tokenizer(reference.encoder)
    traced = copy.deepcopy(reference).half() if dtype == "fp16" else reference

    remove_stale_temporaries(out_dir.parent)  # staging folders of killed exports
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:  # in place only once verified
        started = time.perf_counter()
        with torch.no_grad():
            export_image(traced, tmp / IMAGE_GRAPH, opset)
            export_text(traced.encoder, tmp / TEXT_GRAPH, opset)
        del traced
        quantization = quantize_image_graph(tmp / IMAGE_GRAPH) if dtype == "int8" else None
        if opset is not None:
            check_opset(tmp, opset)
        shutil.copyfile(_open_clip_merges(), tmp / MERGES)
        manifest = _manifest(reference, upsampler_info, dtype, tmp)
        if quantization is not None:
            manifest["quantization"] = quantization
        write_manifest(tmp, manifest)
        logger.info("exported %s in %.0f s; verifying against torch", out_dir, time.perf_counter() - started)
        report = verify_onnx(tmp, reference, samples=samples)
        manifest["verification"] = report
        write_manifest(tmp, manifest)  # again: the report is covered by the manifest's own checksum
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


def _manifest(segmenter, upsampler_info: dict, dtype: str, folder: Path) -> dict:
    encoder = segmenter.encoder
    tok = encoder.tokenizer
    used_opset = graph_opset(folder / IMAGE_GRAPH)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "opset": used_opset,
        "graphs": {
            "image": {
                "file": IMAGE_GRAPH,
                "inputs": {
                    "windows": "(B, 3, H, W) float32, CLIP-normalised, H and W multiples of patch",
                    "text": "(Q, D) float32 unit-norm",
                    "lam": "() float32",
                },
                "outputs": {"logits": "(B, Q, H, W) float32 cosine logits incl. lam * [CLS] similarity"},
            },
            "text": {
                "file": TEXT_GRAPH,
                "inputs": {"tokens": f"(N, {encoder.context_length}) int64"},
                "outputs": {"embeddings": "(N, D) float32 unit-norm"},
            },
        },
        "preprocessing": {
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "long_side": segmenter.long_side,
            "window": segmenter.window,
            "stride": segmenter.stride,
            "patch": segmenter.patch_size,
            "resize": "cv2.INTER_LINEAR on uint8, long side to long_side (SPEC 2.1)",
            "padding": "zeros after normalisation to the next patch multiple, top/left total//2 (SPEC 2.2)",
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
        "files": {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST},
    }
