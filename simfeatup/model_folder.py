"""The exported ONNX model folder: its file and I/O names, format version, manifest and checks.

One home for the format (written by :mod:`simfeatup.export`, read by :mod:`simfeatup.runtime`
and by anyone's own consumer); imports neither torch nor onnxruntime.

The manifest protects the folder: ``files`` holds the sha256 of every other file, and
``manifest_sha256`` that of the manifest itself (:func:`manifest_digest`: its JSON without that
key, keys sorted, separators ``,`` and ``:``, ASCII), so an edited window or stride is refused
like a modified graph. Every field the runtime computes with is checked (:func:`read_manifest`),
and against the graphs' own inputs and outputs (:func:`check_graph_io`) and self-description
(:func:`graph_metadata`, :func:`check_graph_metadata`). The contract for consumers is
docs/model-folder.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from pathlib import Path

from .constants import CLIP_MEAN, CLIP_STD, LOGIT_SCALE

FORMAT = "simfeatup-onnx"
FORMAT_VERSION = 3  # 2: the manifest carries its own checksum; 3: graph metadata_props, static-shape folders
READABLE_VERSIONS = (2, 3)  # a version-2 folder is dynamic and has no graph metadata
DOCS = "docs/model-folder.md"  # the contract, in the simfeatup repository
MANIFEST = "manifest.json"
IMAGE_GRAPH = "image.onnx"
TEXT_GRAPH = "text.onnx"
MERGES = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's BPE merges, as open_clip ships them
# graph inputs and outputs
WINDOWS, TEXT, LAM, LOGITS = "windows", "text", "lam", "logits"
TOKENS, EMBEDDINGS = "tokens", "embeddings"
# fixed-vocabulary folders (docs/model-folder-fixed.md)
SCORING_GRAPH = "scoring.onnx"
CLASSES_FILE = "classes.json"
PROBS, LABELS = "probs", "labels"
IMAGE_INPUTS = ("float32", "uint8")  # manifest "image_input": normalised padded NCHW, or raw uint8 NHWC
# docs/model-folder.md "Static shapes": the text graph of a static folder encodes this many token rows per call
STATIC_TEXT_BATCH = 16
# ... and its image graph this many queries by default: the largest preset vocabulary (iSAID) has 16
DEFAULT_STATIC_QUERIES = 16

# docs/model-folder.md "Graph metadata": metadata_props key -> the manifest field it repeats (a path of keys).
# Keys whose field a folder does not have are left out; a variant adds its own keys here.
METADATA_PREFIX = "simfeatup."
METADATA_FIELDS = {
    "format": ("format",),
    "version": ("version",),
    "dtype": ("dtype",),
    "mean": ("preprocessing", "mean"),
    "std": ("preprocessing", "std"),
    "patch": ("preprocessing", "patch"),
    "window": ("preprocessing", "window"),
    "stride": ("preprocessing", "stride"),
    "long_side": ("preprocessing", "long_side"),
    "logit_scale": ("logit_scale",),
    "default_lambda": ("default_lambda",),
    "embed_dim": ("embed_dim",),
    "context_length": ("tokenizer", "context_length"),
    "static": ("static",),
    "model": ("model",),
    "upsampler": ("upsampler",),
    "docs": ("docs",),
    # fixed-vocabulary folders (docs/model-folder-fixed.md): the baked classes and the image input kind
    "vocabulary": ("vocabulary",),
    "image_input": ("image_input",),
}


class ModelFolderError(ValueError):
    """A model folder that cannot be used (missing, corrupt, edited or from another exporter)."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (the manifest's checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own ``manifest_sha256``."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``manifest.json`` with its ``manifest_sha256`` (set in ``manifest`` too)."""
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(model_dir: Path, *, check_files: bool = True) -> dict:
    """Load ``manifest.json``, validate the fields a consumer uses and (by default) every file's sha256."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if model_dir.is_file():
        raise ModelFolderError(f"{model_dir} is a file: give the model folder that holds it and {MANIFEST} "
                               f"(--onnx {model_dir.parent})")
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
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ModelFolderError(
            f"{path}: format version {manifest.get('version')!r}, this simfeatup reads "
            f"{' or '.join(map(str, READABLE_VERSIONS))}; re-export the folder with this simfeatup version"
        )
    _check_fields(path, manifest)
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ModelFolderError(
            f"{path}: edited after export (its content no longer matches its manifest_sha256); the graphs were "
            "verified with the original values: re-export the model folder instead of editing it"
        )
    if check_files:
        for name, digest in manifest.get("files", {}).items():
            file = model_dir / name
            if not file.is_file():
                raise ModelFolderError(f"{file}: listed in {MANIFEST} but missing; re-export the model folder")
            if sha256(file) != digest:
                raise ModelFolderError(
                    f"{file}: checksum mismatch with {MANIFEST} (corrupt or modified); re-export the model folder"
                )
        _warn_8bit_int8(model_dir, manifest)
    return manifest


def _warn_8bit_int8(model_dir: Path, manifest: dict) -> None:
    """int8 folders from before the 7-bit weights (``quantization.reduce_range`` absent) overflow in
    int16 on CPUs without VNNI and give wrong labels there (docs/method.md section 8): say so."""
    quantization = manifest.get("quantization")
    if manifest.get("dtype") == "int8" and not (isinstance(quantization, dict) and quantization.get("reduce_range")):
        logging.getLogger(__name__).warning(
            "%s: int8 folder with full 8-bit weights (exported by an older simfeatup), whose sums overflow on "
            "CPUs without VNNI and change labels there; re-export it with export/to_onnx.py --dtype int8", model_dir
        )


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_fields(path: Path, manifest: dict) -> None:
    """The fields the runtime computes with: types, ranges, consistency and this simfeatup's constants."""

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
        if not _whole(pre.get(key)):
            fail(f"preprocessing.{key} is {pre.get(key)!r}, not a positive whole number")
    if pre["window"] % pre["patch"] or pre["stride"] > pre["window"]:
        fail(
            f"window {pre['window']} / stride {pre['stride']} / patch {pre['patch']} are inconsistent "
            "(the window must be a multiple of the patch and at least the stride)"
        )
    lam = manifest.get("default_lambda")
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam):
        fail(f"default_lambda is {lam!r}, not a number")
    if not _whole(manifest.get("embed_dim")):
        fail(f"embed_dim is {manifest.get('embed_dim')!r}, not a positive whole number")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and Path(k).name == k and k not in ("", ".", "..", MANIFEST) and isinstance(v, str)
        and len(v) == 64 for k, v in files.items()
    ):
        fail("files section missing or not {file name in the folder: sha256}")
    if is_fixed(manifest):
        _check_fixed(manifest, files, fail)
        return
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("merges"), str) or not _whole(tok.get("context_length")):
        fail("tokenizer section missing or incomplete")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or not all(
        isinstance(graphs.get(g), dict) and isinstance(graphs[g].get("file"), str) for g in ("image", "text")
    ):
        fail("graphs section missing or incomplete")
    unlisted = [f for f in (graphs["image"]["file"], graphs["text"]["file"], tok["merges"]) if f not in files]
    if unlisted:
        fail(f"{unlisted} not in its files section (not covered by a checksum)")
    static = manifest.get("static")
    if static is not None and not (
        isinstance(static, dict) and all(_whole(static.get(k)) for k in ("window_batch", "queries", "text_batch"))
    ):
        fail(f"static is {static!r}, not {{window_batch, queries, text_batch: positive whole numbers}}")


def static_shapes(manifest: dict) -> dict | None:
    """A static folder's fixed sizes (docs/model-folder.md "Static shapes"), None for a dynamic folder."""
    return manifest.get("static")


def _field(manifest: dict, keys: tuple):
    for key in keys:
        if not isinstance(manifest, dict) or key not in manifest:
            return None
        manifest = manifest[key]
    return manifest


def graph_metadata(manifest: dict, graph: str) -> dict[str, str]:
    """The ``metadata_props`` of the ``graph`` ("image" or "text") of a folder with this manifest.

    Every :data:`METADATA_FIELDS` entry the manifest has, JSON-encoded (keys sorted), under
    ``simfeatup.<key>``, plus ``simfeatup.graph``: the same values as the manifest, so a graph
    file that travels alone still describes itself (docs/model-folder.md "Graph metadata").
    """
    out = {METADATA_PREFIX + "graph": json.dumps(graph)}
    for key, path in METADATA_FIELDS.items():
        value = _field(manifest, path)
        if value is not None:
            out[METADATA_PREFIX + key] = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return out


def check_graph_metadata(path: Path, manifest: dict, graph: str, found: dict) -> None:
    """``found`` (a graph's metadata_props as {key: value}) must hold :func:`graph_metadata`'s entries.

    Version-2 folders predate graph metadata and are not checked. Keys without the
    ``simfeatup.`` prefix (a user's own) are ignored.
    """
    if manifest.get("version", FORMAT_VERSION) < 3:
        return
    expected = graph_metadata(manifest, graph)
    ours = {k: v for k, v in found.items() if k.startswith(METADATA_PREFIX)}
    for key in sorted(set(expected) | set(ours)):
        got, want = ours.get(key), expected.get(key)
        if got is None or want is None or json.loads(got) != json.loads(want):
            raise ModelFolderError(
                f"{path}: the {graph} graph's metadata {key} is {got}, the manifest says {want}; "
                "the manifest does not belong to this graph: re-export the model folder"
            )


def is_fixed(manifest: dict) -> bool:
    """A fixed-vocabulary folder: query embeddings baked into the image graph, no text graph."""
    return isinstance(manifest.get("vocabulary"), dict)


def _check_fixed(manifest: dict, files: dict, fail) -> None:
    """The fields of a fixed-vocabulary folder (docs/model-folder-fixed.md) a consumer computes with."""
    voc = manifest["vocabulary"]
    classes = voc.get("classes")
    if not isinstance(classes, list) or not classes or not all(
        isinstance(c, list) and c and all(isinstance(w, str) and w for w in c) for c in classes
    ):
        fail("vocabulary.classes is not a non-empty list of non-empty lists of query words")
    query_class = [k for k, words in enumerate(classes) for _ in words]
    if voc.get("query_class") != query_class:
        fail("vocabulary.query_class does not match vocabulary.classes")
    thd, bg, lam = voc.get("prob_thd"), voc.get("bg_idx"), voc.get("lam")
    if not isinstance(thd, numbers.Real) or isinstance(thd, bool) or not 0.0 <= thd <= 1.0:
        fail(f"vocabulary.prob_thd is {thd!r}, not a probability")
    if not isinstance(bg, int) or isinstance(bg, bool) or not 0 <= bg < len(classes):
        fail(f"vocabulary.bg_idx is {bg!r}, not a class index")
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam):
        fail(f"vocabulary.lam is {lam!r}, not a number")
    if manifest.get("image_input") not in IMAGE_INPUTS:
        fail(f"image_input is {manifest.get('image_input')!r}, not one of {list(IMAGE_INPUTS)}")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or not all(
        isinstance(graphs.get(g), dict) and isinstance(graphs[g].get("file"), str) for g in ("image", "scoring")
    ):
        fail("graphs section missing or incomplete (a fixed-vocabulary folder has image and scoring graphs)")
    unlisted = [f for f in (graphs["image"]["file"], graphs["scoring"]["file"], voc.get("file")) if f not in files]
    if unlisted:
        fail(f"{unlisted} not in its files section (not covered by a checksum)")


def check_fixed_graph_io(path: Path, manifest: dict, image_in: dict, image_out: dict) -> None:
    """A fixed-vocabulary image graph's inputs and outputs against the manifest (see :func:`check_graph_io`)."""
    queries = len(manifest["vocabulary"]["query_class"])
    if manifest["image_input"] == "uint8":
        expected_in = {WINDOWS: [None, None, None, 3]}
    else:
        expected_in = {WINDOWS: [None, 3, None, None]}
    for found, expected in ((image_in, expected_in), (image_out, {LOGITS: [None, queries, None, None]})):
        if set(found) != set(expected) or any(
            len(found[n]) != len(d) or any(isinstance(g, int) and e is not None and g != e for g, e in zip(found[n], d))
            for n, d in expected.items()
        ):
            raise ModelFolderError(
                f"{path}: the image graph has {found}, but the manifest says {expected} (None: any); "
                "the manifest does not belong to these graphs: re-export the model folder"
            )


def check_graph_io(path: Path, manifest: dict, image: dict, text_in: dict, text_out: dict) -> None:
    """The graphs' own inputs and outputs against the manifest: names, ranks and every fixed size.

    image, text_in, text_out: {name: shape} of the image graph's inputs, the text graph's inputs
    and outputs, each dimension an int or None (dynamic), as onnxruntime reports them.
    """

    def check(graph: str, found: dict, expected: dict) -> None:
        if set(found) != set(expected):
            raise ModelFolderError(f"{path}: the {graph} graph has inputs/outputs {sorted(found)}, expected "
                                   f"{sorted(expected)}; re-export the model folder with this simfeatup version")
        for name, dims in expected.items():
            got = list(found[name])
            if len(got) != len(dims) or any(isinstance(g, int) and d is not None and g != d for g, d in zip(got, dims)):
                raise ModelFolderError(
                    f"{path}: the {graph} graph's {name} has shape {got}, but the manifest says {dims} "
                    "(None: any); the manifest does not belong to these graphs: re-export the model folder"
                )

    dim, context = manifest["embed_dim"], manifest["tokenizer"]["context_length"]
    static = static_shapes(manifest)
    if static is None:
        batch, side, queries, texts = None, None, None, None
    else:
        side = manifest["preprocessing"]["window"]
        batch, queries, texts = static["window_batch"], static["queries"], static["text_batch"]
    check("image", image, {WINDOWS: [batch, 3, side, side], TEXT: [queries, dim], LAM: []})
    check("text", text_in, {TOKENS: [texts, context]})
    check("text", text_out, {EMBEDDINGS: [texts, dim]})
    if static is not None:
        dynamic = [f"{n} {d}" for found in (image, text_in, text_out) for n, d in found.items() if None in d]
        if dynamic:
            raise ModelFolderError(f"{path}: a static folder, but its graphs have dynamic dims ({', '.join(dynamic)}); "
                                   "re-export the model folder")


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
    "manifest_digest",
    "check_graph_io",
    "check_fixed_graph_io",
    "is_fixed",
    "check_graph_metadata",
    "graph_metadata",
    "static_shapes",
    "sha256",
]
