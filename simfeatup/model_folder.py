"""The exported ONNX model folder: its file and I/O names, format version, manifest and checks.

One home for the format (written by :mod:`simfeatup.export`, read by :mod:`simfeatup.runtime`
and by anyone's own consumer); imports neither torch nor onnxruntime.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path

from .constants import CLIP_MEAN, CLIP_STD, LOGIT_SCALE

FORMAT = "simfeatup-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_GRAPH = "image.onnx"
TEXT_GRAPH = "text.onnx"
MERGES = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's BPE merges, as open_clip ships them
# graph inputs and outputs
WINDOWS, TEXT, LAM, LOGITS = "windows", "text", "lam", "logits"
TOKENS, EMBEDDINGS = "tokens", "embeddings"


class ModelFolderError(ValueError):
    """A model folder that cannot be used (missing, corrupt, edited or from another exporter)."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (the manifest's checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(model_dir: Path, *, check_files: bool = True) -> dict:
    """Load ``manifest.json``, validate the fields a consumer uses and (by default) every file's sha256."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise ModelFolderError(
            f"ONNX model folder not found: {model_dir} (create one with `python export/to_onnx.py --out DIR`)"
        )
    if not path.is_file():
        raise ModelFolderError(f"{model_dir} has no {MANIFEST}: not a folder written by export/to_onnx.py")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFolderError(
            f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}"
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise ModelFolderError(
            f"{path}: format version {manifest.get('version')!r}, this simfeatup reads {FORMAT_VERSION}; "
            "re-export the folder with this simfeatup version"
        )
    _check_fields(path, manifest)
    if check_files:
        for name, digest in manifest.get("files", {}).items():
            file = model_dir / name
            if not file.is_file():
                raise ModelFolderError(f"{file}: listed in {MANIFEST} but missing; re-export the model folder")
            if sha256(file) != digest:
                raise ModelFolderError(
                    f"{file}: checksum mismatch with {MANIFEST} (corrupt or modified); re-export the model folder"
                )
    return manifest


def _check_fields(path: Path, manifest: dict) -> None:
    """The fields the runtime computes with: types, ranges and this simfeatup's constants."""

    def fail(what: str):
        raise ModelFolderError(f"{path}: {what}; re-export the model folder with this simfeatup version")

    pre = manifest.get("preprocessing")
    if not isinstance(pre, dict):
        fail("no preprocessing section")
    # The runtime scores with simfeatup.imaging / simfeatup.scores, whose constants the graphs were verified with.
    found = {"mean": pre.get("mean"), "std": pre.get("std"), "logit_scale": manifest.get("logit_scale")}
    expected = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "logit_scale": LOGIT_SCALE}
    if found != expected:
        fail(f"preprocessing/scoring constants {found} differ from this simfeatup's {expected}")
    for key in ("long_side", "window", "stride", "patch"):
        value = pre.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(f"preprocessing.{key} is {value!r}, not a positive whole number")
    if pre["window"] % pre["patch"] or pre["stride"] > pre["window"]:
        fail(
            f"window {pre['window']} / stride {pre['stride']} / patch {pre['patch']} are inconsistent "
            "(the window must be a multiple of the patch and at least the stride)"
        )
    lam = manifest.get("default_lambda")
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or lam != lam:
        fail(f"default_lambda is {lam!r}, not a number")
    for key in ("embed_dim",):
        value = manifest.get(key)
        if not isinstance(value, int) or value < 1:
            fail(f"{key} is {value!r}, not a positive whole number")
    tok = manifest.get("tokenizer")
    if (
        not isinstance(tok, dict)
        or not isinstance(tok.get("merges"), str)
        or not isinstance(tok.get("context_length"), int)
    ):
        fail("tokenizer section missing or incomplete")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or not all(
        isinstance(graphs.get(g, {}).get("file"), str) for g in ("image", "text")
    ):
        fail("graphs section missing or incomplete")


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "IMAGE_GRAPH",
    "TEXT_GRAPH",
    "MERGES",
    "ModelFolderError",
    "read_manifest",
    "write_manifest",
    "sha256",
]
