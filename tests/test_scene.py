"""Scene mode (SPEC 9): block-streamed segmentation equals the whole scene segmented as one image."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simfeatup import imaging, scores, windows
from simfeatup.constants import NODATA_LABEL
from simfeatup.encoder import DenseCLIP
from simfeatup.scene import ArrayScene, averaged_block_logits, block_boxes, segment_scene
from simfeatup.segmenter import Segmenter
from simfeatup.vocabulary import Vocabulary

# SimFeatUp's kernels cost the same whatever the feature size, so its scenes use a scaled-down
# window geometry (as tests/test_segmenter.py does); SPEC's 224/112 runs the bilinear path.
SMALL = {"long_side": 96, "window": 48, "stride": 24}
VOCAB = Vocabulary.from_spec("building,roof;road;water")  # 3 classes, 4 queries


@pytest.fixture(scope="module")
def encoder():
    from conftest import TINY_CLIP

    torch.manual_seed(0)
    return DenseCLIP.from_config(TINY_CLIP)


@pytest.fixture(scope="module")
def bilinear(encoder):
    return Segmenter(encoder, None, window_batch=3, cache=False)


@pytest.fixture(scope="module")
def simfeatup(encoder):
    from simfeatup.upsampler import SimFeatUp

    torch.manual_seed(3)
    return Segmenter(
        encoder, SimFeatUp(dim=encoder.embed_dim, patch_size=encoder.patch_size), window_batch=4, cache=False, **SMALL
    )


def _text(encoder, q=len(VOCAB.queries)):
    g = torch.Generator().manual_seed(1)
    return F.normalize(torch.randn(q, encoder.embed_dim, generator=g), dim=1).numpy()


def _scene(h, w, nodata=False, seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    valid = np.ones((h, w), bool)
    if nodata:  # a border strip, a hole and scattered pixels, as footprints of real scenes have
        valid[:, : w // 5] = False
        valid[h // 3 : h // 2, w // 2 : w // 2 + 17] = False
        valid[rng.random((h, w)) < 0.02] = False
    return ArrayScene(rgb, valid)


def _whole_scene_logits(seg, reader, text, lam=-0.3):
    """SPEC 2.2 + 2.6 on the whole normalised scene as one image, nodata set to the mean colour."""
    x = imaging.normalise(reader.rgb)
    x[:, ~reader.valid] = 0
    return windows.averaged_logits([x], text, lam, seg._window_logits, **seg.geometry)[0]


def _stitched_logits(seg, reader, text, block, lam=-0.3):
    out = np.full((len(text), reader.height, reader.width), np.nan, np.float32)
    for y0, y1, x0, x1 in block_boxes(reader.height, reader.width, block):
        logits, valid = averaged_block_logits(seg, reader, (y0, y1, x0, x1), text, lam)
        np.testing.assert_array_equal(valid, reader.valid[y0:y1, x0:x1])
        out[:, y0:y1, x0:x1] = logits
    return out


@pytest.mark.parametrize(
    "hw, blocks, nodata",
    [
        ((300, 500), (224, 336, 1792), False),
        ((300, 500), (224, 448), True),
        ((150, 200), (112, 224), False),  # smaller than one window: one padded window, as in image mode
    ],
)
def test_block_logits_equal_whole_scene_logits(bilinear, encoder, hw, blocks, nodata):
    reader = _scene(*hw, nodata=nodata)
    text = _text(encoder)
    whole = _whole_scene_logits(bilinear, reader, text)
    for block in blocks:
        stitched = _stitched_logits(bilinear, reader, text, block)
        np.testing.assert_allclose(
            stitched[:, reader.valid], whole[:, reader.valid], atol=1e-5, err_msg=f"block {block}"
        )


@pytest.mark.parametrize("hw, nodata", [((60, 90), False), ((70, 100), True), ((40, 30), False)])
def test_block_logits_equal_whole_scene_logits_with_simfeatup(simfeatup, encoder, hw, nodata):
    reader = _scene(*hw, nodata=nodata, seed=2)
    text = _text(encoder)
    whole = _whole_scene_logits(simfeatup, reader, text)
    for block in (24, 72):
        stitched = _stitched_logits(simfeatup, reader, text, block)
        np.testing.assert_allclose(
            stitched[:, reader.valid], whole[:, reader.valid], atol=1e-5, err_msg=f"block {block}"
        )


def test_labels_are_the_whole_scene_labels_and_nodata_stays_nodata(bilinear, encoder):
    reader = _scene(300, 500, nodata=True, seed=4)
    text = _text(encoder)
    scoring = scores.Scoring(prob_thd=0.4, bg_idx=1)
    expected = scores.segmentation(_whole_scene_logits(bilinear, reader, text), VOCAB, scoring, return_probs=True)
    for block in (224, 336):
        labels = np.zeros((300, 500), np.uint8)
        probs = np.zeros((3, 300, 500), np.float32)
        progress = []
        for b in segment_scene(
            bilinear,
            reader,
            VOCAB,
            scoring,
            text=text,
            block=block,
            return_probs=True,
            on_block=lambda done, total: progress.append((done, total)),
        ):
            labels[b.y0 : b.y1, b.x0 : b.x1] = b.labels
            probs[:, b.y0 : b.y1, b.x0 : b.x1] = b.probs
        assert labels.dtype == np.uint8
        assert (labels[~reader.valid] == NODATA_LABEL).all() and (probs[:, ~reader.valid] == 0).all()
        np.testing.assert_allclose(probs[:, reader.valid], expected.probs[:, reader.valid], atol=1e-5)
        top = np.sort(expected.probs, axis=0)
        clear = reader.valid & (top[-1] - top[-2] > 1e-4) & (np.abs(top[-1] - 0.4) > 1e-4)  # float ties aside
        np.testing.assert_array_equal(labels[clear], expected.labels[clear])
        assert clear.mean() > 0.7 and set(np.unique(labels[reader.valid])) <= {0, 1, 2}
        n = len(block_boxes(300, 500, block))
        assert progress == [(i, n) for i in range(1, n + 1)]


def test_a_448_scene_is_segmented_as_image_mode_segments_a_448_image(bilinear, encoder):
    # image mode resizes to a long side of 448: on a 448 x 448 picture that is the identity, so
    # scene mode must give its labels exactly
    reader = _scene(448, 448, seed=5)
    text = _text(encoder)
    [image_mode] = bilinear.segment([reader.rgb], VOCAB, text=text)
    labels = np.zeros((448, 448), np.uint8)
    for b in segment_scene(bilinear, reader, VOCAB, text=text, block=224):
        labels[b.y0 : b.y1, b.x0 : b.x1] = b.labels
    assert (labels == image_mode.labels).mean() > 0.999  # float ties between batchings aside


class _Recording(ArrayScene):
    def __init__(self, *args):
        super().__init__(*args)
        self.reads = []

    def read(self, y0, y1, x0, x1):
        self.reads.append((y1 - y0, x1 - x0))
        return super().read(y0, y1, x0, x1)


def test_reads_and_model_calls_are_bounded_by_the_block_not_the_scene(bilinear, encoder, monkeypatch):
    whole = _scene(500, 560)
    reader = _Recording(whole.rgb, whole.valid)
    calls = []
    real = bilinear._window_logits

    def counting(batch, text, lam):
        calls.append(len(batch))
        return real(batch, text, lam)

    monkeypatch.setattr(bilinear, "_window_logits", counting)
    list(segment_scene(bilinear, reader, VOCAB, text=_text(encoder), block=224))
    margin = 2 * (bilinear.window - bilinear.stride)  # the windows reaching in from each side
    assert max(h for h, _ in reader.reads) <= 224 + margin and max(w for _, w in reader.reads) <= 224 + margin
    assert max(calls) <= bilinear.window_batch
    # blocks of 2 strides: each block evaluates the 3 x 3 windows that touch it (border blocks fewer)
    assert sum(calls) <= 9 * len(block_boxes(500, 560, 224))


def test_blocks_with_no_data_cost_no_model_call(bilinear, encoder, monkeypatch):
    rgb = np.random.default_rng(6).integers(0, 256, (300, 448, 3), dtype=np.uint8)
    valid = np.zeros((300, 448), bool)
    valid[:, :224] = True  # the right half, block column 1 of 224-blocks, is nodata
    calls = []
    real = bilinear._window_logits
    monkeypatch.setattr(bilinear, "_window_logits", lambda b, t, lam: calls.append(len(b)) or real(b, t, lam))
    blocks = list(segment_scene(bilinear, ArrayScene(rgb, valid), VOCAB, text=_text(encoder), block=224))
    assert all((b.labels == NODATA_LABEL).all() for b in blocks if b.x0 >= 224)
    assert all((b.labels != NODATA_LABEL).all() for b in blocks if b.x0 < 224)
    # block column 0 needs the windows starting at x = 0 and 112 (the one at 224 starts at its
    # border); its rows the windows starting at y = 0 and 76 (block row 0) and y = 76 (block row 1)
    assert sum(calls) == (2 + 1) * 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block": 200}, "not a positive multiple of the window stride 112"),
        ({"block": 0}, "not a positive multiple"),
        ({"scoring": scores.Scoring(bg_idx=3)}, "bg_idx 3 is not a class index"),
    ],
)
def test_bad_settings_are_refused(bilinear, encoder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(segment_scene(bilinear, _scene(120, 130), VOCAB, text=_text(encoder), **kwargs))


def test_a_vocabulary_that_would_collide_with_the_nodata_label_is_refused(bilinear):
    big = Vocabulary(tuple((f"class {k}",) for k in range(NODATA_LABEL + 1)))
    with pytest.raises(ValueError, match=f"at most {NODATA_LABEL}"):
        next(segment_scene(bilinear, _scene(120, 130), big, text=np.zeros((len(big), 32), np.float32)))


def test_scenes_smaller_than_a_patch_are_refused(bilinear, encoder):
    with pytest.raises(ValueError, match="smaller than one 16-pixel patch"):
        next(segment_scene(bilinear, _scene(10, 300), VOCAB, text=_text(encoder)))


def test_the_onnx_backend_streams_scenes_through_the_same_code(onnx_dir):
    from simfeatup.runtime import OnnxSegmenter

    seg = OnnxSegmenter(onnx_dir, window_batch=2, cache=False)
    reader = _scene(150, 240, nodata=True, seed=7)  # 2 windows; blocks of 224 evaluate 3
    text = seg.query_embeddings(VOCAB)
    whole = _whole_scene_logits(seg, reader, text)
    stitched = _stitched_logits(seg, reader, text, 224)
    np.testing.assert_allclose(stitched[:, reader.valid], whole[:, reader.valid], atol=1e-5)


@pytest.mark.parametrize(
    "modules, heavy",
    [
        ("simfeatup.scene, simfeatup.scene_cli, simfeatup.cli", {"torch", "rasterio", "onnxruntime"}),
        ("simfeatup.geo", {"torch", "rasterio"}),  # rasterio only once a raster is opened
    ],
)
def test_scene_mode_imports_neither_torch_nor_rasterio(modules, heavy):
    import subprocess
    import sys

    code = f"import sys, {modules}; assert not {heavy!r} & set(sys.modules), sorted({heavy!r} & set(sys.modules))"
    subprocess.run([sys.executable, "-c", code], check=True)
