"""The int8 export variant (simfeatup.export.quantize): which nodes are quantised, and what it costs in labels."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import load_script
from simfeatup.export import OnnxExportError, verify
from simfeatup.export.quantize import encoder_linear_nodes, quantize_image_graph
from simfeatup.runtime import OnnxSegmenter, session_options

QUANTISED = {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}


def _scopes(model):
    return {n.name: next((p.value for p in n.metadata_props if p.key == "namespace"), "") for n in model.graph.node}


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_only_the_image_towers_linear_layers_are_quantised(onnx_dir, tmp_path):
    for name in ("image.onnx", "image.onnx.data"):
        shutil.copy(onnx_dir / name, tmp_path / name)
    before = onnx.load(str(tmp_path / "image.onnx"), load_external_data=False)
    nodes = encoder_linear_nodes(before)
    scopes = _scopes(before)
    # the tiny ViT's 2 blocks: qkv, out_proj (+ MLP fc and proj in the first; the last block has no MLP), proj
    assert len(nodes) == 7 and all("/segmenter.encoder" in scopes[n] for n in nodes)
    upsampler_matmuls = [n.name for n in before.graph.node if n.op_type == "MatMul" and "upsampler" in scopes[n.name]]
    assert upsampler_matmuls and not set(upsampler_matmuls) & set(nodes)

    record = quantize_image_graph(tmp_path / "image.onnx")
    assert record["nodes"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.onnx", "image.onnx.data"]  # the folder's names
    after = onnx.load(str(tmp_path / "image.onnx"))
    ops = {n.op_type for n in after.graph.node}
    assert ops & QUANTISED
    kept = {n.name for n in after.graph.node if n.op_type == "MatMul"}
    assert set(upsampler_matmuls) <= kept  # the upsampler's products stay float32
    # 7-bit weights: uint8 activations times |w| <= 64, pairs summed in int16 (CPUs without VNNI), never overflow
    weights = [onnx.numpy_helper.to_array(t) for t in after.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and 0 < max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64

    sessions = [ort.InferenceSession(str(d / "image.onnx"), session_options(), providers=["CPUExecutionProvider"])
                for d in (onnx_dir, tmp_path)]
    text = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    same = []
    for _, windows in verify._sample_windows(None, 224, 16):
        feeds = {"windows": windows, "text": text, "lam": np.asarray(-0.3, np.float32)}
        ref, got = (s.run(None, feeds)[0] for s in sessions)
        assert not np.array_equal(ref, got)  # it did change the arithmetic
        same.append(ref.argmax(1) == got.argmax(1))
    # a random 2-block model's 32-d features are full of near-ties (97-98% here); ViT-B/16: bench/e2e.py
    agreement = np.concatenate([s.ravel() for s in same]).mean()
    assert agreement > 0.95, f"int8 labels agree with float32 at {agreement:.2%} of pixels"


@pytest.mark.slow  # two whole exports
def test_int8_export_is_verified_by_label_agreement(artefacts, tiny_weights, tmp_path, monkeypatch):
    up, _ = artefacts
    name, weights = tiny_weights
    args = ["--upsampler", str(up), "--model", name, "--pretrained", str(weights), "--dtype", "int8"]
    export = load_script("export/to_onnx.py")
    # the tiny random model keeps 97-98% of the sample labels: a bound above that must refuse the folder
    monkeypatch.setattr(verify, "REDUCED", {**verify.REDUCED, "int8": (None, 0.999, "samples")})
    with pytest.raises(OnnxExportError, match="int8 image graph too far from torch"):
        from simfeatup.export import export_onnx

        export_onnx(tmp_path / "refused", upsampler=up, model=name, pretrained=str(weights), dtype="int8")
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(verify, "REDUCED", {**verify.REDUCED, "int8": (None, 0.95, "samples")})
    assert export.main([*args, "--out", str(tmp_path / "int8")]) == 0
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["dtype"] == "int8" and manifest["quantization"]["nodes"] == 7
    assert manifest["quantization"]["reduce_range"] is True  # read back: no 8-bit warning
    assert 0.95 <= manifest["verification"]["sample_label_agreement"] < 1
    segmenter = OnnxSegmenter(tmp_path / "int8", cache=False)
    assert segmenter.describe()["dtype"] == "int8"
