"""The OpenVINO checks of tests/test_openvino_runtime.py, each run in a process of its own.

OpenVINO's CPU plugin and onnxruntime (with torch) loaded into the one long pytest process
crashed it with a segmentation fault several test files later (2026-12-02, OpenVINO 2026.4,
onnxruntime 1.32; each file alone passed). So pytest never imports openvino: every check here
runs as ``python tests/openvino_checks.py CHECK MODEL_DIR TMP_DIR``, exits non-zero with the
failed assertion on any failure.
"""
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's simfeatup, whatever is installed

from simfeatup import imaging  # noqa: E402
from simfeatup.export.verify import _sample_windows  # noqa: E402
from simfeatup.openvino_runtime import OpenVinoSegmenter  # noqa: E402
from simfeatup.runtime import OnnxSegmenter  # noqa: E402
from simfeatup.vocabulary import Vocabulary  # noqa: E402

VOCABULARY = Vocabulary.from_lines(["road", "building", "tree,forest", "water", "grass"])


def _windows():
    rng = np.random.default_rng(0)
    random = [rng.standard_normal((2, 3, h, w)).astype(np.float32) for h, w in ((224, 224), (224, 96), (48, 160))]
    return random + [w for _, w in _sample_windows(None, 224, 16)]


def f32_window_logits_match_onnxruntime(onnx_dir: Path, tmp: Path) -> None:
    ort_seg, ov = OnnxSegmenter(onnx_dir, cache=False), OpenVinoSegmenter(onnx_dir, cache=False)
    text = ort_seg.encode_queries(VOCABULARY.queries)
    np.testing.assert_allclose(ov.encode_queries(VOCABULARY.queries), text, atol=1e-5)
    for windows in _windows():  # the full 224x224 windows are the ones a multi-threaded image graph got wrong
        np.testing.assert_allclose(ov.window_logits(windows, text, -0.3), ort_seg.window_logits(windows, text, -0.3),
                                   atol=1e-4, rtol=0)
    assert ov.describe()["runtime"] == "openvino" and ov.describe()["precision"] == "f32"


def bf16_keeps_the_text_exact_and_most_labels(onnx_dir: Path, tmp: Path) -> None:
    import openvino

    from simfeatup.openvino_runtime import bf16_problem

    ort_seg = OnnxSegmenter(onnx_dir, cache=False)
    if bf16_problem(openvino.Core()):  # e.g. an AVX2 CPU
        try:
            OpenVinoSegmenter(onnx_dir, precision="bf16", cache=False)
        except ValueError as err:
            assert "has no bf16 support in OpenVINO" in str(err) and "--precision f32" in str(err), err
            return
        raise AssertionError("bf16 was accepted on a CPU without bf16 support")
    bf16 = OpenVinoSegmenter(onnx_dir, precision="bf16", cache=False)
    text = ort_seg.encode_queries(VOCABULARY.queries)
    np.testing.assert_allclose(bf16.encode_queries(VOCABULARY.queries), text, atol=1e-5)  # the text graph is f32
    image = imaging.load_image(REPO / "samples" / "spacenet6_rotterdam.jpg")
    ref, got = (s.segment([image], VOCABULARY, text=text)[0].labels for s in (ort_seg, bf16))
    assert not np.array_equal(ref, got)  # bf16 did run
    # a random 2-block model's 32-d features are full of near-ties; ViT-B/16's figure: bench/e2e.py
    assert (ref == got).mean() > 0.8


def cli_runs_openvino_and_refuses_misplaced_flags(onnx_dir: Path, tmp: Path) -> None:
    from simfeatup.cli import main

    image = REPO / "samples" / "neon_yellowstone.jpg"
    common = ["segment", str(image), "--classes", "road;tree", "--out"]
    assert main([*common, str(tmp / "ov"), "--onnx", str(onnx_dir), "--runtime", "openvino"]) == 0
    assert main([*common, str(tmp / "ort"), "--onnx", str(onnx_dir)]) == 0
    ov_labels, ort_labels = (imaging.load_image(tmp / d / "neon_yellowstone.png") for d in ("ov", "ort"))
    assert (ov_labels == ort_labels).mean() > 0.999
    assert main([*common, str(tmp / "x"), "--runtime", "openvino"]) != 0  # no --onnx
    assert main([*common, str(tmp / "x"), "--onnx", str(onnx_dir), "--precision", "bf16"]) != 0
    assert main([*common, str(tmp / "x"), "--onnx", str(onnx_dir), "--runtime", "openvino",
                 "--device", "cuda"]) != 0
    assert not (tmp / "x").exists()


CHECKS = {f.__name__: f for f in (
    f32_window_logits_match_onnxruntime, bf16_keeps_the_text_exact_and_most_labels,
    cli_runs_openvino_and_refuses_misplaced_flags,
)}

if __name__ == "__main__":
    check, onnx_dir, tmp = sys.argv[1:]
    CHECKS[check](Path(onnx_dir), Path(tmp))
