"""Static-shape model folders (docs/model-folder.md "Static shapes"): export, runtime, a second runtime."""
import json
import logging

import numpy as np
import onnx
import pytest

from conftest import TINY_CLIP, load_script
from simfeatup.export.verify import FP32_TOLERANCE
from simfeatup.imaging import load_image
from simfeatup.runtime import OnnxSegmenter
from simfeatup.vocabulary import Vocabulary

SAMPLES = ["samples/neon_yellowstone.jpg", "samples/spacenet6_rotterdam.jpg"]
# 6 queries: more than the folder's 4, so the runtime runs them in two padded groups
VOCAB = Vocabulary.from_spec("building,roof;road;tree;water;car,vehicle")
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def static_dir(artefacts, tiny_weights, tmp_path_factory):
    """The session's model exported again with static shapes, through the script as users run it."""
    path, _ = artefacts
    name, weights = tiny_weights
    out = tmp_path_factory.mktemp("static") / "onnx"
    assert load_script("export/to_onnx.py").main(
        ["--upsampler", str(path), "--model", name, "--pretrained", str(weights), "--out", str(out),
         "--static-window", "224", "--batch", "2", "--queries", "4"]
    ) == 0
    return out


def test_script_refuses_static_sizes_without_a_static_export(tmp_path, capsys):
    main = load_script("export/to_onnx.py").main
    with pytest.raises(SystemExit) as exit_:
        main(["--upsampler", "bilinear", "--out", str(tmp_path / "o"), "--batch", "2"])
    assert exit_.value.code == 2 and "give --static-window 224 too" in capsys.readouterr().err


def test_script_refuses_a_static_window_that_is_not_the_models(tiny_weights, tmp_path, capsys):
    name, weights = tiny_weights
    code = load_script("export/to_onnx.py").main(
        ["--upsampler", "bilinear", "--model", name, "--pretrained", str(weights), "--out", str(tmp_path / "o"),
         "--static-window", "256"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "use --static-window 224" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a whole static export (~60-130 s on 2 busy cores)
def test_static_export_has_no_symbolic_dim_and_is_verified(static_dir):
    manifest = json.loads((static_dir / "manifest.json").read_text())
    assert manifest["static"] == {"window_batch": 2, "queries": 4, "text_batch": 16}
    assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4
    shapes = {}
    for name in ("image.onnx", "text.onnx"):
        model = onnx.load(str(static_dir / name), load_external_data=False)
        for value in (*model.graph.input, *model.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") and not d.dim_param for d in dims), (name, value.name)
            shapes[value.name] = [d.dim_value for d in dims]
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["simfeatup.static"]) == manifest["static"]
    assert shapes == {"windows": [2, 3, 224, 224], "text": [4, 32], "lam": [], "logits": [2, 4, 224, 224],
                      "tokens": [16, 77], "embeddings": [16, 32]}


@pytest.mark.slow  # the static export of the test above
def test_static_folder_segments_like_the_dynamic_one(static_dir, onnx_dir):
    dynamic, static = OnnxSegmenter(onnx_dir, cache=False), OnnxSegmenter(static_dir, cache=False)
    assert static.window_batch == 2 and static.geometry["patch"] == 224
    np.testing.assert_allclose(static.encode_queries(VOCAB.queries), dynamic.encode_queries(VOCAB.queries),
                               atol=1e-6)
    text = dynamic.encode_queries(VOCAB.queries)
    images = [load_image(p) for p in SAMPLES]  # both no wider than 2:1: only full windows
    for a, b in zip(static.averaged_logits(images, text), dynamic.averaged_logits(images, text)):
        assert np.abs(a - b).max() <= FP32_TOLERANCE  # both are within it of torch; measured 1.3e-5
    # an image wider than 2:1 (working size 143 x 448): its windows are padded to 224 rows, not 144
    wide = images[0][:400]
    got, = static.segment([wide], VOCAB, text=text)
    want, = dynamic.segment([wide], VOCAB, text=text)
    agreement = float((got.labels == want.labels).mean())
    logger.info("static vs dynamic labels on a 1249x400 image: %.2f%% equal", 100 * agreement)
    assert got.labels.shape == wide.shape[:2] and agreement > 0.5  # a random tiny model; see the doc for figures


@pytest.mark.slow  # the static export of the tests above
def test_openvino_runs_the_static_graphs_as_onnxruntime_does(static_dir):
    ov = pytest.importorskip("openvino", reason="openvino not installed (pip install openvino)")
    from simfeatup import imaging
    from simfeatup.windows import window_boxes

    segmenter = OnnxSegmenter(static_dir, cache=False)
    core = ov.Core()
    # OpenVINO's CPU plugin computes in bf16 where the CPU has it unless told f32 (docs/model-folder.md)
    image = core.compile_model(core.read_model(str(static_dir / "image.onnx")), "CPU",
                               {"INFERENCE_PRECISION_HINT": "f32"})
    text_graph = core.compile_model(core.read_model(str(static_dir / "text.onnx")), "CPU",
                                    {"INFERENCE_PRECISION_HINT": "f32"})
    tokens = segmenter.tokenizer([f"a photo of a {w}." for w in VOCAB.queries] * 3)[:16]
    ref = segmenter.text_session.run(None, {"tokens": tokens})[0]
    assert np.abs(text_graph({"tokens": tokens})[0] - ref).max() <= 1e-4
    text = segmenter.encode_queries(VOCAB.queries)[:4]
    lam = np.asarray(-0.3, np.float32)
    for path in SAMPLES:
        x = imaging.preprocess(load_image(path))
        boxes = window_boxes(*x.shape[1:])
        windows = np.stack([x[:, y0:y1, x0:x1] for y0, y1, x0, x1 in (boxes[0], boxes[-1])])
        got = image({"windows": windows, "text": text, "lam": lam})[0]
        want = segmenter.image_session.run(None, {"windows": windows, "text": text, "lam": lam})[0]
        assert np.abs(got - want).max() <= 1e-4, path


def test_fp16_graphs_normalise_in_float32():
    """docs/model-folder.md "fp16": every LayerNorm of a half model becomes float32 in, float32 weights."""
    import torch

    from simfeatup.encoder import DenseCLIP
    from simfeatup.export.graph_form import layer_norms_in_fp32

    torch.manual_seed(0)
    reference = DenseCLIP.from_config(TINY_CLIP).eval()
    half = DenseCLIP.from_config(TINY_CLIP).eval()
    half.load_state_dict(reference.state_dict())
    half.half()
    n = sum(isinstance(m, torch.nn.LayerNorm) for m in half.modules())
    assert layer_norms_in_fp32(half) == n == 9  # ln_pre, ln_post, 2 per block (2 vision, 1 text), ln_final
    norms = [m for m in half.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    x = torch.randn(2, 5, norms[0].normalized_shape[0], dtype=torch.float16)
    assert norms[0](x).dtype == torch.float16  # cast back: the rest of the graph stays fp16
    tokens = reference.tokenize(["a photo of a road."])
    with torch.no_grad():
        got, want = half.encode_text(tokens).float(), reference.encode_text(tokens).float()
    assert (got - want).abs().max() < 1e-2
