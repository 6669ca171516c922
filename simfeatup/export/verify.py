"""Proof that an exported model folder computes what the float32 torch segmenter computes."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .. import imaging
from ..constants import DEFAULT_LAMBDA, STRIDE
from ..model_folder import (
    IMAGE_GRAPH,
    LAM,
    MANIFEST,
    MERGES,
    TEXT,
    TEXT_GRAPH,
    TOKENS,
    WINDOWS,
    check_graph_metadata,
    static_shapes,
)
from ..windows import crop_and_pad, padding, window_boxes
from .graphs import OnnxExportError, check_dims

logger = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # max abs logit difference ORT vs torch, fp32
# fp16 graphs vs fp32 torch: observed max |logit diff| ~1e-4 (random ViT-B/16 + SimFeatUp) and
# ~2e-4 (tiny test model); cosine logits of real CLIP reach ~0.35, so 1e-2 leaves ample headroom.
FP16_TOLERANCE = 1e-2
FP16_MIN_AGREEMENT = 0.99  # share of window pixels whose argmax survives fp16 (random ViT-B/16: 99.90%)
# int8 (quantised ViT linear layers): judged by labels on the bundled samples' windows alone (docs/method.md
# section 8); its logit error is logged, not bounded. Random windows are noise the ViT never sees.
INT8_MIN_AGREEMENT = 0.99
# Reduced-precision folders, {dtype: (bound on max |logit diff| or None, min label agreement, judged on)}:
# "all" cases (the worst one), or the "samples" windows (all their pixels together).
REDUCED = {"fp16": (FP16_TOLERANCE, FP16_MIN_AGREEMENT, "all"), "int8": (None, INT8_MIN_AGREEMENT, "samples")}


def verify_onnx(model_dir, segmenter, *, samples=None, sizes=None, seed: int = 0) -> dict:
    """Check a model folder against the float32 torch ``segmenter`` it was exported from.

    onnx.checker on both graphs, the dynamic input dims (a static folder: no dynamic dim at
    all), the graphs' metadata against the manifest, then onnxruntime vs torch on random
    windows at several sizes (batch 2; a static folder: its one shape), on windows cut from
    real sample images, and on the text graph. fp32: max abs logit difference <= 1e-4 and the
    same label (argmax over queries) at every pixel; fp16 and int8 (:data:`REDUCED`): the error
    is logged and the label agreement must reach a bound. Returns the observed figures; raises
    OnnxExportError otherwise.
    """
    import onnx
    import onnxruntime as ort

    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    dtype = manifest["dtype"]
    reduced = REDUCED.get(dtype)
    static = static_shapes(manifest)
    for graph, name, dims in (("image", IMAGE_GRAPH, {WINDOWS: 4, TEXT: 2}), ("text", TEXT_GRAPH, {TOKENS: 2})):
        path = model_dir / name
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as err:
            raise OnnxExportError(f"{name} fails onnx.checker: {err}") from None
        model = onnx.load(str(path), load_external_data=False)
        check_dims(model, name, dims, static=static is not None)
        check_graph_metadata(path, manifest, graph, {p.key: p.value for p in model.metadata_props})

    from ..runtime import session_options

    sessions = {
        n: ort.InferenceSession(str(model_dir / n), session_options(), providers=["CPUExecutionProvider"])
        for n in (IMAGE_GRAPH, TEXT_GRAPH)
    }
    reference = segmenter  # fp16 graphs are judged against fp32 torch too: that is the error users see
    patch = segmenter.patch_size
    window = segmenter.window
    rng = np.random.default_rng(seed)
    D = segmenter.encoder.embed_dim
    text = rng.standard_normal((static["queries"] if static else 5, D)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    lam = np.float32(DEFAULT_LAMBDA)
    cases = []
    if static:  # one shape; sample windows padded to it as the runtime pads them (docs/model-folder.md)
        sizes = [(window, window)]
    for H, W in sizes or [
        (window, window),
        (window, 6 * patch),
        (3 * patch, window),
        (patch, window),
        (5 * patch, 7 * patch),
    ]:
        cases.append((f"random {H}x{W}", rng.standard_normal((2, 3, H, W)).astype(np.float32)))
    n_random = len(cases)
    cases += _sample_windows(samples, window, window if static else patch)
    if static:  # every batch exactly window_batch windows: repeat (or cut) the case's windows
        cases = [(label, np.resize(w, (static["window_batch"], *w.shape[1:]))) for label, w in cases]
    worst, flips, agreement, sample_same, sample_pixels = 0.0, 0, 1.0, 0, 0
    per_case = {}
    for i, (label, windows) in enumerate(cases):
        with torch.no_grad():
            ref = reference.window_logits(torch.from_numpy(windows), torch.from_numpy(text), float(lam)).numpy()
        got = sessions[IMAGE_GRAPH].run(None, {WINDOWS: windows, TEXT: text, LAM: np.asarray(lam)})[0]
        if got.shape != ref.shape:
            raise OnnxExportError(f"image graph gave {got.shape} for {label}, torch {ref.shape}")
        diff = float(np.abs(got - ref).max())
        same = got.argmax(1) == ref.argmax(1)
        worst = max(worst, diff)
        agreement = min(agreement, float(same.mean()))
        per_case[label] = float(same.mean())
        if i >= n_random:
            sample_same, sample_pixels = sample_same + int(same.sum()), sample_pixels + same.size
        logger.info("parity %-28s max |logit diff| %.2e, labels %.4f%% equal", label, diff, 100 * same.mean())
        if reduced is None:
            # A flip is only acceptable where torch itself has a tie below the tolerance.
            top2 = np.sort(ref, axis=1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
            bad = ~same & (margin > 2 * FP32_TOLERANCE)
            flips += int((~same).sum())
            if diff > FP32_TOLERANCE or bad.any():
                raise OnnxExportError(
                    f"image graph disagrees with torch on {label}: max |logit diff| {diff:.2e} "
                    f"(limit {FP32_TOLERANCE:g}), {int(bad.sum())} pixel(s) with a different label"
                )
    sample_agreement = sample_same / sample_pixels if sample_pixels else None
    if reduced is not None:
        tolerance, min_agreement, judged_on = reduced
        judged = agreement if judged_on == "all" else sample_agreement
        if judged is None:
            raise OnnxExportError(f"a {dtype} folder is verified on the sample images' windows: none were given")
        logger.info(
            "%s image graph: max |logit diff| %.3g vs fp32 torch (bound %s), labels %.2f%% equal on %s windows",
            dtype, worst, tolerance, 100 * judged, judged_on,
        )
        if (tolerance is not None and worst > tolerance) or judged < min_agreement:
            raise OnnxExportError(
                f"{dtype} image graph too far from torch: max |logit diff| {worst:.3g} (bound {tolerance}), "
                f"{100 * judged:.2f}% labels equal on {judged_on} windows (bound {100 * min_agreement:.0f}%)"
            )
    _verify_tokenizer(model_dir, reference.encoder)
    text_diff = _verify_text(sessions[TEXT_GRAPH], reference.encoder, static["text_batch"] if static else None)
    bound = FP16_TOLERANCE if dtype == "fp16" else FP32_TOLERANCE  # the int8 folder's text graph is float32
    if text_diff > bound:
        raise OnnxExportError(
            f"text graph disagrees with torch: max |embedding diff| {text_diff:.2e} (limit {bound:g})"
        )
    return {
        "max_abs_logit_diff": worst,
        "min_label_agreement": agreement,
        "sample_label_agreement": sample_agreement,
        "tie_flips": flips,
        "max_abs_text_diff": text_diff,
        "cases": [label for label, _ in cases],
        "label_agreement": per_case,  # share of window pixels with torch's label (argmax over queries), per case
    }


def _verify_tokenizer(model_dir: Path, encoder) -> None:
    from ..tokenizer import Tokenizer

    texts = ["a photo of a building.", "forêt, rivière", "道路", "🏠", "x " * 100]
    mine = Tokenizer(model_dir / MERGES, context_length=encoder.context_length)(texts)
    if not np.array_equal(mine, encoder.tokenize(texts).numpy()):
        raise OnnxExportError("simfeatup.tokenizer disagrees with the model's open_clip tokenizer")


def _verify_text(session, encoder, rows: int | None = None) -> float:
    words = ["building", "road", "bâtiment", "道路"]
    if rows:  # a static text graph takes exactly this many
        words = [words[i % len(words)] for i in range(rows)]
    tokens = encoder.tokenize([f"a photo of a {w}." for w in words])
    with torch.no_grad():
        ref = encoder.encode_text(tokens).float().numpy()
    got = session.run(None, {TOKENS: tokens.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    logger.info("parity text graph: max |embedding diff| %.2e", diff)
    return diff


def default_samples() -> list[Path]:
    """The repository's bundled sample images, if this is a source checkout."""
    folder = Path(__file__).resolve().parents[2] / "samples"
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _sample_windows(samples, window: int, patch: int) -> list[tuple[str, np.ndarray]]:
    """Two windows per sample image, cut and padded exactly as the segmenters do (to multiples of ``patch``)."""
    paths = [Path(p) for p in samples] if samples is not None else default_samples()
    if not paths:
        logger.warning("no sample images: the parity check uses random windows only")
    cases = []
    for path in paths:
        x = imaging.preprocess(imaging.load_image(path))
        boxes = window_boxes(*x.shape[1:], window, STRIDE)
        picked = [boxes[0], boxes[-1]]
        shapes = {(b[1] - b[0], b[3] - b[2]) for b in picked}
        if len(shapes) != 1:  # windows of different sizes cannot share a batch
            picked = picked[:1]
        batch = []
        for y0, y1, x0, x1 in picked:
            pads = padding(y1 - y0, patch), padding(x1 - x0, patch)
            batch.append(crop_and_pad(x, (y0, y1, x0, x1), pads))
        cases.append((f"sample {path.name}", np.stack(batch)))
    return cases
