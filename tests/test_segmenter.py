import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simfeatup import imaging, windows
from simfeatup.encoder import DenseCLIP
from simfeatup.scores import Scoring
from simfeatup.segmenter import Segmenter
from simfeatup.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def encoder():
    from conftest import TINY_CLIP

    return DenseCLIP.from_config(TINY_CLIP)


@pytest.fixture(scope="module")
def upsampler(encoder):
    from simfeatup.upsampler import SimFeatUp

    torch.manual_seed(3)
    return SimFeatUp(dim=encoder.embed_dim, patch_size=encoder.patch_size).eval()


def _text(encoder, q=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(q, encoder.embed_dim, generator=g), dim=1)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("use_upsampler", [False, True])
def test_window_logits_is_cosine_plus_lambda_cls(encoder, upsampler, use_upsampler):
    seg = Segmenter(encoder, upsampler if use_upsampler else None)
    windows = torch.randn(2, 3, 224, 160)
    text = _text(encoder)
    with torch.no_grad():
        feats, cls = encoder(windows)
        if use_upsampler:
            feats = upsampler(feats, windows)
    cos = torch.einsum("bdhw,qd->bqhw", F.normalize(feats, dim=1), text)
    if not use_upsampler:  # SPEC 2.4: logits at the token grid, then resized
        cos = F.interpolate(cos, size=(224, 160), mode="bilinear", align_corners=False)
    cls_sim = F.normalize(cls, dim=1) @ text.T  # (B, Q)
    for lam in (0.0, -0.3):
        expected = cos + lam * cls_sim[:, :, None, None]
        with torch.no_grad():
            got = seg.window_logits(windows, text, lam)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _logits(seg, images, text, lam=None):
    """Per-image (Q, H, W) averaged window logits brought back to the original size (SPEC 2.6)."""
    averaged = seg.averaged_logits(images, text.numpy(), lam=lam)
    return [imaging.resize_bilinear(a, image.shape[:2]) for a, image in zip(averaged, images)]


# The upsampler's kernels cost the same whatever the feature size, so tests that run it on
# many windows use a scaled-down geometry (windows 48/24 on a long side of 96); the SPEC
# geometry itself (448, 224/112) is exercised with the bilinear path.
SMALL = {"long_side": 96, "window": 48, "stride": 24}


def _direct_canvas(seg, image, text, lam):
    """The window average written out with explicit loops (SPEC 2.2, 2.6)."""
    x = torch.from_numpy(imaging.preprocess(image, seg.long_side))
    _, h, w = x.shape
    total = torch.zeros(len(text), h, w)
    count = torch.zeros(h, w)
    for y0, y1, x0, x1 in windows.window_boxes(h, w, seg.window, seg.stride):
        (top, bottom), (left, right) = windows.padding(y1 - y0, 16), windows.padding(x1 - x0, 16)
        window = F.pad(x[:, y0:y1, x0:x1], (left, right, top, bottom))  # zeros after normalising = mean colour
        out = seg.window_logits(window[None], text, lam)[0]
        total[:, y0:y1, x0:x1] += out[:, top : top + y1 - y0, left : left + x1 - x0]
        count[y0:y1, x0:x1] += 1
    canvas = (total / count)[None]
    return F.interpolate(canvas, size=image.shape[:2], mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize(
    "hw, use_upsampler, geometry",
    [
        ((448, 448), False, {}),
        ((300, 500), False, {}),
        ((60, 448), False, {}),
        ((100, 40), True, {}),
        ((96, 96), True, SMALL),
        ((70, 130), True, SMALL),
        ((20, 96), True, SMALL),
    ],
)
def test_logits_average_windows_and_return_original_size(encoder, upsampler, hw, use_upsampler, geometry):
    seg = Segmenter(encoder, upsampler if use_upsampler else None, **geometry)
    image = _image(*hw)
    text = _text(encoder)
    with torch.inference_mode():
        got = _logits(seg, [image], text, lam=-0.3)[0]
        expected = _direct_canvas(seg, image, text, -0.3)
    assert got.shape == (3, *hw)
    np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("use_upsampler, geometry", [(False, {}), (True, SMALL)])
def test_batched_equals_one_by_one(encoder, upsampler, use_upsampler, geometry):
    seg = Segmenter(encoder, upsampler if use_upsampler else None, window_batch=5, **geometry)
    images = [_image(448, 448, 1), _image(200, 333, 2), _image(90, 700, 3)]
    text = _text(encoder, 4)
    with torch.inference_mode():
        together = _logits(seg, images, text)
        alone = [_logits(seg, [image], text)[0] for image in images]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_segment_returns_labels_and_probabilities(encoder):
    seg = Segmenter(encoder)
    vocab = Vocabulary.from_spec("building,roof;road;water")
    text = _text(encoder, len(vocab.queries))
    image = _image(120, 160)
    [res] = seg.segment([image], vocab, text=text, return_probs=True)
    assert res.labels.shape == (120, 160) and res.labels.max() < 3
    assert res.probs.shape == (3, 120, 160)
    np.testing.assert_array_equal(res.labels, res.probs.argmax(0))
    [thresholded] = seg.segment([image], vocab, scoring=Scoring(prob_thd=0.99, bg_idx=2), text=text)
    unsure = res.probs.max(0) < 0.99
    assert unsure.any() and (thresholded.labels[unsure] == 2).all()
    np.testing.assert_array_equal(thresholded.labels[~unsure], res.labels[~unsure])


# ----------------------------------------------------------------------------- build_segmenter's backbone
@pytest.fixture
def config_weights(tmp_path, tiny_clip_cfg):
    """A tiny CLIP's config and its (seed 3, not the default seed 0) weights, as a user has them."""
    from safetensors.torch import save_file

    clip = DenseCLIP.from_config(tiny_clip_cfg, seed=3).clip
    path = tmp_path / "clip" / "mine.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return tiny_clip_cfg, path, clip.state_dict()


def _same_weights(encoder, state):
    return all(torch.equal(v, state[k]) for k, v in encoder.clip.state_dict().items())


def test_config_and_weights_file_build_that_model(config_weights):
    from simfeatup.segmenter import build_segmenter

    cfg, path, state = config_weights
    segmenter = build_segmenter(clip_config=cfg, pretrained=str(path))  # the weights were ignored before
    assert _same_weights(segmenter.encoder, state)
    assert not _same_weights(build_segmenter(clip_config=cfg).encoder, state)  # without: random, seed 0
    assert segmenter.encoder.backbone.pretrained == "mine.safetensors" and segmenter.encoder.backbone.config == cfg


def test_artefact_finds_its_weights_beside_it_or_says_which_file(config_weights, tmp_path, monkeypatch):
    import shutil

    from simfeatup.backbone import file_sha256
    from simfeatup.segmenter import build_segmenter
    from simfeatup.upsampler import SimFeatUp, save_upsampler

    cfg, path, state = config_weights
    run = tmp_path / "run"
    record = {"model": None, "config": cfg, "pretrained": path.name, "weights_sha256": file_sha256(path)}
    save_upsampler(SimFeatUp(32, 16), run / "upsampler.safetensors", backbone=record)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="mine.safetensors.*--pretrained /path/to/mine.safetensors"):
        build_segmenter(run / "upsampler.json")
    assert _same_weights(build_segmenter(run / "upsampler.json", pretrained=str(path)).encoder, state)
    shutil.copy(path, run)
    segmenter = build_segmenter(run / "upsampler.json")
    assert _same_weights(segmenter.encoder, state) and segmenter.upsampler is not None


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_bfloat16_reaches_the_image_tower_only_and_keeps_the_labels(encoder, upsampler):
    """--dtype bfloat16: the ViT in bf16; text tower, upsampler and scores float32 (docs/method.md section 8)."""
    import copy

    fp32 = Segmenter(encoder, upsampler, cache=False)
    bf16 = copy.deepcopy(fp32).to_dtype(torch.bfloat16)
    assert {p.dtype for p in bf16.encoder.clip.visual.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.encoder.clip.transformer.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.upsampler.parameters()} == {torch.float32}
    assert bf16.describe()["torch"]["dtype"] == "bfloat16"
    assert bf16.describe()["torch"]["upsampler_dtype"] == "float32"
    assert fp32.describe()["torch"]["dtype"] == fp32.describe()["torch"]["upsampler_dtype"] == "float32"
    vocabulary = Vocabulary.from_lines(["road", "building", "tree", "water"])
    # the text side is untouched: the same embeddings (and so the same cache entries) as float32
    np.testing.assert_array_equal(bf16.encode_queries(vocabulary.queries), fp32.encode_queries(vocabulary.queries))
    from conftest import REPO

    image = imaging.load_image(REPO / "samples" / "spacenet6_rotterdam.jpg")
    ref, got = (s.segment([image], vocabulary, return_probs=True)[0] for s in (fp32, bf16))
    assert got.probs.dtype == np.float32
    # a random 2-block model has many near-ties; a real ViT-B/16 is measured by bench/e2e.py
    assert (got.labels == ref.labels).mean() > 0.95


def test_reduced_precision_the_cpu_lacks_units_for_warns(encoder, upsampler, monkeypatch, caplog):
    import copy

    from simfeatup import hardware

    for dtype, advice in ((torch.bfloat16, ("error", "no bf16 units")), (torch.float16, ("warning", "no faster")),
                          (torch.bfloat16, None)):
        monkeypatch.setattr(hardware, "cpu_dtype_advice", lambda name, advice=advice: advice)
        caplog.clear()
        with caplog.at_level("WARNING", logger="simfeatup"):
            copy.deepcopy(Segmenter(encoder, upsampler, cache=False)).to_dtype(dtype)
        if advice:
            assert f"{str(dtype).removeprefix('torch.')}: {advice[1]}" in caplog.text
        else:
            assert not caplog.records
