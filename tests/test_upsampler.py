"""SimFeatUp: fast path vs the SPEC 3 formula written naively, memory bound, save/load."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from simfeatup.filters import adaptive_filter, range_logits, reflect_pad
from simfeatup.upsampler import (
    STACK_RADIUS,
    SimFeatUp,
    UpsamplerFileError,
    load_upsampler,
    save_upsampler,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: a second thread only adds sync cost, 100x when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def naive_step(step, source, guide):
    """SPEC 3 as the reference writes it: unfold everything (B, C, d*d, H, W)."""
    B, C = source.shape[:2]
    H, W = guide.shape[-2:]
    r, d = step.radius, step.diameter
    key = step.range_proj(guide)
    neighbours = F.unfold(F.pad(key, [r] * 4, mode="reflect"), d).view(B, -1, d * d, H, W)
    temp = step.range_temp.exp().clamp(1e-4, 1e4)
    range_k = torch.softmax(temp * torch.einsum("bkohw,bkhw->bohw", neighbours, key), dim=1)
    t = torch.linspace(-1, 1, d, dtype=guide.dtype)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    spatial_k = torch.exp(-(xx**2 + yy**2) / (2 * step.sigma_spatial**2)).reshape(1, d * d, 1, 1)
    k = range_k * spatial_k
    k = k / k.sum(1, keepdim=True).clamp(min=1e-7)
    k = k + 0.1 * step.fixup_proj(torch.cat([k, guide], dim=1))
    src = F.interpolate(source, (H, W), mode="bicubic", align_corners=False)
    patches = F.unfold(F.pad(src, [r] * 4, mode="reflect"), d).view(B, C, d * d, H, W)
    return torch.einsum("bohw,bcohw->bchw", k, patches)


def naive(module, feats, guidance):
    H, W = guidance.shape[-2:]
    h, w = feats.shape[-2:]
    steps = module.steps()
    x = feats
    for i, step in enumerate(steps):
        size = (H, W) if i == len(steps) - 1 else (h * 2 ** (i + 1), w * 2 ** (i + 1))
        x = naive_step(step, x, F.adaptive_avg_pool2d(guidance, size))
    return x + 0.1 * module.fixup_proj(x)


def perturbed(module, scale=0.3):
    """Move every parameter off its init so a wrong index or sign cannot hide."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


# (dim, patch, h, w, shared, radius): dim > h*w takes the operator path, dim <= h*w the direct one.
CASES = [
    (40, 16, 3, 5, True, 5),  # operator path, non-square
    (8, 16, 3, 4, True, 5),  # direct path
    (24, 14, 4, 3, True, 5),  # patch 14: x2, x2, x2, x1.75
    (8, 14, 3, 3, True, 5),
    (16, 16, 3, 4, False, STACK_RADIUS),  # JBUStack layout
    (6, 16, 2, 3, False, STACK_RADIUS),
    (20, 8, 3, 3, True, 5),  # 3 steps
]


@pytest.mark.parametrize("dim,patch,h,w,shared,radius", CASES)
def test_matches_naive_float64(dim, patch, h, w, shared, radius):
    m = perturbed(SimFeatUp(dim, patch, radius=radius, shared=shared)).double().eval()
    feats = torch.randn(2, dim, h, w, dtype=torch.float64)
    guidance = torch.randn(2, 3, h * patch, w * patch, dtype=torch.float64)
    with torch.no_grad():
        out = m(feats, guidance)
        ref = naive(m, feats, guidance)
    assert out.shape == (2, dim, h * patch, w * patch)
    assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()


@pytest.mark.parametrize("dim,h,w", [(64, 3, 4), (8, 4, 3)])
def test_matches_naive_float32(dim, h, w):
    m = SimFeatUp(dim, 16).eval()
    feats, guidance = torch.randn(2, dim, h, w), torch.randn(2, 3, h * 16, w * 16)
    with torch.no_grad():
        assert (m(feats, guidance) - naive(m, feats, guidance)).abs().max() <= 1e-5


def test_reflect_pad_matches_torch_and_handles_tiny_sides():
    x = torch.randn(1, 2, 7, 9)
    assert torch.equal(reflect_pad(x, 5), F.pad(x, [5] * 4, mode="reflect"))
    small = torch.arange(3.0).view(1, 1, 1, 3).expand(1, 1, 2, 3)
    assert reflect_pad(small, 5)[0, 0, 0].tolist() == [1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]
    m = SimFeatUp(8, 16).eval()  # a 1 x 2 token grid: the first step is smaller than the window
    with torch.no_grad():
        out = m(torch.randn(1, 8, 1, 2), torch.randn(1, 3, 16, 32))
    assert out.shape == (1, 8, 16, 32) and out.isfinite().all()


def test_training_mode_has_gradients_for_every_parameter():
    m = SimFeatUp(16, 16).train()
    feats = torch.randn(2, 16, 2, 3, requires_grad=True)
    m(feats, torch.randn(2, 3, 32, 48)).square().mean().backward()
    assert feats.grad is not None
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_inputs(dtype):
    m = SimFeatUp(32, 16).eval()
    feats, guidance = torch.randn(2, 32, 3, 3), torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = m(feats, guidance)
        out = m.to(dtype)(feats.to(dtype), guidance)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_rejects_mismatched_inputs():
    m = SimFeatUp(8, 16)
    with pytest.raises(ValueError, match="expects feats"):
        m(torch.randn(1, 8, 2, 2), torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expects feats"):
        m(torch.randn(1, 9, 2, 2), torch.randn(1, 3, 32, 32))


def test_parameter_names_match_authors_layout():
    names = set(SimFeatUp(512, 16).state_dict())
    assert {"up.range_temp", "up.sigma_spatial", "up.range_proj.0.weight", "up.range_proj.3.bias",
            "up.fixup_proj.0.weight", "up.fixup_proj.3.bias", "fixup_proj.1.weight"} <= names
    shapes = {k: tuple(v.shape) for k, v in SimFeatUp(512, 16).state_dict().items()}
    assert shapes["up.fixup_proj.0.weight"] == (121, 124, 1, 1) and shapes["fixup_proj.1.weight"] == (512, 512, 1, 1)
    stack = SimFeatUp(384, 16, radius=STACK_RADIUS, shared=False).state_dict()
    assert tuple(stack["up4.fixup_proj.0.weight"].shape) == (49, 52, 1, 1) and "up5.range_temp" not in stack


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from simfeatup.upsampler import SimFeatUp
    torch.manual_seed(0)
    m = SimFeatUp(512, 16).eval()
    feats, guidance = torch.randn(1, 512, 14, 14), torch.randn(1, 3, 224, 224)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        out = m(feats, guidance)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)
    """
)


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_peak_memory_far_below_unfold():
    """C=512, 14 -> 224: the unfold formulation needs a 12 GB tensor; we must stay under 600 MB."""
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    extra_mb = float(res.stdout.strip().splitlines()[-1])
    # the output itself is 512 x 224 x 224 fp32 = 98 MB
    assert extra_mb < 600, f"peak RSS grew by {extra_mb:.0f} MB during one forward"


def test_save_load_round_trip(tmp_path):
    m = perturbed(SimFeatUp(16, 16, radius=3, shared=False)).eval()
    path = tmp_path / "up.safetensors"
    save_upsampler(m, path, backbone={"model": "ViT-B-16"}, extra={"training": {"steps": 3}})
    sidecar = json.loads((tmp_path / "up.json").read_text())
    assert sidecar["upsampler"] == m.config and sidecar["weights"] == "up.safetensors"
    feats, guidance = torch.randn(2, 16, 2, 3), torch.randn(2, 3, 32, 48)
    for p in (path, tmp_path / "up.json"):
        loaded, info = load_upsampler(p)
        assert not loaded.training
        assert info["backbone"] == {"model": "ViT-B-16"} and info["training"] == {"steps": 3}
        with torch.no_grad():
            assert torch.equal(loaded(feats, guidance), m(feats, guidance))


def test_load_wrong_size_names_file_and_shapes(tmp_path):
    small, big = SimFeatUp(16, 16), SimFeatUp(32, 16)
    save_upsampler(small, tmp_path / "a.safetensors")
    meta = {"simfeatup": json.dumps({**json.loads((tmp_path / "a.json").read_text()), "weights": "b.safetensors"})}
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(UpsamplerFileError) as e:
        load_upsampler(tmp_path / "b.safetensors")
    msg = str(e.value)
    assert "\n" not in msg and "b.safetensors" in msg and "fixup_proj.1.weight" in msg
    assert "(32, 32, 1, 1)" in msg and "(16, 16, 1, 1)" in msg
    assert isinstance(e.value, ValueError)


def test_load_rejects_missing_tensor_and_foreign_files(tmp_path):
    m = SimFeatUp(8, 16)
    save_upsampler(m, tmp_path / "a.safetensors")
    meta = {"simfeatup": (tmp_path / "a.safetensors").with_suffix(".json").read_text()}
    state = {k: v for k, v in m.state_dict().items() if k != "up.sigma_spatial"}
    save_file(state, str(tmp_path / "a.safetensors"), metadata=meta)
    with pytest.raises(UpsamplerFileError, match="missing \\['up.sigma_spatial'\\]"):
        load_upsampler(tmp_path / "a.json")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UpsamplerFileError, match="without simfeatup metadata"):
        load_upsampler(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(UpsamplerFileError, match="not a safetensors file") as err:
        load_upsampler(tmp_path / "junk.safetensors")
    assert "convert-weights" not in str(err.value)
    torch.save({"state_dict": {}}, tmp_path / "authors.ckpt")  # the authors' Lightning checkpoint, say
    with pytest.raises(UpsamplerFileError, match="PyTorch checkpoint. convert it once with simfeatup convert-weights"):
        load_upsampler(tmp_path / "authors.ckpt")
    with pytest.raises(UpsamplerFileError, match="no such file \\(train one with python train/fit.py"):
        load_upsampler(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("dim,h,w", [(40, 3, 4), (6, 2, 3)])  # h*w < C: the factored scoring; else the full map
def test_cosine_logits_are_normalised_forward_against_text(dim, h, w):
    m = perturbed(SimFeatUp(dim, 16)).double().eval()
    feats = torch.randn(2, dim, h, w, dtype=torch.float64)
    guidance = torch.randn(2, 3, h * 16, w * 16, dtype=torch.float64)
    text = F.normalize(torch.randn(5, dim, dtype=torch.float64), dim=1)
    with torch.no_grad():
        got = m.cosine_logits(feats, guidance, text)
        want = torch.einsum("bchw,qc->bqhw", F.normalize(m(feats, guidance), dim=1), text)
    assert got.dtype == torch.float32 and got.shape == (2, 5, h * 16, w * 16)
    torch.testing.assert_close(got, want.float(), atol=2e-6, rtol=1e-5)


def _naive_filter(src_pad, kernel):
    """SPEC 3's sum written plainly (autograd differentiates it): sum_o K(p, o) src(p + o)."""
    H, W = kernel.shape[-2:]
    return sum(src_pad[..., o // 11:o // 11 + H, o % 11:o % 11 + W] * kernel[:, o:o + 1] for o in range(121))


@pytest.mark.parametrize("H,W", [(24, 40), (6, 10), (7, 5)])  # tiles of 8, 2 and 1 pixels
def test_range_logits_match_shifted_slices(H, W):
    key = torch.randn(2, 4, H, W)
    pad = reflect_pad(key, 5)
    slices = torch.stack([(pad[..., dy:dy + H, dx:dx + W] * key).sum(1) for dy in range(11) for dx in range(11)], 1)
    assert torch.allclose(range_logits(pad, key), slices, atol=1e-5)
    src, kernel = torch.randn(2, 5, H + 10, W + 10), torch.randn(2, 121, H, W)
    assert torch.allclose(adaptive_filter(src, kernel), _naive_filter(src, kernel), atol=1e-5)


@pytest.mark.parametrize("T,tokens", [(2, (3, 2)), (8, (1, 2)), (16, (2, 1))])
def test_graph_form_tiles_compute_the_eager_sums(T, tokens):
    """The ONNX graph form's tiled matmuls (channels-last) give the eager filter and range logits."""
    from simfeatup.filters import Tiles

    tiles = Tiles(T, 11)
    H, W = T * tokens[0], T * tokens[1]
    src, kernel = torch.randn(2, 5, H + 10, W + 10), torch.randn(2, 121, H, W)
    k = tiles.split(kernel.permute(0, 2, 3, 1))  # (B, h, w, T*T, 121)
    got = tiles.filter(src.permute(0, 2, 3, 1), k).permute(0, 3, 1, 2)
    assert torch.allclose(got, adaptive_filter(src, kernel), atol=1e-5)
    key = torch.randn(2, 4, H, W)
    pad = reflect_pad(key, 5)
    logits = tiles.join(tiles.range_logits(key.permute(0, 2, 3, 1), pad.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    assert torch.allclose(logits, range_logits(pad, key), atol=1e-5)


@pytest.mark.slow  # ~15-30 s: the dynamo export traces four steps at 224 x 224
def test_onnx_export_runs_in_onnxruntime_at_224(tmp_path):
    """SPEC 7: standard ops only; dim > h*w so the exported graph takes the operator path.

    What is exported is the upsampler's graph form, as export_onnx traces it (under no_grad)."""
    import onnxruntime as ort

    from simfeatup.export.graph_form import GraphUpsampler

    m = SimFeatUp(200, 16).eval()
    feats, guidance = torch.randn(2, 200, 14, 14), torch.randn(2, 3, 224, 224)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        torch.onnx.export(GraphUpsampler(m, 196).eval(), (feats, guidance), tmp_path / "up.onnx", dynamo=True,
                          input_names=["feats", "guidance"], output_names=["out"],
                          dynamic_shapes={"feats": {0: batch}, "guidance": {0: batch}})
    session = ort.InferenceSession(str(tmp_path / "up.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 2):
        (out,) = session.run(None, {"feats": feats[:b].numpy(), "guidance": guidance[:b].numpy()})
        with torch.no_grad():
            assert (torch.from_numpy(out) - m(feats[:b], guidance[:b])).abs().max() <= 1e-4


@pytest.mark.slow  # 5-8 s on a 2-core AVX2 machine: the default run stays under 5 min
def test_filter_backward_matches_autograd_through_the_plain_sum():
    # batch 2, 2 channels, a 3x2 output: every tap of the 11x11 window, at a fifth of the larger case's cost
    src = torch.randn(2, 2, 13, 12, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(2, 121, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(adaptive_filter, (src, kernel))
    weights = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    ours = torch.autograd.grad((adaptive_filter(src, kernel) * weights).sum(), (src, kernel))
    plain = torch.autograd.grad((_naive_filter(src, kernel) * weights).sum(), (src, kernel))
    assert all(torch.allclose(a, b) for a, b in zip(ours, plain))


def test_training_after_inference_in_one_process():
    """The cached tile indices are built outside inference mode, so autograd can use them later."""
    m = SimFeatUp(8, 16)
    feats, guidance = torch.randn(1, 8, 3, 2), torch.randn(1, 3, 48, 32)
    with torch.inference_mode():
        m.eval()(feats, guidance)
    m.train()
    m(feats, guidance).sum().backward()
    assert m.up.range_temp.grad is not None


@pytest.mark.parametrize("operator", [True, False])  # the unit images' columns (and tile-order scores), or C channels
@pytest.mark.parametrize("patch,h,w", [(16, 1, 2), (16, 3, 5), (14, 1, 1), (14, 4, 3)])
def test_graph_form_equals_eager_where_the_tile_window_outgrows_the_input(patch, h, w, operator):
    """The graph form's tiles read a bounded source window (its sizes are symbolic), wider than a
    1- or 2-token grid: the clamped, zero-weighted columns must leave the sums exact."""
    from simfeatup.export.graph_form import GraphUpsampler

    m = perturbed(SimFeatUp(40, patch)).double().eval()
    feats = torch.randn(2, 40, h, w, dtype=torch.float64)
    guidance = torch.randn(2, 3, h * patch, w * patch, dtype=torch.float64)
    text = F.normalize(torch.randn(5, 40, dtype=torch.float64), dim=1)
    graph = GraphUpsampler(m, h * w if operator else 196)
    assert graph.operator == operator
    with torch.no_grad():
        want, got = m(feats, guidance), graph(feats, guidance)
        # scored in the last step's tile order, then put back in place (float32, as eager)
        torch.testing.assert_close(graph.cosine_logits(feats, guidance, text), m.cosine_logits(feats, guidance, text),
                                   atol=2e-6, rtol=1e-5)
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


def test_cosine_logits_gradients_stay_finite_for_identical_tokens():
    """A uniform window gives identical, rank-1 tokens: under autograd the scores keep the Gram form
    (QR's backward is undefined there), so every gradient stays finite."""
    m = SimFeatUp(40, 16)
    feats = torch.ones(1, 40, 2, 3, requires_grad=True)
    text = F.normalize(torch.randn(4, 40), dim=1)
    m.cosine_logits(feats, torch.randn(1, 3, 32, 48), text).square().sum().backward()
    assert feats.grad.isfinite().all() and all(p.grad.isfinite().all() for p in m.parameters() if p.grad is not None)
