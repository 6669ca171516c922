"""DenseCLIP against the SPEC 2.3 formulas, written here independently of simfeatup.encoder."""
import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from simfeatup.backbone import ATTENTION_MODES, Backbone, WeightsUnavailableError, file_sha256
from simfeatup.encoder import DenseCLIP


# ----------------------------------------------------------------------------- references
def spec_last_block(blk, x, mode):
    """SPEC 2.3 block 12, head by head with explicit softmaxes: (B, L, C) -> (B, L, C)."""
    C = x.shape[-1]
    y = blk.ln_1(x)
    w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    q, k, v = (y @ w[i * C:(i + 1) * C].T + b[i * C:(i + 1) * C] for i in range(3))
    nh = blk.attn.num_heads
    hd = C // nh
    s = 1 / math.sqrt(hd)

    def sm(a, c):
        return torch.softmax(a @ c.transpose(-1, -2) * s, dim=-1)

    heads = []
    for i in range(nh):
        qh, kh, vh = (t[..., i * hd:(i + 1) * hd] for t in (q, k, v))
        if mode == "segearth":
            a = sm(qh, qh) + sm(kh, kh) + sm(vh, vh)
        elif mode == "clearclip":
            a = sm(qh, qh)
        elif mode == "sclip":
            a = sm(qh, qh) + sm(kh, kh)
        elif mode == "maskclip":
            a = torch.eye(x.shape[1], dtype=x.dtype).expand(x.shape[0], -1, -1)
        else:
            a = sm(qh, kh)
        heads.append(a @ vh)
    return torch.cat(heads, -1) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias


def head(visual, tokens):
    """ln_post + proj on every token -> feats (B, D, h, w) needs the grid, so return (B, L, D)."""
    return visual.ln_post(tokens) @ visual.proj


def to_maps(tokens, h, w):
    return tokens[:, 1:].reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2), tokens[:, 0]


def cubic_1d(src, n_dst, g, a=-0.75):
    """Resample axis 0 of src (g, ...) to n_dst rows at (dst + 0.5) * g / (n + 0.1) - 0.5 (SPEC 2.3)."""
    def w_near(t):
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def w_far(t):
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    out = np.zeros((n_dst,) + src.shape[1:])
    for dst in range(n_dst):
        pos = (dst + 0.5) * g / (n_dst + 0.1) - 0.5
        i0 = math.floor(pos)
        t = pos - i0
        weights = (w_far(t + 1), w_near(t), w_near(1 - t), w_far(2 - t))
        for d, wt in zip((-1, 0, 1, 2), weights):
            out[dst] += wt * src[min(max(i0 + d, 0), g - 1)]  # PyTorch clamps taps at the border
    return out


def spec_pos_embed(pos, g, h, w):
    """Independent SPEC 2.3 positional embedding for an h x w grid: (1 + h*w, C)."""
    if (h, w) == (g, g):
        return pos
    grid = pos[1:].double().numpy().reshape(g, g, -1)
    grid = cubic_1d(grid, h, g)
    grid = cubic_1d(grid.transpose(1, 0, 2), w, g).transpose(1, 0, 2)  # second axis
    return torch.cat([pos[:1], torch.from_numpy(grid).reshape(h * w, -1).to(pos.dtype)])


def reference_forward(clip, img, mode, source="final"):
    """Manual path over open_clip's modules with the SPEC pos-embed and last block."""
    v = clip.visual
    p = v.patch_size[0]
    h, w = img.shape[-2] // p, img.shape[-1] // p
    t = v.conv1(img).flatten(2).transpose(1, 2)
    t = torch.cat([v.class_embedding.expand(t.shape[0], 1, -1), t], 1)
    t = v.ln_pre(t + spec_pos_embed(v.positional_embedding, v.grid_size[0], h, w))
    for blk in v.transformer.resblocks[:-1]:
        t = blk(t)
    if source == "final":
        t = spec_last_block(v.transformer.resblocks[-1], t, mode)
    return to_maps(head(v, t), h, w)


def tiny(cfg, **vision):
    cfg["vision_cfg"].update(vision)
    return cfg


# ----------------------------------------------------------------------------- last block
@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_last_block_matches_spec_formula_on_open_clip_blocks(tiny_clip_cfg, mode):
    enc = DenseCLIP.from_config(tiny_clip_cfg, attention=mode).double()
    v = enc.clip.visual
    img = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    # Blocks 1..N-1 from open_clip's own forward, not from our loop.
    n = len(v.transformer.resblocks)
    inter = v.forward_intermediates(img, indices=[n - 2], output_fmt="NLC", output_extra_tokens=True,
                                    intermediates_only=True)
    x = torch.cat([inter["image_intermediates_prefix"][0], inter["image_intermediates"][0]], 1)
    want_f, want_c = to_maps(head(v, spec_last_block(v.transformer.resblocks[-1], x, mode)), 14, 14)
    feats, cls = enc(img)
    assert feats.shape == (2, 32, 14, 14) and cls.shape == (2, 32)
    torch.testing.assert_close(feats, want_f, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cls, want_c, rtol=1e-9, atol=1e-10)


def test_vanilla_is_open_clip_attention_without_residual_or_mlp(tiny_clip_cfg):
    enc = DenseCLIP.from_config(tiny_clip_cfg, attention="vanilla").double()
    blk = enc.clip.visual.transformer.resblocks[-1]
    x = torch.randn(2, 197, 64, dtype=torch.float64)
    torch.testing.assert_close(enc._last_block(blk, x), blk.ls_1(blk.attention(blk.ln_1(x))))


def test_penultimate_is_block_n_minus_1_through_ln_post_and_proj(tiny_clip_cfg):
    enc = DenseCLIP.from_config(tiny_clip_cfg).double()
    v = enc.clip.visual
    img = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    inter = v.forward_intermediates(img, indices=[0], output_fmt="NLC", output_extra_tokens=True,
                                    normalize_intermediates=True, intermediates_only=True)
    want_f = (inter["image_intermediates"][0] @ v.proj).reshape(2, 14, 14, -1).permute(0, 3, 1, 2)
    want_c = inter["image_intermediates_prefix"][0][:, 0] @ v.proj
    feats, cls = enc(img, source="penultimate")
    torch.testing.assert_close(feats, want_f)
    torch.testing.assert_close(cls, want_c)


# ----------------------------------------------------------------------------- positional embedding
@pytest.mark.parametrize("hw", [(14, 20), (20, 14), (10, 14), (7, 9), (28, 28), (1, 1)])
def test_pos_embed_uses_spec_sample_positions(tiny_clip_cfg, hw):
    enc = DenseCLIP.from_config(tiny_clip_cfg).double()
    pos = enc.clip.visual.positional_embedding
    got = enc.pos_embed(*hw)
    torch.testing.assert_close(got, spec_pos_embed(pos, 14, *hw), rtol=1e-10, atol=1e-10)
    assert torch.equal(got[0], pos[0])  # [CLS] position untouched


def test_pos_embed_native_grid_is_identity_and_kept_axis_is_resampled(tiny_clip_cfg):
    enc = DenseCLIP.from_config(tiny_clip_cfg)
    pos = enc.clip.visual.positional_embedding
    assert enc.pos_embed(14, 14) is pos
    grid = pos[1:].reshape(14, 14, -1)
    resized = enc.pos_embed(14, 20)[1:].reshape(14, 20, -1)
    # The axis that stays 14 is still resampled (positions (dst + 0.5) * 14 / 14.1 - 0.5) ...
    assert not torch.allclose(resized[:, 0], grid[:, 0], atol=1e-3)
    # ... and a target-size resize, which would leave that axis alone, is what we must NOT do.
    by_size = F.interpolate(grid.permute(2, 0, 1)[None], size=(14, 20), mode="bicubic", align_corners=False)
    assert not torch.allclose(by_size[0].permute(1, 2, 0), resized, atol=1e-3)


def test_pos_embed_cache_follows_dtype(tiny_clip_cfg):
    enc = DenseCLIP.from_config(tiny_clip_cfg)
    assert enc.pos_embed(10, 12) is enc.pos_embed(10, 12)
    enc.double()
    assert enc.pos_embed(10, 12).dtype == torch.float64


@pytest.mark.parametrize("size", [(224, 320), (320, 224), (96, 64), (16, 16)])
def test_off_grid_forward_matches_reference_path(tiny_clip_cfg, size):
    enc = DenseCLIP.from_config(tiny_clip_cfg).double()
    img = torch.randn(1, 3, *size, dtype=torch.float64)
    feats, cls = enc(img)
    want_f, want_c = reference_forward(enc.clip, img, "segearth")
    assert feats.shape == (1, 32, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(feats, want_f)
    torch.testing.assert_close(cls, want_c)


# ----------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("patch,grid", [(32, 7), (14, 16)])
def test_other_patch_sizes(tiny_clip_cfg, patch, grid):
    enc = DenseCLIP.from_config(tiny(tiny_clip_cfg, patch_size=patch)).double()
    assert enc.patch_size == patch and enc.grid_size == (grid, grid)
    for size in [(224, 224), (patch * 3, patch * 5)]:
        img = torch.randn(2, 3, *size, dtype=torch.float64)
        feats, cls = enc(img)
        want_f, want_c = reference_forward(enc.clip, img, "segearth")
        assert feats.shape == (2, 32, size[0] // patch, size[1] // patch)
        torch.testing.assert_close(feats, want_f)
        torch.testing.assert_close(cls, want_c)


@pytest.mark.parametrize("name,patch,dim", [
    ("ViT-B-16", 16, 512),
    pytest.param("ViT-B-32", 32, 512, marks=pytest.mark.slow),  # patch 32 and 14 run fast as tiny configs
    pytest.param("ViT-L-14", 14, 768, marks=pytest.mark.slow),
])
def test_real_architectures_random_weights(name, patch, dim):
    enc = DenseCLIP(open_clip.create_model(name, pretrained=None), backbone=Backbone(model=name))
    assert (enc.patch_size, enc.embed_dim) == (patch, dim)
    with torch.inference_mode():
        feats, cls = enc(torch.randn(1, 3, 2 * patch, 3 * patch))
    assert feats.shape == (1, dim, 2, 3) and cls.shape == (1, dim)
    assert torch.isfinite(feats).all()


def test_rejects_sizes_off_the_patch_grid(tiny_clip_cfg):
    enc = DenseCLIP.from_config(tiny_clip_cfg)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        enc(torch.randn(1, 3, 224, 230))


def test_rejects_unknown_attention(tiny_clip_cfg):
    with pytest.raises(ValueError, match="segearth"):
        DenseCLIP.from_config(tiny_clip_cfg, attention="bogus")


def test_sequence_first_blocks(tiny_clip_cfg):
    # Older open_clip builds run the vision blocks on (L, B, C); the output must not change.
    enc = DenseCLIP.from_config(tiny_clip_cfg)
    img = torch.randn(2, 3, 64, 96)
    want = enc(img)
    enc.clip.visual.transformer.batch_first = False
    for blk in enc.clip.visual.transformer.resblocks:
        blk.attn.batch_first = False
    for a, b in zip(enc(img), want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- frozen, batch, dtype
def test_frozen_and_kept_in_eval(tiny_clip_cfg):
    enc = DenseCLIP.from_config(tiny_clip_cfg)
    assert not any(p.requires_grad for p in enc.parameters())
    wrapper = torch.nn.Sequential(enc).train()
    assert not any(m.training for m in enc.clip.modules())
    feats, cls = wrapper(torch.randn(1, 3, 64, 64))
    assert not feats.requires_grad and not cls.requires_grad


def test_batch_independence(tiny_clip_cfg):
    enc = DenseCLIP.from_config(tiny_clip_cfg)
    img = torch.randn(3, 3, 96, 128)
    feats, cls = enc(img)
    for i in range(3):
        fi, ci = enc(img[i:i + 1])
        torch.testing.assert_close(feats[i:i + 1], fi, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cls[i:i + 1], ci, rtol=1e-4, atol=1e-5)


def test_bf16_follows_module_dtype(tiny_clip_cfg):
    enc = DenseCLIP.from_config(tiny_clip_cfg)
    img = torch.randn(1, 3, 64, 96)
    ref, _ = enc(img)
    enc = enc.to(torch.bfloat16)
    feats, cls = enc(img)  # fp32 input is cast to the module dtype
    assert feats.dtype == cls.dtype == torch.bfloat16
    cos = F.cosine_similarity(feats.float(), ref, dim=1)
    assert cos.min() > 0.95
    assert enc.encode_text(enc.tokenize(["a road"])).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- text
def test_tokenize_and_encode_text(tiny_clip_cfg):
    enc = DenseCLIP.from_config(tiny_clip_cfg)
    tokens = enc.tokenize(["a photo of a building.", "water"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    emb = enc.encode_text(tokens)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(emb, enc.clip.encode_text(tokens, normalize=True))


# ----------------------------------------------------------------------------- weights
@pytest.fixture
def tiny_model_name(tmp_path, tiny_clip_cfg):
    """Register the tiny config under a name, as open_clip's own model_configs/*.json are."""
    name = "SimFeatUp-Test-Tiny"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(tiny_clip_cfg))
    open_clip.add_model_config(path)
    return name


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_from_pretrained_local_file(tmp_path, tiny_clip_cfg, tiny_model_name, suffix):
    src = DenseCLIP.from_config(tiny_clip_cfg, seed=3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".bin":
        torch.save(src.clip.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(src.clip.state_dict(), str(path))
    enc = DenseCLIP.from_pretrained(tiny_model_name, str(path), attention="sclip")
    # the record names the file (never its path) with its checksum, and what runs
    assert enc.backbone == Backbone(model=tiny_model_name, pretrained=path.name, weights_sha256=file_sha256(path),
                                    attention="sclip", patch_size=16, quick_gelu=False)
    src.attention = "sclip"
    img = torch.randn(1, 3, 64, 64)
    for a, b in zip(enc(img), src(img)):
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.clip.training


def test_from_pretrained_unreadable_file(tmp_path, tiny_model_name):
    path = tmp_path / "broken.bin"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="not a PyTorch checkpoint") as err:
        DenseCLIP.from_pretrained(tiny_model_name, str(path))
    assert "\n" not in str(err.value)


def test_from_pretrained_offline_message_is_one_helpful_line(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(WeightsUnavailableError) as err:
        DenseCLIP.from_pretrained("ViT-B-16", "openai", cache_dir=tmp_path)  # empty cache
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in msg and len(msg) < 800  # one line: the cache it looked in, the flag, offline use, the demo
    for part in ("ViT-B-16", "'openai'", "HF_HUB_OFFLINE", "--pretrained FILE", "/path/to/ViT-B-16.bin",
                 "timm/vit_base_patch16_clip_224.openai"):
        assert part in msg


def test_from_pretrained_missing_file_and_unknown_model():
    with pytest.raises(WeightsUnavailableError, match="no such file.*openai"):
        DenseCLIP.from_pretrained("ViT-B-16", "/nonexistent/ViT-B-16.bin")
    with pytest.raises(ValueError, match="ViT-B-16"):
        DenseCLIP.from_pretrained("ViT-B-61", "openai")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, OpenAI's .pt files are not
def test_from_pretrained_refuses_pickled_objects_and_torchscript(tmp_path, tiny_model_name):
    path = tmp_path / "objects.bin"
    torch.save({"layer": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(WeightsUnavailableError, match="re-save its state_dict"):
        DenseCLIP.from_pretrained(tiny_model_name, str(path))
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.randn(1, 2)), str(path))
    with pytest.raises(WeightsUnavailableError, match="TorchScript"):
        DenseCLIP.from_pretrained(tiny_model_name, str(path))


def _save_clip(clip, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def test_config_with_weights_file_loads_them_strictly(tmp_path, tiny_clip_cfg):
    src = DenseCLIP.from_config(tiny_clip_cfg, seed=3)
    path = _save_clip(src.clip, tmp_path / "mine.safetensors")
    enc = DenseCLIP.from_backbone(Backbone(config=tiny_clip_cfg, pretrained=path.name), path)
    for (name, a), b in zip(enc.clip.state_dict().items(), src.clip.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert enc.backbone.pretrained == "mine.safetensors" and enc.backbone.weights_sha256 == file_sha256(path)
    assert enc.backbone.cache_identity() is not None  # real weights: their text vectors may be cached
    # a file for another architecture is refused in one line, never loaded partly
    other = _save_clip(DenseCLIP.from_config({**tiny_clip_cfg, "embed_dim": 16}).clip, tmp_path / "other.safetensors")
    with pytest.raises(WeightsUnavailableError, match="cannot read other.safetensors") as err:
        DenseCLIP.from_backbone(Backbone(config=tiny_clip_cfg, pretrained=other.name), other)
    assert "\n" not in str(err.value)


def test_the_record_says_which_activation_runs(tmp_path, tiny_clip_cfg):
    """A model whose config asks for QuickGELU, with a local file: recorded as what runs (was: False)."""
    name = "SimFeatUp-Test-Tiny-QuickGELU"
    (tmp_path / f"{name}.json").write_text(json.dumps({**tiny_clip_cfg, "quick_gelu": True}))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    path = _save_clip(open_clip.create_model(name), tmp_path / "w.safetensors")
    enc = DenseCLIP.from_pretrained(name, str(path))
    gelus = {type(m).__name__ for m in enc.clip.modules() if "GELU" in type(m).__name__}
    assert gelus == {"QuickGELU"} and enc.backbone.quick_gelu is True
    assert enc.backbone.cache_identity().endswith("quick_gelu=True")
    plain = DenseCLIP.from_pretrained(name, str(path), quick_gelu=False)  # an explicit choice wins
    assert {type(m).__name__ for m in plain.clip.modules() if "GELU" in type(m).__name__} == {"GELU"}
    assert plain.backbone.quick_gelu is False
    assert DenseCLIP.from_config(tiny_clip_cfg).backbone.quick_gelu is False
