"""SimFeatUp training pieces (SPEC 4): jitter, downsampler, losses, module hooks, artefact."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simfeatup.constants import CLIP_MEAN, CLIP_STD
from simfeatup.training.checkpoint import AtomicCheckpointIO
from simfeatup.training.downsampler import AttentionDownsampler
from simfeatup.training.jitter import JitterParams, apply_jitter, sample_jitter
from simfeatup.training.losses import (
    ImageHead,
    UncertaintyHead,
    image_loss,
    project,
    random_projection,
    reconstruction_loss,
)
from simfeatup.training.module import SimFeatUpModule
from simfeatup.training.preview import PREVIEW_ROWS, TITLES, pca_rgb, preview, preview_rows
from simfeatup.upsampler import load_upsampler
from simfeatup.visualize import enlargement, grid_layout


def _params(flip, zoom, offset, pad=20):
    return JitterParams(
        flip=torch.tensor(flip), zoom=torch.tensor(zoom, dtype=torch.float64), offset=torch.tensor(offset), pad=pad
    )


def _reference_jitter(x, pad, zoom, row, col, flip):
    """The authors' tau, written the slow way: pad, zoom the whole thing, crop, flip."""
    h, w = x.shape[-2:]
    y = F.pad(x, [pad] * 4, mode="reflect")
    if zoom > 1:
        y = F.interpolate(y, scale_factor=zoom, mode="bilinear")
    y = y[..., row:row + h, col:col + w]
    return y.flip(-1) if flip else y


# ---------------------------------------------------------------------------- jitter
def test_jitter_applies_the_same_transform_to_image_and_features():
    img = torch.rand(3, 3, 64, 64)
    # "Features" that are the image itself (plus a scaled copy): their jitter must be the
    # jittered image, channel for channel.
    feats = torch.cat([img, 2 * img, img.flip(1)], dim=1)  # (B, 9, H, W)
    params = sample_jitter(3, (64, 64), generator=torch.Generator().manual_seed(3))
    jit_img, jit_feats = apply_jitter(img, params), apply_jitter(feats, params)
    torch.testing.assert_close(jit_feats, torch.cat([jit_img, 2 * jit_img, jit_img.flip(1)], dim=1))


def test_jitter_identity_and_flip():
    img = torch.rand(2, 3, 32, 48, dtype=torch.float64)
    ident = _params([False, False], [1.0, 1.0], [[20, 20], [20, 20]])
    torch.testing.assert_close(apply_jitter(img, ident), img)
    flip = _params([True, True], [1.0, 1.0], [[20, 20], [20, 20]])
    torch.testing.assert_close(apply_jitter(img, flip), img.flip(-1))


def test_jitter_matches_pad_zoom_crop_flip():
    img = torch.randn(1, 4, 224, 224, dtype=torch.float64)
    for flip, zoom, row, col in [(False, 1.0, 0, 40), (True, 1.0, 7, 13), (False, 1.37, 60, 5), (True, 1.93, 280, 250)]:
        out = apply_jitter(img, _params([flip], [zoom], [[row, col]]))
        ref = _reference_jitter(img, 20, zoom, row, col, flip)
        # The reference clamps at the outermost padded pixel where we keep reflecting; inside,
        # both are the same bilinear samples.
        torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])


def test_sample_jitter_is_seeded_and_in_range():
    a = sample_jitter(4000, (224, 224), generator=torch.Generator().manual_seed(0))
    b = sample_jitter(4000, (224, 224), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.offset, b.offset) and torch.equal(a.zoom, b.zoom) and torch.equal(a.flip, b.flip)
    assert abs(a.flip.double().mean() - 0.5) < 0.05
    zoomed = a.zoom > 1
    assert abs(zoomed.double().mean() - 0.5) < 0.05
    assert a.zoom.min() >= 1 and a.zoom.max() <= 2
    room = ((224 + 40) * a.zoom).floor().long() - 224
    assert (a.offset >= 0).all() and (a.offset <= room[:, None]).all()


# ---------------------------------------------------------------------------- downsampler
@pytest.mark.parametrize("training", [False, True])
def test_downsampler_of_a_constant_is_the_constant(training):
    ds = AttentionDownsampler(8, 16).train(training)
    value = torch.randn(2, 8, 1, 1)
    out = ds(value.expand(2, 8, 64, 96).contiguous())
    assert out.shape == (2, 8, 4, 6)
    # In training the dropout rescales the logit input, never the averaged features.
    torch.testing.assert_close(out, value.expand(2, 8, 4, 6))


def test_downsampler_is_a_softmax_weighted_mean_of_blurred_patches():
    from kornia.filters import gaussian_blur2d

    ds = AttentionDownsampler(5, 4).eval()
    x = torch.randn(2, 5, 8, 12)
    blurred = gaussian_blur2d(x, 5, (1.0, 1.0))
    expected = torch.empty(2, 5, 2, 3)
    for i in range(2):
        for j in range(3):
            patch = blurred[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].flatten(2)  # (B, C, 16)
            logit = torch.einsum("bcp,c->bp", patch, ds.logit.weight.flatten()) + ds.logit.bias
            attn = torch.softmax(logit * ds.weight.flatten() + ds.bias.flatten(), dim=-1)
            expected[:, :, i, j] = (patch * attn[:, None]).sum(-1)
    torch.testing.assert_close(ds(x), expected)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ds(torch.randn(1, 5, 10, 12))


def test_downsampler_init():
    ds = AttentionDownsampler(8, 16)
    assert ds.weight.shape == ds.bias.shape == (16, 16)
    assert (ds.weight - 1).abs().max() < 0.1 and ds.bias.abs().max() < 0.1


# ---------------------------------------------------------------------------- losses
def test_random_projection_unit_columns_and_seeded():
    p = random_projection(3, 64, 30, generator=torch.Generator().manual_seed(1))
    assert p.shape == (3, 64, 30)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(3, 30))
    torch.testing.assert_close(p, random_projection(3, 64, 30, generator=torch.Generator().manual_seed(1)))
    feats = torch.randn(3, 64, 2, 5)
    torch.testing.assert_close(project(feats, p)[1, :, 1, 4], p[1].T @ feats[1, :, 1, 4])


def test_uncertainty_and_reconstruction_loss_match_the_formula():
    head = UncertaintyHead(16)
    # conv init scaled by 0.1: |w| <= 0.1 / sqrt(fan_in), the default bound times 0.1.
    assert head.net.weight.abs().max() <= 0.1 / math.sqrt(16) + 1e-7
    target = torch.randn(2, 16, 3, 4)
    s = head(target)
    direct_s = torch.exp(torch.einsum("bchw,c->bhw", target, head.net.weight.flatten()) + head.net.bias + 0.1)
    torch.testing.assert_close(s, direct_s[:, None])
    down, proj_t = torch.randn(2, 30, 3, 4), torch.randn(2, 30, 3, 4)
    total = 0.0
    for b in range(2):
        for k in range(30):
            for y in range(3):
                for x in range(4):
                    sv = s[b, 0, y, x]
                    total += (down[b, k, y, x] - proj_t[b, k, y, x]) ** 2 / (2 * sv**2) + torch.log(sv)
    torch.testing.assert_close(reconstruction_loss(down, proj_t, s), total / (2 * 30 * 3 * 4))
    # s is clamped at 1e-4 so log s stays finite.
    with torch.no_grad():
        head.net.bias.fill_(-100.0)
    assert torch.all(head(target) == 1e-4)


def test_image_head_and_loss():
    head = ImageHead(8)
    feats = torch.randn(2, 8, 5, 7) * 10
    rec = head(feats)
    assert rec.shape == (2, 3, 5, 7) and rec.abs().max() <= 1
    # LayerNorm over channels only: the head is per-pixel.
    torch.testing.assert_close(head(feats[..., 2:3, 4:5]), rec[..., 2:3, 4:5])
    img = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(image_loss(img, rec), ((img - rec) ** 2).mean())


# ---------------------------------------------------------------------------- preview
def test_preview_uses_one_pca_basis():
    low = torch.randn(16, 4, 4)
    high = F.interpolate(low[None], scale_factor=8, mode="nearest")[0]
    bilinear = F.interpolate(low[None], scale_factor=8, mode="bilinear")[0]
    lo, hi, bi = pca_rgb(low, high, bilinear)
    torch.testing.assert_close(F.interpolate(lo[None], scale_factor=8, mode="nearest")[0], hi)
    assert bi.shape == (3, 32, 32) and 0 <= bi.min() and bi.max() <= 1


def test_preview_is_captioned_rows_of_four_enlarged_panels():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    low, high = torch.randn(6, 16, 2, 2), torch.randn(6, 16, 32, 32)
    rows = preview_rows(images, low, high)
    assert len(rows) == PREVIEW_ROWS == 4 and all(len(r) == len(TITLES) == 4 for r in rows)
    assert all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for r in rows for p in r)
    picture = np.asarray(preview(images, low, high))
    scale = enlargement(32, 32)
    assert scale == 8  # a 32 px crop is shown at 256 px
    size, origins = grid_layout(4, 4, 32 * scale, 32 * scale, note=True)
    assert picture.shape == (size[1], size[0], 3)
    for r in range(4):
        x, y = origins[r][0]
        shown = picture[y:y + 32 * scale:scale, x:x + 32 * scale:scale]
        np.testing.assert_array_equal(shown, images[r].permute(1, 2, 0).numpy())  # row r is sample r, unblurred
        x, y = origins[r][1]  # the low-res panel: one flat block per token
        block = picture[y:y + 16 * scale, x:x + 16 * scale]
        assert (block == block[0, 0]).all()
    top = picture[: origins[0][0][1]]
    assert (top != 255).any(axis=-1).sum() > 200  # the captions are drawn above the panels
    assert len(preview_rows(images[:2], low[:2], high[:2])) == 2  # a smaller batch: fewer rows


# ---------------------------------------------------------------------------- module
@pytest.fixture
def module(tiny_clip_cfg):
    return SimFeatUpModule(clip_config=tiny_clip_cfg)


def test_module_normalises_and_freezes_backbone(module):
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = (batch.float() / 255 - mean) / std
    torch.testing.assert_close(module.normalise(batch), expected)
    module.train()
    assert not module.backbone.training and module.upsampler.training
    assert not any(p.requires_grad for p in module.backbone.parameters())
    trained = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    heads = [module.upsampler, module.downsampler, module.uncertainty, module.image_head]
    assert trained == {id(p) for m in heads for p in m.parameters()}


def test_module_rejects_unknown_feature_source(tiny_clip_cfg):
    with pytest.raises(ValueError, match="feature_source"):
        SimFeatUpModule(clip_config=tiny_clip_cfg, feature_source="middle")


def test_clipping_only_in_the_first_steps(module):
    calls = []
    module.clip_gradients = lambda opt, gradient_clip_val, gradient_clip_algorithm: calls.append(
        (gradient_clip_val, gradient_clip_algorithm)
    )
    for step in (0, 9, 10, 50):
        module._trainer = SimpleNamespace(global_step=step)
        module.on_before_optimizer_step(None)
    module._trainer = None
    assert calls == [(1e-4, "norm"), (1e-4, "norm")]


def test_jitter_losses_are_seeded_and_score_bilinear(module):
    module.eval()
    img = module.normalise(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    low = module.features(img)
    with torch.no_grad():
        high = module.upsampler(low, img)
        bil = F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
        a = module.jitter_losses(high, img, generator=torch.Generator().manual_seed(5), bilinear=bil)
        b = module.jitter_losses(high, img, generator=torch.Generator().manual_seed(5), bilinear=bil)
    assert a.keys() == {"rec", "img", "rec_bilinear"}
    for k in a:
        assert torch.isfinite(a[k]) and a[k] == b[k]


def test_checkpoint_hooks_drop_and_restore_the_backbone(module, tiny_clip_cfg):
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module._trainer = SimpleNamespace(is_global_zero=False)
    module.on_save_checkpoint(ckpt)
    module._trainer = None
    assert ckpt["state_dict"] and not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    fresh = SimFeatUpModule(clip_config=tiny_clip_cfg)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])  # strict
    other = SimFeatUpModule(clip_config=tiny_clip_cfg, feature_source="penultimate")
    with pytest.raises(ValueError, match="feature_source"):
        other.on_load_checkpoint(ckpt)


def test_artefact_round_trip(module, tmp_path):
    path = module.write_artefact(tmp_path)
    upsampler, info = load_upsampler(path)
    for k, v in module.upsampler.state_dict().items():
        torch.testing.assert_close(upsampler.state_dict()[k], v)
    assert info["backbone"]["feature_source"] == "final" and info["backbone"]["model"] is None
    assert info["backbone"]["config"] == module.hparams.clip_config and info["backbone"]["pretrained"] is None
    assert info["backbone"]["patch_size"] == 16 and info["training"]["steps"] == 0
    assert json.loads((tmp_path / "upsampler.json").read_text())["training"]["config"]["lr"] == 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upsampler.json", "upsampler.safetensors"]


# ---------------------------------------------------------------------------- checkpoint IO
def test_atomic_checkpoint_never_leaves_a_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_feature_source_penultimate_trains_on_the_last_block_input(module, tiny_clip_cfg):
    pen = SimFeatUpModule(clip_config=tiny_clip_cfg, feature_source="penultimate")
    img = module.normalise(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    final, penultimate = module.features(img), pen.features(img)
    assert final.shape == penultimate.shape == (1, 32, 2, 2)
    assert not torch.allclose(final, penultimate)
    assert pen.artefact_info()[0]["feature_source"] == "penultimate"


def test_custom_config_and_weights_file_are_the_backbone(tmp_path, tiny_clip_cfg):
    """--model.model cfg.json --model.pretrained w.safetensors: trains on those weights, records them by name."""
    from safetensors.torch import save_file

    from simfeatup.backbone import file_sha256
    from simfeatup.encoder import DenseCLIP

    clip = DenseCLIP.from_config(tiny_clip_cfg, seed=3).clip
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_clip_cfg))
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    module = SimFeatUpModule(model=str(tmp_path / "cfg.json"), pretrained=str(weights))
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in module.backbone.clip.state_dict().items())
    backbone = module.artefact_info()[0]
    assert backbone["config"] == tiny_clip_cfg and backbone["model"] is None
    assert (backbone["pretrained"], backbone["weights_sha256"]) == ("w.safetensors", file_sha256(weights))
    # clip_config + pretrained is the same backbone (the weights were ignored before)
    same = SimFeatUpModule(clip_config=tiny_clip_cfg, pretrained=str(weights))
    assert same.artefact_info()[0] == backbone
