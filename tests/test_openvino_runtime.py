"""OpenVINO over an exported model folder: the same logits as onnxruntime in f32, the labels in bf16, no torch."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from simfeatup import imaging
from simfeatup.export.verify import _sample_windows
from simfeatup.openvino_runtime import OpenVinoSegmenter
from simfeatup.runtime import OnnxSegmenter
from simfeatup.vocabulary import Vocabulary

VOCABULARY = Vocabulary.from_lines(["road", "building", "tree,forest", "water", "grass"])


@pytest.fixture(scope="module")
def segmenters(onnx_dir):
    return {
        "onnxruntime": OnnxSegmenter(onnx_dir, cache=False),
        "f32": OpenVinoSegmenter(onnx_dir, cache=False),
        "bf16": OpenVinoSegmenter(onnx_dir, precision="bf16", cache=False),
    }


def _windows():
    rng = np.random.default_rng(0)
    random = [rng.standard_normal((2, 3, h, w)).astype(np.float32) for h, w in ((224, 224), (224, 96), (48, 160))]
    return random + [w for _, w in _sample_windows(None, 224, 16)]


def test_f32_window_logits_match_onnxruntime(segmenters):
    ort_seg, ov = segmenters["onnxruntime"], segmenters["f32"]
    text = ort_seg.encode_queries(VOCABULARY.queries)
    np.testing.assert_allclose(ov.encode_queries(VOCABULARY.queries), text, atol=1e-5)
    for windows in _windows():  # the full 224x224 windows are the ones a multi-threaded image graph got wrong
        np.testing.assert_allclose(ov.window_logits(windows, text, -0.3), ort_seg.window_logits(windows, text, -0.3),
                                   atol=1e-4, rtol=0)
    assert ov.describe()["runtime"] == "openvino" and ov.describe()["precision"] == "f32"


def test_bf16_keeps_the_text_exact_and_most_labels(segmenters):
    ort_seg, bf16 = segmenters["onnxruntime"], segmenters["bf16"]
    text = ort_seg.encode_queries(VOCABULARY.queries)
    np.testing.assert_allclose(bf16.encode_queries(VOCABULARY.queries), text, atol=1e-5)  # the text graph is f32
    image = imaging.load_image(REPO / "samples" / "spacenet6_rotterdam.jpg")
    ref, got = (s.segment([image], VOCABULARY, text=text)[0].labels for s in (ort_seg, bf16))
    assert not np.array_equal(ref, got)  # bf16 did run
    # a random 2-block model's 32-d features are full of near-ties; ViT-B/16's figure: bench/e2e.py
    assert (ref == got).mean() > 0.8


def test_cli_runs_openvino_and_refuses_misplaced_flags(onnx_dir, tmp_path):
    from simfeatup.cli import main

    image = REPO / "samples" / "neon_yellowstone.jpg"
    common = ["segment", str(image), "--classes", "road;tree", "--out"]
    assert main([*common, str(tmp_path / "ov"), "--onnx", str(onnx_dir), "--runtime", "openvino"]) == 0
    assert main([*common, str(tmp_path / "ort"), "--onnx", str(onnx_dir)]) == 0
    ov_labels, ort_labels = (imaging.load_image(tmp_path / d / "neon_yellowstone.png") for d in ("ov", "ort"))
    assert (ov_labels == ort_labels).mean() > 0.999
    assert main([*common, str(tmp_path / "x"), "--runtime", "openvino"]) != 0  # no --onnx
    assert main([*common, str(tmp_path / "x"), "--onnx", str(onnx_dir), "--precision", "bf16"]) != 0
    assert main([*common, str(tmp_path / "x"), "--onnx", str(onnx_dir), "--runtime", "openvino",
                 "--device", "cuda"]) != 0
    assert not (tmp_path / "x").exists()


def test_the_openvino_runtime_never_imports_torch(onnx_dir):
    code = (
        "import sys; from simfeatup.openvino_runtime import OpenVinoSegmenter; "
        f"s = OpenVinoSegmenter({str(onnx_dir)!r}, cache=False); s.encode_texts(['a road']); "
        "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, sorted(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
