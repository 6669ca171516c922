"""Fixed-vocabulary and uint8-input model folders (docs/model-folder-fixed.md), derived from a verified default folder.

The default folder's image graph takes the query embeddings as an input; here they become
constants of that same graph (graph surgery, not a second trace), so a consumer needs neither
the text graph nor a tokenizer. The embeddings are computed exactly as the Python runtime
computes them from the default folder (its text graph, :func:`simfeatup.text.embed_queries`),
so a fixed folder's logits and labels equal the default folder's for the same classes.

Why the image graph still ends in per-query LOGITS, not probabilities: the method averages the
window logits and resizes them back BEFORE the softmax, the synonym max and the threshold
(docs/method.md 2.6-2.7); averaging per-window probabilities would not give the paper's labels.
So the folder has two graphs: ``image.onnx`` (windows -> per-query logits) and ``scoring.onnx``
(averaged, resized logits (Q, H, W) -> class probabilities (K, H, W) and labels (H, W)), with
the logit scale, the synonym-to-class max, ``prob_thd`` and ``bg_idx`` baked in.

``--uint8-input``: the image graph takes raw RGB uint8 windows (B, h, w, 3), the image already
resized (docs/method.md 2.1) and the window cut but NOT padded; the graph normalises, pads with
zeros to the next patch multiple (docs/method.md 2.2: after normalisation, so the mean colour)
and crops the logits back to (B, Q, h, w). Padding stays inside the graph because the mean
colour is not a uint8 value: no uint8 padding gives the method's input.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..constants import CLIP_MEAN, CLIP_STD, LOGIT_SCALE
from ..model_folder import (
    CLASSES_FILE,
    IMAGE_GRAPH,
    LABELS,
    LAM,
    LOGITS,
    MERGES,
    PROBS,
    SCORING_GRAPH,
    TEXT,
    TEXT_GRAPH,
    WINDOWS,
)
from .graphs import OnnxExportError

logger = logging.getLogger(__name__)

SCORING_OPSET = 18  # ReduceMax takes its axes as an input from 18 on
NORMALISED = "normalised_windows"  # the original graph input, inside a uint8 graph
PADDED_LOGITS = "padded_logits"


def query_embeddings(folder: Path, queries: list[str]) -> np.ndarray:
    """(Q, D) embeddings from the default folder's text graph, by the Python runtime's own code path."""
    from ..runtime import OnnxSegmenter

    return OnnxSegmenter(folder, providers=["CPUExecutionProvider"], cache=False).encode_queries(queries)


def bake_image_graph(path: Path, text: np.ndarray, lam: float, *, uint8_input: bool, patch: int) -> None:
    """Rewrite the image graph at ``path`` with ``text`` and ``lam`` as constants (and, for uint8, the
    normalisation, padding and crop of docs/model-folder-fixed.md inside)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))  # with its external data
    graph = model.graph
    kept = [i for i in graph.input if i.name not in (TEXT, LAM)]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(text, np.float32), TEXT),
        numpy_helper.from_array(np.asarray(lam, np.float32), LAM),
    ])
    if uint8_input:
        _uint8_front(graph, patch, helper, numpy_helper, TensorProto)
    onnx.checker.check_model(model)
    data = path.parent / (path.name + ".data")
    mode = data.stat().st_mode & 0o777 if data.exists() else 0o644
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    data.chmod(mode)  # onnx creates it 0600: keep the exporter's permissions, so a shared folder stays readable


def _uint8_front(graph, patch: int, helper, numpy_helper, TensorProto) -> None:
    """uint8 (B, h, w, 3) -> normalised, padded (B, 3, H, W) in front of the graph; logits cropped to (B, Q, h, w)."""
    for node in graph.node:
        node.input[:] = [NORMALISED if name == WINDOWS else name for name in node.input]
        node.output[:] = [PADDED_LOGITS if name == LOGITS else name for name in node.output]
    (window_input,) = [i for i in graph.input if i.name == WINDOWS]
    window_input.CopyFrom(helper.make_tensor_value_info(WINDOWS, TensorProto.UINT8, ["batch", "height", "width", 3]))
    (out,) = [o for o in graph.output if o.name == LOGITS]
    queries = out.type.tensor_type.shape.dim[1]
    out.CopyFrom(helper.make_tensor_value_info(
        LOGITS, TensorProto.FLOAT, ["batch", queries.dim_value or queries.dim_param or "queries", "height", "width"]
    ))

    def const(name, value, dtype):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    c255 = const("u8_255", 255.0, np.float32)
    mean = const("u8_mean", CLIP_MEAN, np.float32)  # per channel, broadcast over the last (RGB) axis
    std = const("u8_std", CLIP_STD, np.float32)
    p = const("u8_patch", [patch, patch], np.int64)
    two = const("u8_two", [2, 2], np.int64)
    zeros = const("u8_zeros", [0, 0], np.int64)
    hw_lo, hw_hi, hw_axes = const("u8_2", [2], np.int64), const("u8_4", [4], np.int64), const("u8_0", [0], np.int64)
    axes = const("u8_axes", [2, 3], np.int64)
    pad_value = const("u8_pad_value", 0.0, np.float32)
    n = helper.make_node
    front = [
        # docs/method.md 2.1: x / 255, minus mean, over std, in float32, per element as simfeatup.imaging.normalise
        n("Cast", [WINDOWS], ["u8_float"], to=TensorProto.FLOAT),
        n("Div", ["u8_float", c255], ["u8_unit"]),
        n("Sub", ["u8_unit", mean], ["u8_centred"]),
        n("Div", ["u8_centred", std], ["u8_nhwc"]),
        n("Transpose", ["u8_nhwc"], ["u8_nchw"], perm=[0, 3, 1, 2]),
        # docs/method.md 2.2: total = -side mod patch, top/left total // 2, the rest after; zeros = mean colour
        n("Shape", ["u8_nchw"], ["u8_shape"]),
        n("Slice", ["u8_shape", hw_lo, hw_hi, hw_axes], ["u8_hw"]),
        n("Neg", ["u8_hw"], ["u8_neg_hw"]),
        n("Mod", ["u8_neg_hw", p], ["u8_total"], fmod=0),  # integer Mod, fmod 0: the divisor's sign, in [0, patch)
        n("Div", ["u8_total", two], ["u8_before"]),
        n("Sub", ["u8_total", "u8_before"], ["u8_after"]),
        n("Concat", [zeros, "u8_before", zeros, "u8_after"], ["u8_pads"], axis=0),
        n("Pad", ["u8_nchw", "u8_pads", pad_value], [NORMALISED], mode="constant"),
    ]
    back = [
        n("Add", ["u8_before", "u8_hw"], ["u8_end"]),
        n("Slice", [PADDED_LOGITS, "u8_before", "u8_end", axes], [LOGITS]),
    ]
    nodes = front + list(graph.node) + back
    del graph.node[:]
    graph.node.extend(nodes)


def scoring_graph(query_class: list[int], prob_thd: float, bg_idx: int):
    """The ONNX model (Q, H, W) averaged logits -> probs (K, H, W) float32, labels (H, W) uint8 (docs/method.md 2.7)."""
    from onnx import TensorProto, helper, numpy_helper

    K = max(query_class) + 1
    if K > 256:
        raise ValueError(f"{K} classes: a fixed-vocabulary folder's uint8 labels hold at most 256")
    inits = [
        numpy_helper.from_array(np.asarray(LOGIT_SCALE, np.float32), "scale"),
        numpy_helper.from_array(np.asarray([0], np.int64), "axis0"),
        numpy_helper.from_array(np.asarray(prob_thd, np.float32), "prob_thd"),
        numpy_helper.from_array(np.asarray(bg_idx, np.int64), "bg_idx"),
    ]
    n = helper.make_node
    nodes = [n("Mul", [LOGITS, "scale"], ["scaled"]), n("Softmax", ["scaled"], ["query_probs"], axis=0)]
    parts = []
    for k in range(K):  # each class: max over its synonym queries
        inits.append(numpy_helper.from_array(np.flatnonzero(np.asarray(query_class) == k).astype(np.int64), f"q{k}"))
        nodes += [
            n("Gather", ["query_probs", f"q{k}"], [f"g{k}"], axis=0),
            n("ReduceMax", [f"g{k}", "axis0"], [f"c{k}"], keepdims=1),
        ]
        parts.append(f"c{k}")
    nodes += [
        n("Concat", parts, [PROBS], axis=0),
        n("ReduceMax", [PROBS, "axis0"], ["best"], keepdims=0),
        n("ArgMax", [PROBS], ["argmax"], axis=0, keepdims=0, select_last_index=0),  # first maximum, as numpy
        n("Less", ["best", "prob_thd"], ["unsure"]),
        n("Where", ["unsure", "bg_idx", "argmax"], ["label64"]),
        n("Cast", ["label64"], [LABELS], to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        nodes, "simfeatup_scoring",
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [len(query_class), "height", "width"])],
        [helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, [K, "height", "width"]),
         helper.make_tensor_value_info(LABELS, TensorProto.UINT8, ["height", "width"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", SCORING_OPSET)])
    model.ir_version = 8  # readable by onnxruntime >= 1.10 (the npm and PyPI builds alike)
    return model


def classes_document(vocabulary, scoring, preset: str | None) -> dict:
    """``classes.json``: class names, class lines, query words, scoring values and overlay colours."""
    from ..visualize import palette

    lines = [",".join(c) for c in vocabulary.classes]
    return {
        "names": vocabulary.names,
        "classes": [list(c) for c in vocabulary.classes],
        "queries": vocabulary.queries,
        "query_class": vocabulary.query_class.tolist(),
        "colours": palette(lines).tolist(),
        "preset": preset,
        "lam": scoring.lam,
        "prob_thd": scoring.prob_thd,
        "bg_idx": scoring.bg_idx,
        "logit_scale": LOGIT_SCALE,
    }


def make_fixed(folder: Path, manifest: dict, segmenter, vocabulary, scoring, *, preset: str | None,
               uint8_input: bool) -> dict:
    """Turn the verified default folder ``folder`` into a fixed-vocabulary one; returns the new manifest
    (the caller writes it and verifies the folder with :func:`verify_fixed`)."""
    import onnx

    from ..model_folder import sha256
    from .graphs import write_metadata

    scoring.check(len(vocabulary))
    text = query_embeddings(folder, vocabulary.queries)
    patch = manifest["preprocessing"]["patch"]
    bake_image_graph(folder / IMAGE_GRAPH, text, scoring.lam, uint8_input=uint8_input, patch=patch)
    onnx.save(scoring_graph(vocabulary.query_class.tolist(), scoring.prob_thd, scoring.bg_idx),
              str(folder / SCORING_GRAPH))
    doc = classes_document(vocabulary, scoring, preset)
    (folder / CLASSES_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    np.save(folder / "queries.npy", text)  # provenance only: the embeddings baked into image.onnx
    for name in (TEXT_GRAPH, TEXT_GRAPH + ".data", MERGES):
        (folder / name).unlink(missing_ok=True)
    manifest = {k: v for k, v in manifest.items() if k not in ("tokenizer", "verification", "manifest_sha256")}
    image_in = (
        "(B, h, w, 3) uint8 RGB, the resized image's window, NOT padded (h, w <= window)" if uint8_input
        else "(B, 3, H, W) float32, CLIP-normalised, H and W multiples of patch"
    )
    manifest["graphs"] = {
        "image": {
            "file": IMAGE_GRAPH,
            "inputs": {WINDOWS: image_in},
            "outputs": {LOGITS: ("(B, Q, h, w)" if uint8_input else "(B, Q, H, W)")
                        + " float32 cosine logits incl. lam * [CLS] similarity, queries baked in"},
        },
        "scoring": {
            "file": SCORING_GRAPH,
            "inputs": {LOGITS: "(Q, H, W) float32 averaged window logits resized to the original image"},
            "outputs": {PROBS: "(K, H, W) float32 class probabilities", LABELS: "(H, W) uint8 labels"},
        },
    }
    manifest["image_input"] = "uint8" if uint8_input else "float32"
    manifest["vocabulary"] = {"file": CLASSES_FILE, **{k: doc[k] for k in (
        "names", "classes", "query_class", "preset", "lam", "prob_thd", "bg_idx")}}
    write_metadata(folder, manifest)  # the baked classes too; before the checksums: the graphs change
    manifest["files"] = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    return manifest


def verify_fixed(folder: Path, segmenter, vocabulary, scoring, *, samples=None, seed: int = 0) -> dict:
    """The fixed folder against float32 torch (image graph, 1e-4 as the default export) and numpy (scoring graph)."""
    import onnxruntime as ort
    import torch

    from .. import imaging, scores
    from ..runtime import session_options
    from ..windows import crop_and_pad, padding, window_boxes
    from .verify import FP32_TOLERANCE, default_samples

    manifest = json.loads((folder / "manifest.json").read_text())
    uint8 = manifest["image_input"] == "uint8"
    tolerance = FP32_TOLERANCE if manifest["dtype"] == "fp32" else 1e-2
    text = torch.from_numpy(np.load(folder / "queries.npy"))
    image = ort.InferenceSession(str(folder / IMAGE_GRAPH), session_options(), providers=["CPUExecutionProvider"])
    scoring_session = ort.InferenceSession(str(folder / SCORING_GRAPH), session_options(),
                                           providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    patch, window = segmenter.patch_size, segmenter.window
    pictures = [rng.integers(0, 256, (s, t, 3), dtype=np.uint8) for s, t in ((window, window), (37, 90))]
    paths = [Path(p) for p in samples] if samples is not None else default_samples()
    pictures += [imaging.resize_long_side(imaging.load_image(p), segmenter.long_side) for p in paths]
    worst, worst_probs, flips = 0.0, 0.0, 0
    for picture in pictures:
        x = imaging.normalise(picture)
        y0, y1, x0, x1 = window_boxes(*x.shape[1:], window, segmenter.stride)[-1]
        pads = padding(y1 - y0, patch), padding(x1 - x0, patch)
        padded = crop_and_pad(x, (y0, y1, x0, x1), pads)[None]
        with torch.no_grad():
            ref = segmenter.window_logits(torch.from_numpy(padded), text, scoring.lam).numpy()
        (top, _), (left, _) = pads
        ref = ref[:, :, top : top + y1 - y0, left : left + x1 - x0]
        feed = picture[None, y0:y1, x0:x1] if uint8 else padded
        got = image.run(None, {WINDOWS: np.ascontiguousarray(feed)})[0]
        if not uint8:
            got = got[:, :, top : top + y1 - y0, left : left + x1 - x0]
        if got.shape != ref.shape:
            raise OnnxExportError(
                f"fixed image graph gave {got.shape} for a {y1 - y0}x{x1 - x0} window, torch {ref.shape}"
            )
        diff = float(np.abs(got - ref).max())
        worst = max(worst, diff)
        if diff > tolerance:
            raise OnnxExportError(f"fixed image graph disagrees with torch: max |logit diff| {diff:.2e} "
                                  f"(limit {tolerance:g})")
        # the scoring graph on these logits against simfeatup.scores (docs/method.md 2.7)
        probs, labels = scoring_session.run(None, {LOGITS: ref[0]})
        want = scores.class_probabilities(ref[0], vocabulary.query_class, len(vocabulary))
        want_labels = scores.labels_from_probabilities(want, prob_thd=scoring.prob_thd, bg_idx=scoring.bg_idx)
        worst_probs = max(worst_probs, float(np.abs(probs - want).max()))
        differ = labels != want_labels
        top2 = np.sort(want, axis=0)[-2:] if len(want) > 1 else np.concatenate([want, want])
        near = (top2[1] - top2[0] < 1e-5) | (np.abs(want.max(0) - scoring.prob_thd) < 1e-5)
        if (differ & ~near).any() or worst_probs > 1e-5:
            raise OnnxExportError(f"scoring graph disagrees with numpy: max |prob diff| {worst_probs:.2e}, "
                                  f"{int((differ & ~near).sum())} label(s) differ away from a tie")
        flips += int(differ.sum())
    logger.info("fixed folder: max |logit diff| %.2e vs torch, max |prob diff| %.2e, %d tie flip(s)",
                worst, worst_probs, flips)
    return {"max_abs_logit_diff": worst, "max_abs_prob_diff": worst_probs, "scoring_tie_flips": flips,
            "windows": len(pictures)}


def derive_fixed(default_dir, out_dir, segmenter, vocabulary, scoring=None, *, preset: str | None = None,
                 uint8_input: bool = False, samples=None, overwrite: bool = False) -> Path:
    """A fixed-vocabulary folder ``out_dir`` from the verified default folder ``default_dir``, without tracing again.

    ``segmenter``: the float32 torch segmenter the default folder was exported from (the reference
    :func:`verify_fixed` checks against). Written atomically, like :func:`simfeatup.export.export_onnx`.
    """
    import shutil

    from ..atomic import atomic_dir
    from ..model_folder import is_fixed, read_manifest, write_manifest
    from ..scores import Scoring

    manifest = read_manifest(default_dir)
    if is_fixed(manifest):
        raise ValueError(f"{default_dir} already has a fixed vocabulary: derive from a default folder")
    scoring = scoring or Scoring()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name in manifest["files"]:
            shutil.copyfile(Path(default_dir) / name, tmp / name)
        write_manifest(tmp, manifest)
        report = manifest.get("verification", {})
        manifest = make_fixed(tmp, manifest, segmenter, vocabulary, scoring, preset=preset, uint8_input=uint8_input)
        write_manifest(tmp, manifest)
        manifest["verification"] = {**report, "fixed": verify_fixed(tmp, segmenter, vocabulary, scoring,
                                                                     samples=samples)}
        write_manifest(tmp, manifest)
    return Path(out_dir)
