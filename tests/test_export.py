"""ONNX export: export-form pieces vs torch, whole exports verified by onnxruntime, failure paths."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from conftest import load_script
from simfeatup.backbone import Backbone, file_sha256
from simfeatup.encoder import DenseCLIP
from simfeatup.export import OnnxExportError, export_onnx, verify_onnx, writer
from simfeatup.export.graph_form import GraphUpsampler
from simfeatup.export.verify import FP16_TOLERANCE, FP32_TOLERANCE
from simfeatup.interp import bicubic_matrix, bicubic_resize
from simfeatup.model_folder import MERGES, sha256
from simfeatup.runtime import session_options
from simfeatup.segmenter import Segmenter
from simfeatup.upsampler import SimFeatUp


def _perturbed(module, scale=0.3):
    """Move every parameter off its init so a wrong index or sign cannot hide."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="module")
def tiny_segmenter():
    """Features wider (256) than the 196 tokens of a window: SimFeatUp's operator path, as ViT-B/16.

    (The session's export, conftest's ``artefacts``, is the 32-wide model: the direct path.)"""
    from conftest import TINY_CLIP

    torch.manual_seed(0)
    encoder = DenseCLIP.from_config({**TINY_CLIP, "embed_dim": 256})
    return Segmenter(encoder, _perturbed(SimFeatUp(256, 16))).eval()


@pytest.fixture(scope="module")
def upsampler_dir(tiny_segmenter, tmp_path_factory):
    """A second whole export (slow tests only): the operator path's graph."""
    return export_onnx(tmp_path_factory.mktemp("onnx") / "tiny_up", segmenter=tiny_segmenter)


@pytest.fixture(scope="module")
def session_segmenter(artefacts, tiny_weights):
    """The torch segmenter the session's export (conftest ``onnx_dir``) was made from."""
    from simfeatup.segmenter import build_segmenter

    return build_segmenter(artefacts[0], model=tiny_weights[0], pretrained=str(tiny_weights[1])).eval()


def _to_onnx_main():
    return load_script("export/to_onnx.py").main


# ------------------------------------------------------------------ export-form pieces, eager
@pytest.mark.parametrize("n", [1, 3, 13, 14, 20])
def test_bicubic_matrix_is_torch_bicubic_with_scale_factor(n):
    grid = torch.randn(1, 4, 14, 14)
    ref = F.interpolate(
        grid, scale_factor=((n + 0.1) / 14, 1.0), mode="bicubic", align_corners=False, recompute_scale_factor=False
    )
    m = bicubic_matrix(n, 14, torch.tensor(14 / (n + 0.1)), grid)
    torch.testing.assert_close(torch.einsum("ij,bcjk->bcik", m, grid), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("size", [(28, 28), (7, 5), (224, 96)])
@pytest.mark.parametrize("pad", [0, 3])
def test_bicubic_resize_is_torch_bicubic_then_reflect_padded(size, pad):
    x = torch.randn(2, 5, 14, 12)
    ref = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    ref = F.pad(ref, [pad] * 4, mode="reflect")
    torch.testing.assert_close(bicubic_resize(x, size, pad=pad), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("hw", [(14, 14), (14, 6), (1, 14), (3, 2)])
def test_pos_embed_export_form_matches_dense_clip(hw):
    from conftest import TINY_CLIP

    encoder = DenseCLIP.from_config(TINY_CLIP)
    # 0-d tensors take the branch that symbolic sizes take in the traced graph (native grid chosen in the graph)
    graph_form = encoder.resized_pos_embed(torch.tensor(hw[0]), torch.tensor(hw[1]))
    torch.testing.assert_close(graph_form, encoder.pos_embed(*hw), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dim", [32, 300])  # direct path (32 < 196 tokens) and operator path
@pytest.mark.parametrize(
    "hw", [pytest.param((14, 14), marks=pytest.mark.slow), (1, 14), (3, 5), (2, 2)]  # a whole window: ~15-70 s
)
def test_graph_upsampler_matches_simfeatup(dim, hw):
    torch.manual_seed(0)
    up = _perturbed(SimFeatUp(dim, 16)).eval()
    graph = GraphUpsampler(up, max_tokens=196)
    assert graph.operator == (dim > 196)
    feats, guidance = torch.randn(2, dim, *hw), torch.randn(2, 3, 16 * hw[0], 16 * hw[1])
    text = F.normalize(torch.randn(4, dim), dim=1)
    with torch.no_grad():
        ref = up(feats, guidance)
        torch.testing.assert_close(graph(feats, guidance), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
        torch.testing.assert_close(
            graph.cosine_logits(feats, guidance, text), up.cosine_logits(feats, guidance, text), atol=5e-5, rtol=0
        )


# ------------------------------------------------------------------ whole exports
def test_script_export_writes_a_complete_verified_folder(onnx_dir, tiny_weights):
    """The session's export: the script, as a user runs it, with the registered tiny model + weights file."""
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in onnx_dir.iterdir() if p.name != "manifest.json")
    for name, digest in manifest["files"].items():
        assert sha256(onnx_dir / name) == digest
    assert {"image.onnx.data", "text.onnx.data", MERGES} <= set(manifest["files"])  # external-data layout
    pre = manifest["preprocessing"]
    assert (pre["long_side"], pre["window"], pre["stride"], pre["patch"]) == (448, 224, 112, 16)
    assert manifest["logit_scale"] == 50.0 and manifest["default_lambda"] == -0.3
    assert manifest["upsampler"]["kind"] == "simfeatup"  # its provenance: test_runtime
    assert manifest["model"] == {
        **Backbone(
            model=tiny_weights[0],
            pretrained=tiny_weights[1].name,
            patch_size=16,
            weights_sha256=file_sha256(tiny_weights[1]),
            quick_gelu=False,
        ).to_dict(),
        "embed_dim": 32,
    }  # the weights by name and checksum, never this machine's path
    assert manifest["exporter"]["versions"]["torch"] and manifest["opset"] >= 18
    report = manifest["verification"]
    assert report["max_abs_logit_diff"] <= FP32_TOLERANCE and any(c.startswith("sample") for c in report["cases"])
    assert not list(onnx_dir.parent.glob(".*tmp"))  # the temporary folder was renamed, not copied


@pytest.mark.slow
def test_model_config_with_weights_file_exports_those_weights(tmp_path, tiny_clip_cfg):
    """clip_config + pretrained (the weights were ignored before): exported and recorded by name + sha256."""
    from safetensors.torch import save_file

    clip = DenseCLIP.from_config(tiny_clip_cfg, seed=3).clip
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    out = export_onnx(tmp_path / "onnx", clip_config=tiny_clip_cfg, pretrained=str(weights), samples=[])
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model == {
        **Backbone(
            config=tiny_clip_cfg,
            pretrained="w.safetensors",
            weights_sha256=file_sha256(weights),
            patch_size=16,
            quick_gelu=False,
        ).to_dict(),
        "embed_dim": 32,
    }
    # the text graph holds the file's token embedding, not the seed-0 one of a random build
    text = onnx.load(str(out / "text.onnx"))
    stored = [onnx.numpy_helper.to_array(t, base_dir=str(out)) for t in text.graph.initializer]
    embedding = clip.token_embedding.weight.detach().numpy()
    assert any(a.shape == embedding.shape and np.array_equal(a, embedding) for a in stored)


@pytest.mark.slow  # a second whole export (~100-200 s)
def test_operator_path_graph_never_materialises_the_feature_map(upsampler_dir, tiny_segmenter):
    """The logits come from the low-rank form: no (B, 256, H, W) value in the graph."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(upsampler_dir / "image.onnx"), load_external_data=False))
    for value in model.graph.value_info:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        full_res = len(dims) == 4 and "16*h" in dims and "16*w" in dims
        assert not (full_res and 256 in dims), (value.name, dims)  # NCHW or channels-last


def test_input_dims_are_symbolic(onnx_dir):
    model = onnx.load(str(onnx_dir / "image.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["windows"][1] == 3 and all(isinstance(d, str) for d in (dims["windows"][0], *dims["windows"][2:]))
    assert isinstance(dims["text"][0], str) and dims["lam"] == []


SIZES = [(2, 224, 224), (2, 224, 96), (1, 16, 224), (3, 80, 112)]


def _graph_matches_torch(folder, segmenter, shape):
    B, H, W = shape
    rng = np.random.default_rng(H * W)
    windows = rng.standard_normal((B, 3, H, W)).astype(np.float32)
    text = rng.standard_normal((4, segmenter.encoder.embed_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    session = ort.InferenceSession(str(folder / "image.onnx"), session_options(), providers=["CPUExecutionProvider"])
    for lam in (0.0, -0.3):
        got = session.run(None, {"windows": windows, "text": text, "lam": np.asarray(lam, np.float32)})[0]
        with torch.no_grad():
            ref = segmenter.window_logits(torch.from_numpy(windows), torch.from_numpy(text), lam).numpy()
        assert got.shape == (B, 4, H, W)
        assert np.abs(got - ref).max() <= FP32_TOLERANCE


@pytest.mark.parametrize("shape", SIZES)
def test_graph_matches_torch_at_several_sizes(onnx_dir, session_segmenter, shape):
    _graph_matches_torch(onnx_dir, session_segmenter, shape)


@pytest.mark.slow  # a second whole export (~100-200 s)
@pytest.mark.parametrize("shape", SIZES)
def test_operator_path_graph_matches_torch_at_several_sizes(upsampler_dir, tiny_segmenter, shape):
    _graph_matches_torch(upsampler_dir, tiny_segmenter, shape)


def test_text_graph_matches_encoder(onnx_dir, tiny_weights):
    name, weights = tiny_weights
    encoder = DenseCLIP.from_pretrained(name, str(weights))
    tokens = encoder.tokenize(["a photo of a road.", "forêt", "道路", "x " * 100])
    session = ort.InferenceSession(
        str(onnx_dir / "text.onnx"), session_options(), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"tokens": tokens.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, encoder.encode_text(tokens).numpy(), atol=1e-5)


@pytest.mark.slow  # a whole export (~30-120 s)
def test_fp16_bilinear_export_reports_and_bounds_its_error(tiny_segmenter, tmp_path, caplog):
    bilinear = Segmenter(tiny_segmenter.encoder, None).eval()
    with caplog.at_level("INFO", logger="simfeatup.export"):
        out = export_onnx(tmp_path / "half", segmenter=bilinear, dtype="fp16", samples=[])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["upsampler"] == {"kind": "bilinear"} and manifest["dtype"] == "fp16"
    report = manifest["verification"]
    assert 0 < report["max_abs_logit_diff"] <= FP16_TOLERANCE
    assert "fp16 image graph: max |logit diff|" in caplog.text
    assert next(tiny_segmenter.parameters()).dtype == torch.float32  # the caller's model is untouched


# ------------------------------------------------------------------ failures leave nothing behind
def test_failed_export_removes_everything(tiny_segmenter, tmp_path, monkeypatch):
    def broken(segmenter, path, opset):
        path.write_bytes(b"half a graph")
        raise OnnxExportError("simulated exporter failure")

    monkeypatch.setattr(writer, "export_image", broken)
    with pytest.raises(OnnxExportError, match="simulated"):
        export_onnx(tmp_path / "out", segmenter=tiny_segmenter)
    assert list(tmp_path.iterdir()) == []


def test_verification_catches_a_graph_of_another_model(onnx_dir):
    from conftest import TINY_CLIP

    other = Segmenter(DenseCLIP.from_config(TINY_CLIP, seed=1), _perturbed(SimFeatUp(32, 16))).eval()
    with pytest.raises(OnnxExportError, match="disagrees with torch"):
        verify_onnx(onnx_dir, other, samples=[])


def test_existing_output_is_refused_without_overwrite(tiny_segmenter, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    with pytest.raises(ValueError, match="already exists"):
        export_onnx(tmp_path / "taken", segmenter=tiny_segmenter)
    with pytest.raises(ValueError, match="not a model folder"):  # --overwrite replaces model folders only
        export_onnx(tmp_path / "taken", segmenter=tiny_segmenter, overwrite=True)
    assert (tmp_path / "taken" / "file").read_text() == "keep me"


@pytest.mark.slow  # traces the whole image graph before the opset is refused (~15-70 s)
def test_an_opset_the_exporter_cannot_write_is_refused(tiny_segmenter, tmp_path):
    bilinear = Segmenter(tiny_segmenter.encoder, None).eval()
    with pytest.raises(ValueError, match="--opset 9: the exporter could only write opset"):
        export_onnx(tmp_path / "old", segmenter=bilinear, opset=9)
    assert list(tmp_path.iterdir()) == []


def test_script_reports_user_mistakes_in_one_line(tmp_path, capsys):
    assert _to_onnx_main()(["--upsampler", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.safetensors" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_vit_b16_random_weights_export_with_simfeatup(tmp_path):
    """The real architecture (random weights, no download): export + its own parity check."""
    import open_clip

    torch.manual_seed(0)
    encoder = DenseCLIP(open_clip.create_model("ViT-B-16", pretrained=None), backbone=Backbone(model="ViT-B-16"))
    segmenter = Segmenter(encoder, _perturbed(SimFeatUp(512, 16), 0.1)).eval()
    out = export_onnx(tmp_path / "vitb16", segmenter=segmenter)
    report = json.loads((out / "manifest.json").read_text())["verification"]
    assert report["max_abs_logit_diff"] <= FP32_TOLERANCE


def test_script_leaves_the_attention_to_the_artefact(tmp_path, monkeypatch, capsys):
    """Without --attention the export builds the backbone the upsampler was trained with, as segment does."""
    import simfeatup.segmenter

    seen = {}

    def build(upsampler, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(simfeatup.segmenter, "build_segmenter", build)
    assert _to_onnx_main()(["--upsampler", str(tmp_path / "up.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert seen["attention"] is None and "stop here" in capsys.readouterr().err
    assert _to_onnx_main()(["--upsampler", "bilinear", "--attention", "clearclip", "--out", str(tmp_path / "o")]) == 2
    assert seen["attention"] == "clearclip"
